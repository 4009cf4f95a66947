"""LanguageModel: build, meta init, compile, streaming, generation, weight-decay groups; build_model, the config
section rule and the shipped checkpoints."""
import pytest
import torch

from zoo.config import ModelConfig
from zoo.models import LanguageModel
from zoo.registry import MIXERS, MLP_ONLY
from tests.helpers import rel_err
from tests.layers.contract import check_meta_init_equals_init


def tiny(**overrides) -> ModelConfig:
    cfg = ModelConfig(dim=32, depth=3, pattern=["attention", "attention", "mlp"], dropout=0.0)
    cfg.attention.heads = 2
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_meta_init_equals_normal_init():
    cfg = tiny()
    cfg.attention.persistent_tokens = 2
    meta, normal = check_meta_init_equals_init(lambda: LanguageModel(cfg), seed=7)
    x = torch.randint(0, 258, (2, 9))
    assert torch.equal(normal(x)[0], meta(x)[0])                       # non-persistent RoPE buffers recomputed


def test_pattern_builds_mixer_and_mlp_only_blocks():
    model = LanguageModel(tiny())
    kinds = [(type(b.mixer).__name__ if b.mixer is not None else None, b.mlp is not None) for b in model.blocks]
    assert kinds == [("Attention", True), ("Attention", True), (None, True)]
    no_mlp = LanguageModel(tiny(mlp="none", pattern=["attention"]))
    assert all(b.mlp is None for b in no_mlp.blocks)


def test_stream_split_and_decode_equal_full_forward():
    torch.manual_seed(0)
    model = LanguageModel(tiny()).double()
    x = torch.randint(0, 258, (2, 12))
    full, _ = model(x)
    first, state = model(x[:, :5])
    second, _ = model(x[:, 5:], state)
    assert rel_err(torch.cat([first, second], 1), full) < 1e-12
    state, steps = None, []
    for t in range(12):
        logits, state = model(x[:, t:t + 1], state)
        steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-12


def test_greedy_generate_matches_full_forward_argmax():
    torch.manual_seed(1)
    model = LanguageModel(tiny()).eval()
    prompt = torch.randint(0, 258, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


def test_tied_embeddings_share_weights_and_untied_do_not():
    tied = LanguageModel(tiny())
    assert tied.lm_head is None
    h = torch.randn(1, 2, 32)
    assert torch.allclose(tied.head(h), h @ tied.embed.weight.T)
    untied = LanguageModel(tiny(tie_embeddings=False))
    assert untied.lm_head is not None and not torch.equal(untied.lm_head.weight, untied.embed.weight)


def test_no_weight_decay_covers_norms_biases_embeddings():
    model = LanguageModel(tiny())
    names = model.no_weight_decay()
    assert "embed.weight" in names and "norm.weight" in names
    assert "blocks.0.mixer_norm.weight" in names
    assert "blocks.0.mixer.w_q.weight" not in names and "blocks.2.mlp.w_in.weight" not in names


def test_compile_fullgraph_no_breaks():
    torch.manual_seed(2)
    model = LanguageModel(tiny()).eval()
    x = torch.randint(0, 258, (2, 8))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x)[0], model(x)[0]) < 1e-5


def test_bad_input_shapes_raise():
    model = LanguageModel(tiny())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        model(torch.randint(0, 258, (8,)))
    with pytest.raises(ValueError, match="state has 1 entries, the model has 3 blocks"):
        model(torch.randint(0, 258, (1, 4)), state=(None,))


# ------------------------------------------------------------------------------------------------ construction
def test_build_model_is_a_meta_build_and_one_reset_under_the_callers_seed():
    from zoo.models import build_model

    cfg = tiny()
    cfg.attention.persistent_tokens = 2
    torch.manual_seed(7)
    built = build_model(cfg)
    assert all(p.device.type == "cpu" for p in built.parameters())
    direct = LanguageModel(cfg)
    torch.manual_seed(7)
    direct.reset_parameters()
    torch.manual_seed(7)
    again = build_model(cfg)
    for (name, a), b, c in zip(built.state_dict().items(), direct.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    x = torch.randint(0, 258, (2, 9))
    assert torch.equal(built(x)[0], direct(x)[0])


ALL_BLOCKS = [*sorted(MIXERS), MLP_ONLY]   # every registered mixer, so a new one is covered by registering it


def test_reset_parameters_initialises_each_module_once():
    """The one reset pass of a model calls every sub-module's ``reset_parameters`` at most once."""
    from collections import Counter

    cfg = ModelConfig(dim=32, depth=len(ALL_BLOCKS), pattern=ALL_BLOCKS)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model.to_empty(device="cpu")
    calls = Counter()
    for name, module in model.named_modules():
        if hasattr(module, "reset_parameters"):
            def counted(original=module.reset_parameters, name=name):
                calls[name] += 1
                original()
            module.reset_parameters = counted
    model.reset_parameters()
    assert calls[""] == 1 and max(calls.values()) == 1, [name for name, n in calls.items() if n > 1]
    assert all(calls[f"blocks.{i}.mixer"] == 1 for i, name in enumerate(ALL_BLOCKS) if name != MLP_ONLY)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_config_section_fields_are_the_constructor_arguments(name):
    """A mixer's config section holds exactly its constructor's arguments besides ``dim`` (nested sections: the
    nested mixer's), so the model builds every mixer as ``cls(dim=dim, **asdict(section))``."""
    import dataclasses
    import inspect

    from zoo.registry import BLOCK_MLPS, block_mlp_class, mixer_class, mixer_section

    def arguments(cls):
        return set(inspect.signature(cls.__init__).parameters) - {"self", "dim"}

    section = getattr(ModelConfig(), mixer_section(name))
    fields = {f.name for f in dataclasses.fields(section)}
    assert fields == arguments(mixer_class(name))
    for field in fields:
        value = getattr(section, field)
        if dataclasses.is_dataclass(value):  # a Titans hybrid's memory: TitansMemory's arguments
            from zoo.layers.titans import TitansMemory

            assert {f.name for f in dataclasses.fields(value)} == arguments(TitansMemory)
    if name in BLOCK_MLPS:
        assert set(BLOCK_MLPS[name][1]) == arguments(block_mlp_class(name)) <= fields


def test_every_shipped_checkpoint_loads_with_its_exact_weights():
    import warnings

    from safetensors.torch import load_file

    import zoo
    from zoo.registry import checkpoints_dir, shipped_checkpoints

    names = shipped_checkpoints()
    if not names:
        pytest.skip("no checkpoints/ next to the package")
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = zoo.load(checkpoints_dir() / name).state_dict()
        saved = load_file(str(checkpoints_dir() / name / "model.safetensors"))
        assert set(state) == set(saved), name
        assert all(torch.equal(state[key], saved[key]) for key in saved), name


def test_a_mask_reaches_only_mixers_that_declare_takes_mask():
    from zoo.layers.attention import Attention
    from zoo.layers.mom import GatedDeltaNet
    from zoo.models.lm import Block

    from zoo.layers.base import Mixer

    class NoMask(Mixer):
        """A causal mixer that declares no mask."""

        dim = 32

        def forward(self, x, state=None):
            return x, state

    x, mask = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    encoder = Block(32, Attention(32, 2, causal=False), None, 1e-5, 0.0)
    assert encoder(x, None, mask)[0].shape == (2, 5, 32)
    with pytest.raises(ValueError, match="NoMask takes no mask"):
        Block(32, NoMask(), None, 1e-5, 0.0)(x, None, mask)
    with pytest.raises(ValueError, match="GatedDeltaNet: mask must be left padding"):  # causal: left padding only
        Block(32, GatedDeltaNet(32, 2), None, 1e-5, 0.0)(x, None, mask)

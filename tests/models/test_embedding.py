"""EmbeddingModel (docs/latent-pooling.md#embedding-model): bidirectional backbone, padding, instructions, init."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from zoo.checkpoint import export_model, load_init_weights
from zoo.config import Config, ModelConfig
from zoo.data.retrieval import encode_with_prefix, pad_right, query_prefix
from zoo.data.tokenizer import ByteTokenizer
from zoo.errors import CheckpointError
from zoo.models import LanguageModel, build_model
from zoo.models.embedding import EmbeddingModel
from tests.layers.contract import check_meta_init_equals_init


def tiny_config(**embedding) -> ModelConfig:
    """CPU tiny scale (docs/latent-pooling.md#configs): D=64, 2 layers, 2 heads; head r=16, 2 heads, m=2, d=32."""
    cfg = ModelConfig(architecture="embedding", dim=64, depth=2, pattern=["attention"])
    cfg.attention.heads = 2
    cfg.embedding.num_latents, cfg.embedding.heads, cfg.embedding.mlp_ratio, cfg.embedding.head_dim = 16, 2, 2, 32
    for key, value in embedding.items():
        setattr(cfg.embedding, key, value)
    return cfg


def make_model(seed=0, pattern=None, **embedding) -> EmbeddingModel:
    cfg = tiny_config(**embedding)
    if pattern is not None:
        cfg.pattern = pattern
        cfg.mamba.d_state = 4
    torch.manual_seed(seed)
    return EmbeddingModel(cfg).eval()


def padded_batch(texts: list[str]):
    return pad_right([encode_with_prefix(ByteTokenizer(), "", text) for text in texts], ByteTokenizer.pad_id)


TEXTS = ["In the beginning God created the heaven and the earth.", "Jesus wept.", "And God said, Let there be light"]


def test_build_model_dispatch_and_output_shape():
    model = build_model(tiny_config())
    assert isinstance(model, EmbeddingModel)
    ids, mask, _ = padded_batch(TEXTS)
    e = model(ids, mask)
    assert e.shape == (3, 64)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert "lm_head.weight" not in model.state_dict() and "pooling.latents" in model.state_dict()


# ------------------------------------------------------------------------------------------------ 8. bidirectional
@pytest.mark.parametrize("bidirectional", [True, False])
def test_changing_a_token_reaches_earlier_positions_only_when_bidirectional(bidirectional):
    model = make_model(bidirectional=bidirectional)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    with torch.no_grad():
        before, after = model.hidden_states(ids), model.hidden_states(changed)
    assert not torch.allclose(before[:, 8:], after[:, 8:])
    if bidirectional:
        assert (before[:, :8] - after[:, :8]).abs().amax(dim=-1).min() > 0      # every earlier position moved
    else:
        assert torch.equal(before[:, :8], after[:, :8])


@pytest.mark.parametrize("bidirectional, pattern", [(True, None), (False, None), (True, ["bimamba"])])
def test_embedding_is_padding_invariant(bidirectional, pattern):
    model = make_model(bidirectional=bidirectional, pattern=pattern)
    ids, mask, _ = padded_batch(TEXTS)
    with torch.no_grad():
        batched = model(ids, mask)
        for row, text in enumerate(TEXTS):
            alone_ids, alone_mask, _ = padded_batch([text])
            assert torch.allclose(batched[row], model(alone_ids, alone_mask)[0], rtol=0, atol=1e-5), row
        junk = torch.where(mask, ids, torch.randint(0, 258, ids.shape))                # other pad ids
        assert torch.allclose(model(junk, mask), batched, rtol=0, atol=1e-6)


def test_mask_reaches_only_noncausal_mixers():
    assert make_model(bidirectional=True).masked_blocks == (True, True)
    assert make_model(bidirectional=False).masked_blocks == (False, False)
    assert make_model(pattern=["bimamba", "mlp"]).masked_blocks == (True, False)


def test_one_warning_lists_the_mixers_that_stay_causal():
    cfg = tiny_config()
    cfg.pattern, cfg.depth, cfg.mamba.d_state = ["attention", "mamba", "gdn", "mamba"], 4, 4
    with pytest.warns(UserWarning) as record:
        EmbeddingModel(cfg)
    messages = [str(w.message) for w in record if "stay causal" in str(w.message)]
    assert messages == ["EmbeddingModel: mixers mamba, gdn have no bidirectional form and stay causal"]
    cfg.pattern = ["attention", "bimamba", "mlp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EmbeddingModel(cfg)
        cfg.pattern, cfg.embedding.bidirectional = ["mamba"], False
        EmbeddingModel(cfg)                                                                # not asked: no warning


# ------------------------------------------------------------------------------------------------ 7. instructions
def test_instruction_positions_do_not_reach_the_pooling():
    model = make_model()
    h = torch.randn(2, 10, 64)
    pool_mask = torch.ones(2, 10, dtype=torch.bool)
    pool_mask[:, :4] = False                                                          # a 4-token instruction
    perturbed = h.clone()
    perturbed[:, :4] = torch.randn(2, 4, 64) * 100
    assert torch.equal(model.pool(perturbed, pool_mask), model.pool(h, pool_mask))


def test_changing_the_instruction_changes_the_embedding():
    model = make_model(bidirectional=True)
    a = model.encode(["Jesus wept."], instruction="Find the verse")
    b = model.encode(["Jesus wept."], instruction="Name the book")
    assert not torch.allclose(a, b, atol=1e-4)


def test_encode_masks_exactly_the_prefix_ids_it_placed():
    tokenizer = ByteTokenizer()
    prefix = query_prefix("Find the verse")
    assert prefix == "Instruct: Find the verse\nQuery: "
    ids, prefix_len = encode_with_prefix(tokenizer, prefix, "Jesus wept.")
    assert ids[:prefix_len] == list(prefix.encode()) and ids[prefix_len:] == list(b"Jesus wept.") + [tokenizer.eos_id]
    batch_ids, mask, pool_mask = pad_right([(ids, prefix_len), encode_with_prefix(tokenizer, "", "Amen")],
                                           tokenizer.pad_id)
    assert pool_mask[0].tolist() == [False] * prefix_len + [True] * (len(ids) - prefix_len)
    assert pool_mask[1].tolist() == mask[1].tolist() == [True] * 5 + [False] * (len(ids) - 5)
    model = make_model()
    with torch.no_grad():
        expected = model(batch_ids[:1], mask[:1], pool_mask[:1])
        states = model.hidden_states(batch_ids[:1], mask[:1])
        assert torch.equal(expected, model.pool(states, pool_mask[:1]))
        assert not torch.allclose(expected, model(batch_ids[:1], mask[:1]), atol=1e-4)   # pool_mask is used
    assert torch.allclose(model.encode(["Jesus wept."], instruction="Find the verse"), expected, atol=1e-6)


def test_encode_is_independent_of_batch_size_and_refuses_a_bare_string():
    model = make_model()
    assert torch.allclose(model.encode(TEXTS, batch_size=1), model.encode(TEXTS, batch_size=32), atol=1e-5)
    assert model.encode([]).shape == (0, 64)
    with pytest.raises(TypeError, match="wrap it"):
        model.encode("Jesus wept.")


# ------------------------------------------------------------------------------------------------ pooling baselines
def test_mean_and_last_pooling():
    ids, mask, _ = padded_batch(TEXTS)
    for pooling in ("mean", "last"):
        model = make_model(pooling=pooling)
        assert model.pooling is None
        with torch.no_grad():
            h = model.hidden_states(ids, mask)
            e = model(ids, mask)
        for row in range(3):
            n = int(mask[row].sum())
            expected = h[row, :n].mean(0) if pooling == "mean" else h[row, n - 1]
            assert torch.allclose(e[row], F.normalize(expected, dim=-1), atol=1e-6), (pooling, row)
    raw = make_model(pooling="mean", normalize=False)
    with torch.no_grad():
        assert torch.allclose(raw(ids, mask)[1], raw.hidden_states(ids, mask)[1, :int(mask[1].sum())].mean(0),
                              atol=1e-6)


# ------------------------------------------------------------------------------------------------ parameters
def test_no_weight_decay_covers_latents_norms_embeddings_and_biases():
    names = make_model().no_weight_decay()
    assert {"pooling.latents", "embed.weight", "norm.weight", "pooling.norm_q.weight", "pooling.ff_in.bias",
            "blocks.0.mixer_norm.weight"} <= names
    assert not names & {"pooling.to_q.weight", "pooling.ff_in.weight", "blocks.0.mixer.w_q.weight"}


def test_meta_init_equals_normal_init():
    cfg = tiny_config()
    check_meta_init_equals_init(lambda: EmbeddingModel(cfg), seed=5)


# ------------------------------------------------------------------------------------------------ init_from
def lm_config(**overrides) -> ModelConfig:
    cfg = tiny_config()
    cfg.architecture, cfg.tie_embeddings = "lm", False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_init_from_a_language_model_export_takes_the_backbone(tmp_path):
    torch.manual_seed(1)
    lm = LanguageModel(lm_config())
    export_model(lm, Config(model=lm_config()), tmp_path / "lm")
    model = make_model(seed=2)
    pooling_before = {k: v.clone() for k, v in model.pooling.state_dict().items()}
    load_init_weights(model, tmp_path / "lm")
    lm_state = lm.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("pooling."):
            assert torch.equal(value, pooling_before[key[len("pooling."):]]), key
        else:
            assert torch.equal(value, lm_state[key]), key
    assert "lm_head.weight" in lm_state


def test_init_from_an_embedding_export_takes_everything(tmp_path):
    source = make_model(seed=3)
    export_model(source, Config(model=tiny_config()), tmp_path / "stage1")
    model = make_model(seed=4)
    load_init_weights(model, tmp_path / "stage1")
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_a_mismatched_export_says_what_differs(tmp_path):
    torch.manual_seed(1)
    export_model(LanguageModel(lm_config(dim=32)), Config(model=lm_config(dim=32)), tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"does not fit the embedding model's backbone.*shape mismatches"):
        load_init_weights(make_model(), tmp_path / "small")
    torch.manual_seed(1)
    export_model(LanguageModel(lm_config(depth=1)), Config(model=lm_config(depth=1)), tmp_path / "shallow")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\."):
        load_init_weights(make_model(), tmp_path / "shallow")
    model = make_model()
    state = {**model.state_dict(), "blocks.0.extra.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.extra\.weight"):
        model.load_init_state(state, "init_from=x")


# ------------------------------------------------------------------------------------------------ bundled configs
def test_bundled_configs_follow_the_spec_scales():
    from zoo.config import parse_args

    small = parse_args(["config=nv-embed.yaml"]).config
    m, e, r = small.model, small.model.embedding, small.data.retrieval
    assert (m.architecture, m.dim, m.depth, m.pattern, m.attention.heads, m.vocab_size) == (
        "embedding", 128, 4, ["attention"], 4, 258)
    assert (e.bidirectional, e.pooling, e.num_latents, e.heads, e.mlp_ratio, e.head_dim) == (True, "latent", 128, 4, 4,
                                                                                           32)
    assert (small.data.name, small.data.batch_size, r.hard_negatives, e.temperature, e.in_batch_negatives) == (
        "ict", 32, 1, 0.05, True)
    assert (small.optim.lr, small.trainer.gradient_clip_val) == (5e-4, 1.0)
    model = build_model(small)
    assert sum(p.numel() for p in model.pooling.parameters()) == 128 * 128 + 16 * 128 ** 2 + 15 * 128
    stage1 = parse_args(["config=embed_stage1.yaml"]).config
    stage2 = parse_args(["config=embed_stage2.yaml"]).config
    assert stage1.model.embedding.in_batch_negatives and stage1.data.retrieval.hard_negatives >= 1
    assert not stage2.model.embedding.in_batch_negatives and stage2.init_from == "runs/embed_stage1/model"
    assert (stage1.run.name, stage2.run.name) == ("embed_stage1", "embed_stage2")


def test_nv_embed_starts_from_the_bundled_lm_of_the_same_backbone():
    from zoo.config import parse_args

    embed = parse_args(["config=nv-embed.yaml"]).config
    lm = parse_args(["config=embed_lm.yaml"]).config
    assert embed.init_from == f"{lm.run.root}/embed_lm/model"
    backbone = ("dim", "depth", "pattern", "vocab_size", "mlp", "tie_embeddings")
    assert [getattr(lm.model, k) for k in backbone] == [getattr(embed.model, k) for k in backbone]
    assert lm.model.attention == embed.model.attention.__class__(**{**vars(embed.model.attention), "causal": True})

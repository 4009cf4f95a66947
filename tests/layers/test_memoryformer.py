"""MemoryFormer layers: MemoryLinear, MemoryFFN, MemoryAttention and the ``memoryformer`` block
(docs/memoryformer.md#layers). CPU test scale: d = 64, 2 heads, τ = 4 (K = 16)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import KJV_FIXTURE, check_decode_equals_full, check_future_does_not_leak, check_stream_split
from zoo.config import Config, MemoryFormerConfig, ModelConfig, OptimConfig
from zoo.kernels.hash_lookup import EMBEDDING_BAG_FLOPS, hash_lookup
from zoo.layers.memoryformer import MemoryAttention, MemoryFFN, MemoryLinear, bucket_usage
from zoo.models.lm import LanguageModel, build_block_mlp, build_mixer
from zoo.train.module import LanguageModelTask

DIM, HEADS, TAU = 64, 2, 4


def attention(seed=0, **options):
    torch.manual_seed(seed)
    return MemoryAttention(DIM, HEADS, TAU, **options).double()


def inputs(B=2, T=13, seed=1, dtype=torch.float64):
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------ accounting
def test_memory_linear_parameter_count():
    layer = MemoryLinear(48, 20, tau=4)
    assert layer.tables.shape == (12, 16, 20) and layer.bias.shape == (20,)
    assert sum(p.numel() for p in layer.parameters()) == 12 * 2 ** 4 * 20 + 20
    assert MemoryLinear(48, 20, tau=4, bias=False).bias is None
    assert layer(torch.randn(3, 5, 48)).shape == (3, 5, 20)


def test_memory_ffn_expands_to_k_tau_plus_2_then_contracts_with_tau_plus_2_bits():
    ffn = MemoryFFN(DIM, TAU)
    K = DIM // TAU
    assert (ffn.expand.in_dim, ffn.expand.out_dim, ffn.expand.tau) == (DIM, K * (TAU + 2), TAU)
    assert ffn.expand.tables.shape == (K, 2 ** TAU, K * (TAU + 2))
    assert ffn.contract.tables.shape == (K, 2 ** (TAU + 2), DIM)
    assert ffn.norm.normalized_shape == (K * (TAU + 2),) and ffn.norm.eps == 1e-5
    assert ffn(torch.randn(2, 5, DIM)).shape == (2, 5, DIM)


def test_flop_counter_reports_2_k_dout_per_token():
    tokens, in_dim, out_dim, tau = 30, 64, 48, 8
    layer = MemoryLinear(in_dim, out_dim, tau)
    counter = FlopCounterMode(display=False, custom_mapping=EMBEDDING_BAG_FLOPS)
    with counter, torch.no_grad():
        layer(torch.randn(tokens, in_dim))
    assert counter.get_total_flops() == 2 * (in_dim // tau) * out_dim * tokens  # vs 2·in·out for nn.Linear


def test_init_follows_the_released_code():
    torch.manual_seed(0)
    layer, mixer = MemoryLinear(256, 256, 8), MemoryAttention(256, 4, 8)
    assert abs(layer.tables.std().item() - 0.02) < 1e-3
    assert abs(mixer.tables_qkv.std().item() - (2 / (5 * 256)) ** 0.5) < 1e-3
    assert abs(layer.bias.std().item() - 0.001) < 2e-4 and abs(mixer.bias_qkv.std().item() - 0.001) < 2e-4


@pytest.mark.parametrize("cls, args", [(MemoryLinear, (DIM, 8, TAU)), (MemoryFFN, (DIM, TAU)),
                                       (MemoryAttention, (DIM, HEADS, TAU))])
def test_meta_build_then_reset_equals_direct_build(cls, args):
    torch.manual_seed(3)
    direct = cls(*args)
    torch.manual_seed(3)
    with torch.device("meta"):
        deferred = cls(*args)
    deferred.to_empty(device="cpu")
    deferred.reset_parameters()
    for (name, a), b in zip(direct.state_dict().items(), deferred.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("build", [lambda: MemoryLinear(30, 8, tau=4), lambda: MemoryFFN(30, 4),
                                   lambda: MemoryAttention(30, 2, 4)])
def test_input_dims_not_divisible_by_tau_is_a_clear_error(build):
    with pytest.raises(ValueError, match="input dims not divisible by tau: .*=30 .* tau=4"):
        build()


@pytest.mark.parametrize("build, message", [
    (lambda: MemoryLinear(32, 8, tau=0), r"tau must be an int in \[1, 16\]"),
    (lambda: MemoryLinear(34, 8, tau=17), r"tau must be an int in \[1, 16\]"),
    (lambda: MemoryFFN(30, 15), "tau must be <= 14"),
    (lambda: MemoryAttention(64, 3, 4), r"dim \(64\) must be divisible by heads \(3\)"),
    (lambda: MemoryAttention(64, 2, 4, rotary_pct=1.5), r"rotary_pct must be in \[0, 1\]"),
    (lambda: MemoryLinear(32, 8, tau=4, score="softmax"), "score must be one of 'prob', 'l1prob'"),
])
def test_invalid_layer_options_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match="x has 12 features, expected in_dim=16"):
        MemoryLinear(16, 4, tau=4)(torch.randn(2, 12))


# ------------------------------------------------------------------------------------------------------ attention
def test_shared_hash_equals_three_separate_lookups():
    mixer = attention()
    x = inputs(T=6)
    q, k, v = mixer.project(x, torch.zeros(2, 6, dtype=torch.long))  # position 0: RoPE is the identity
    tables = mixer.tables_qkv.split(DIM, dim=-1)
    biases = mixer.bias_qkv.split(DIM)
    for got, table, bias in zip((q, k, v), tables, biases):
        separate = hash_lookup(x, table.contiguous(), TAU, bias, backend="reference")  # (B, T, D)
        torch.testing.assert_close(got.reshape(2, 6, DIM), separate, atol=1e-12, rtol=1e-12)


def test_no_output_projection():
    names = {name for name, _ in attention().named_parameters()}
    assert names == {"tables_qkv", "bias_qkv"}
    assert not any(isinstance(m, (torch.nn.Linear, MemoryLinear)) for m in attention().modules())


def test_stream_split_equals_full():
    check_stream_split(attention(), inputs(), splits=[1, 5, 12], tol=1e-12)


def test_decode_equals_full():
    check_decode_equals_full(attention(), inputs(T=9), tol=1e-12)


def test_future_does_not_leak():
    check_future_does_not_leak(attention().float(), inputs(dtype=torch.float32), t=6)


def test_state_is_the_kv_cache():
    mixer = attention()
    _, state = mixer(inputs(T=7))
    assert state.k.shape == state.v.shape == (2, 7, HEADS, DIM // HEADS)
    assert state.positions.tolist() == [list(range(7))] * 2


def test_partial_rotary_rotates_only_the_first_fraction_of_channels():
    mixer = attention(rotary_pct=0.25)
    head_dim = DIM // HEADS
    assert mixer.rotary_dims == head_dim // 4
    assert MemoryAttention(40, 4, 4, rotary_pct=0.25).rotary_dims == 2  # 0.25 · 10 = 2.5 → 2 (even)
    x = inputs(T=4)
    at_zero = mixer.project(x, torch.zeros(2, 4, dtype=torch.long))
    at_five = mixer.project(x, torch.full((2, 4), 5))
    r = mixer.rotary_dims
    for a, b in zip(at_zero[:2], at_five[:2]):  # q, k: only the first r channels move
        assert torch.equal(a[..., r:], b[..., r:]) and not torch.allclose(a[..., :r], b[..., :r])
    assert torch.equal(at_zero[2], at_five[2])  # v is never rotated
    no_rope = attention(rotary_pct=0.0)
    assert no_rope.rotary is None
    shifted = no_rope.project(x, torch.full((2, 4), 5))
    assert all(torch.equal(a, b) for a, b in zip(no_rope.project(x, torch.zeros(2, 4, dtype=torch.long)), shifted))


def test_score_option_changes_the_weighting():
    x = inputs(T=5)
    y_prob, _ = attention(score="prob")(x)
    y_l1, _ = attention(score="l1prob")(x)
    assert not torch.allclose(y_prob, y_l1)
    layer = MemoryLinear(DIM, 8, TAU, score="l1prob", bias=False).double()
    # l1prob: s = ‖z‖₁ p grows with the input scale; prob: s = p < 1 stays bounded
    assert layer(3 * x).norm() > 2 * layer(x).norm()


def test_config_section_reaches_both_layers():
    section = MemoryFormerConfig(heads=2, tau=4, score="prob", temperature=2.0, table_weight_decay=0.0, rotary_pct=0.5)
    config = ModelConfig(dim=DIM, memoryformer=section)
    mixer = build_mixer("memoryformer", config)
    assert (mixer.heads, mixer.tau, mixer.score, mixer.temperature, mixer.rotary_dims) == (2, 4, "prob", 2.0, 16)
    assert mixer.weight_decay_overrides == {"tables_qkv": 0.0}
    ffn = build_block_mlp("memoryformer", config, hidden=0)
    assert (ffn.tau, ffn.expand.score, ffn.contract.score) == (4, "prob", "prob")
    assert ffn.expand.temperature == ffn.contract.temperature == 2.0
    assert ffn.contract.weight_decay_overrides == {"tables": 0.0}
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    expected = hash_lookup(x, ffn.expand.tables.double(), 4, ffn.expand.bias.double(), score="prob", temperature=2.0,
                           backend="reference")
    torch.testing.assert_close(ffn.expand.double()(x), expected, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------------ model
def tiny_model(seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(dim=DIM, depth=2, pattern=["memoryformer"],
                                     memoryformer=MemoryFormerConfig(heads=HEADS, tau=TAU)))


def test_model_blocks_are_memory_attention_and_memory_ffn():
    model = tiny_model()
    assert all(isinstance(b.mixer, MemoryAttention) and isinstance(b.mlp, MemoryFFN) for b in model.blocks)
    tables = {n for n, p in model.named_parameters() if n.endswith(("tables", "tables_qkv"))}
    assert len(tables) == 2 * 3


@pytest.mark.parametrize("table_weight_decay", [0.1, 0.0])
def test_hash_tables_decay_at_table_weight_decay_whatever_optim_weight_decay(table_weight_decay):
    section = MemoryFormerConfig(heads=HEADS, tau=TAU, table_weight_decay=table_weight_decay)
    config = Config(model=ModelConfig(dim=DIM, depth=2, pattern=["memoryformer"], memoryformer=section),
                    optim=OptimConfig(weight_decay=0.3))
    task = LanguageModelTask(config)
    optimizer = task.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in task.model.named_parameters():
        if name.endswith(("tables", "tables_qkv")):
            assert decay_of[id(param)] == table_weight_decay, name
        elif name.endswith("embed.weight") or param.dim() < 2:
            assert decay_of[id(param)] == 0.0, name
        else:
            assert decay_of[id(param)] == 0.3, name                          # dense matrices keep optim's
    assert len(decay_of) == sum(1 for _ in task.model.parameters())


def test_model_streaming_equals_full():
    model = tiny_model().double()
    ids = torch.randint(0, 258, (2, 12), generator=torch.Generator().manual_seed(0))
    full, _ = model(ids)
    first, state = model(ids[:, :7])
    second, _ = model(ids[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-10, rtol=1e-10)


def test_language_model_trains_and_reports_bucket_usage():
    """2 blocks at the CPU test scale on the byte fixture: the loss decreases in 30 AdamW steps (tables no decay)."""
    text = KJV_FIXTURE.read_bytes()[:200_000]
    data = torch.tensor(list(text), dtype=torch.long)
    model = tiny_model()
    no_decay = model.no_weight_decay()
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=generator)
        window = torch.stack([data[s:s + 65] for s in starts.tolist()])  # (8, 65)
        logits, _ = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    usage = bucket_usage(model, window[:, :-1])
    assert set(usage) == {f"blocks.{i}.{part}" for i in range(2)
                          for part in ("mixer", "mlp.expand", "mlp.contract")}
    assert all(0.0 < fraction <= 1.0 for fraction in usage.values()), usage


def test_memoryformer_layers_compile_fullgraph_free_of_host_syncs():
    """No ``.item()`` or value branches in forward: a graph break would fail ``fullgraph=True``."""
    pytest.importorskip("torch._dynamo")
    mixer = attention().float()
    x = inputs(T=5, dtype=torch.float32)
    explanation = torch._dynamo.explain(mixer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    explanation = torch._dynamo.explain(MemoryFFN(DIM, TAU))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_dataclass_defaults_build_the_paper_layer():
    section = MemoryFormerConfig()
    assert dataclasses.asdict(section) == {"heads": 4, "tau": 8, "score": "l1prob", "temperature": 1.0,
                                           "table_weight_decay": 0.1, "rotary_pct": 0.25}     # the released recipe

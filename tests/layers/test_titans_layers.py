"""Layer-level tests of the Titans mixers (docs/titans.md#tests): TitansMemory and the MAC / MAG / MAL hybrids.

The ops are tested in tests/kernels/test_titans_*_memory.py; here: the mixer contract (streaming over
any split, decode, causality including MAC's two traps, batch independence), parameters, config fields, training.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import check_decode_equals_full, check_future_does_not_leak, check_stream_split, rel_err
from tests.layers.contract import check_meta_init_equals_init
from zoo.config import ModelConfig, TitansMACConfig, TitansMAGConfig, TitansMemoryConfig, TitansWindowConfig
from zoo.layers.titans import TitansMemory, TitansState
from zoo.layers.titans_hybrids import MACState, TitansMAC, TitansMAG, TitansMAL
from zoo.models.lm import LanguageModel, build_mixer

F64 = torch.float64
DIM, HEADS, CHUNK = 32, 2, 8
MEMORY = dict(chunk_size=CHUNK)


def _seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


def _lively(module: torch.nn.Module) -> torch.nn.Module:
    """Raise the memory's learning rates and forgetting so the test inputs move the memory a lot."""
    for sub in module.modules():
        if isinstance(sub, TitansMemory):
            with torch.no_grad():
                bias = sub.w_gate.bias.view(sub.heads, len(sub.gate_names))
                for column, name in enumerate(sub.gate_names):
                    bias[:, column] = {"alpha": -2.0, "eta": 0.5, "theta": 0.0}[name]
    return module


def lmm(depth=2, **options):
    return _seeded(lambda: _lively(TitansMemory(DIM, HEADS, memory_depth=depth, **{**MEMORY, **options})).double())


def mac(**memory):
    return _seeded(lambda: _lively(TitansMAC(DIM, HEADS, segment_len=16, persistent_tokens=3,
                                             memory={**MEMORY, **memory})).double())


def mag(**memory):
    return _seeded(lambda: _lively(TitansMAG(DIM, HEADS, window=6, persistent_tokens=3,
                                             memory={**MEMORY, **memory})).double())


def mal(**memory):
    return _seeded(lambda: _lively(TitansMAL(DIM, HEADS, window=6, persistent_tokens=3,
                                             memory={**MEMORY, **memory})).double())


HYBRIDS = {"mac": mac, "mag": mag, "mal": mal}


def titans_sections(heads=HEADS, chunk_size=CHUNK, segment_len=16, window=8, persistent_tokens=2) -> dict:
    """``ModelConfig`` sections of the four Titans mixers sharing these options (memory: heads and chunk_size)."""
    memory = TitansMemoryConfig(heads=heads, chunk_size=chunk_size)
    return dict(titans=memory,
                titans_mac=TitansMACConfig(heads, segment_len, persistent_tokens, dataclasses.replace(memory)),
                titans_mag=TitansMAGConfig(heads, window, persistent_tokens, dataclasses.replace(memory)),
                titans_mal=TitansWindowConfig(heads, window, persistent_tokens, dataclasses.replace(memory)))


def _x(T=37, B=2, dtype=F64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIM, generator=generator, dtype=dtype)


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("depth", [1, 2])
def test_stream_split_equals_full_at_every_split(depth):
    """T = 37 with b = 8: every split t in 0..T (most inside a chunk) equals one call, fp64 <= 1e-10."""
    layer, x = lmm(depth), _x()
    with torch.no_grad():
        check_stream_split(layer, x, range(0, x.shape[1] + 1), tol=1e-10)


@pytest.mark.parametrize("depth", [1, 3])
def test_three_way_split_equals_full(depth):
    layer, x = lmm(depth), _x()
    with torch.no_grad():
        full, _ = layer(x)
        for cuts in ((3, 11), (8, 16), (13, 14), (0, 30), (21, 37)):
            pieces, state = [], None
            for start, stop in zip((0, *cuts), (*cuts, x.shape[1])):
                y, state = layer(x[:, start:stop], state)
                pieces.append(y)
            assert rel_err(torch.cat(pieces, dim=1), full) < 1e-10, cuts


@pytest.mark.parametrize("depth", [1, 2])
def test_decode_equals_full(depth):
    layer, x = lmm(depth), _x()
    with torch.no_grad():
        check_decode_equals_full(layer, x, tol=1e-10)
        check_decode_equals_full(layer.float(), x.float(), tol=1e-5)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_stream_split_equals_full(name):
    """Splits inside a chunk, on a chunk boundary, inside a segment and on a segment boundary (C = 16, b = 8)."""
    layer, x = HYBRIDS[name](), _x()
    with torch.no_grad():
        check_stream_split(layer, x, (0, 1, 5, 8, 13, 16, 19, 24, 32, 35, 37), tol=1e-10)
        full, _ = layer(x)
        pieces, state = [], None
        for start, stop in ((0, 3), (3, 20), (20, 21), (21, 37)):
            y, state = layer(x[:, start:stop], state)
            pieces.append(y)
        assert rel_err(torch.cat(pieces, dim=1), full) < 1e-10


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_decode_equals_full(name):
    layer, x = HYBRIDS[name](), _x(T=35)
    with torch.no_grad():
        check_decode_equals_full(layer, x, tol=1e-10)


def test_state_is_batch_first_and_holds_pending_tokens():
    layer, x = lmm(2), _x(T=21)
    with torch.no_grad():
        _, state = layer(x)
    assert isinstance(state, TitansState)
    d, E = DIM // HEADS, 4 * DIM // HEADS
    assert [tuple(w.shape) for w in state.weights] == [(2, HEADS, d, E), (2, HEADS, E, d)]
    assert state.pending_k.shape == state.pending_v.shape == (2, 21 % CHUNK, HEADS, d)
    assert state.pending_gates.shape == (2, 21 % CHUNK, HEADS, 2 + 2)
    assert state.conv.shape == (2, 3, 3 * DIM)
    with torch.no_grad():
        _, mac_state = mac()(x)
    assert isinstance(mac_state, MACState) and mac_state.token_k.shape[1] == 21 - 16   # one partial segment


# ------------------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("name", ["lmm1", "lmm2", "mac", "mag", "mal"])
def test_future_does_not_leak(name):
    """T = 40 spans 5 chunks and 3 segments; resampling x[:, t+1:] leaves outputs[:, :t+1] bitwise unchanged."""
    layer = {"lmm1": lambda: lmm(1), "lmm2": lambda: lmm(2), **HYBRIDS}[name]()
    x = _x(T=40)
    with torch.no_grad():
        for t in (0, 5, 7, 12, 15, 16, 26, 38):
            check_future_does_not_leak(layer, x, t)


def _perturb_one(layer, x, position):
    with torch.no_grad():
        y1, _ = layer(x)
        x2 = x.clone()
        x2[:, position] += torch.randn_like(x2[:, position])
        y2, _ = layer(x2)
    return y1, y2


def test_mac_trap_i_memory_tokens_are_causal():
    """Trap (i): h_{j+1} depends on x_{j+1}; the MAC output at j must not see it (h is masked causally)."""
    layer, x = mac(), _x(T=40)
    for j in (16, 20, 30):   # inside the second segment (tokens 16..31)
        y1, y2 = _perturb_one(layer, x, j + 1)
        assert torch.equal(y1[:, :j + 1], y2[:, :j + 1])
        assert not torch.allclose(y1[:, j + 1], y2[:, j + 1])


def test_mac_trap_ii_readout_is_per_token():
    """Trap (ii): perturb a token inside a chunk; the earlier positions of that chunk (and segment) stay unchanged."""
    layer, x = mac(), _x(T=40)
    for j in (19, 22, 29):   # chunks 16..23 and 24..31 of the second segment
        y1, y2 = _perturb_one(layer, x, j)
        chunk_start = (j // CHUNK) * CHUNK
        assert torch.equal(y1[:, chunk_start:j], y2[:, chunk_start:j])
        assert not torch.allclose(y1[:, j], y2[:, j])


def test_mac_attention_does_not_cross_segments_but_memory_does():
    """Segment 0 reaches segment 1 through the memory: the first token of segment 1 depends on x_3 through the read
    of Φ_0. With a frozen memory (α = θ = 0) only the y stream's short conv still spans the boundary, so outputs from
    position 16 + conv_size − 1 on no longer depend on x_3: attention never crosses a segment."""
    layer, x = mac(), _x(T=32)
    y1, y2 = _perturb_one(layer, x, 3)
    assert not torch.allclose(y1[:, 16], y2[:, 16])
    with torch.no_grad():
        bias = layer.lmm.w_gate.bias.view(HEADS, -1)
        bias[:, 0], bias[:, 2:] = -1e4, -1e4   # α = θ = sigmoid(-1e4) = 0: the memory never changes
    y1, y2 = _perturb_one(layer, x, 3)
    first_free = 16 + layer.lmm.conv_size - 1
    assert torch.equal(y1[:, first_free:], y2[:, first_free:])
    assert not torch.allclose(y1[:, 15], y2[:, 15])


@pytest.mark.parametrize("name", ["lmm", "mac", "mag", "mal"])
def test_batch_samples_are_independent(name):
    layer = {"lmm": lambda: lmm(2), **HYBRIDS}[name]()
    x = _x(T=30)
    with torch.no_grad():
        y1, _ = layer(x)
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        y2, _ = layer(x2)
    assert torch.equal(y1[0], y2[0])
    assert not torch.allclose(y1[1], y2[1])


# ------------------------------------------------------------------------------------------------ memory maths
def test_layer_chunk_path_matches_token_loop_with_gradients():
    """The layer on backend='torch' (chunk dual form) equals backend='reference' (token loop, autograd gradients at
    the chunk-start weights) in outputs and in the gradients of x and every parameter, fp64 <= 1e-9."""
    results = []
    for backend in ("torch", "reference"):
        layer = lmm(2, chunk_size=4, backend=backend)
        x = _x(T=13).requires_grad_()
        y, _ = layer(x)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        (y * weights).sum().backward()
        results.append((y, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert rel_err(y, y_ref) < 1e-9 and rel_err(dx, dx_ref) < 1e-9
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < 1e-9, name


def test_every_parameter_gets_a_gradient():
    """W_k and W_v learn through the memory (no detached keys/values), M_0 and every gate column too."""
    for layer in (lmm(1), lmm(2), mac(), mag(), mal()):
        x = _x(T=20)
        y, _ = layer(x)
        y.pow(2).sum().backward()
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{type(layer).__name__}.{name}"


@pytest.mark.parametrize("depth", [1, 2])
def test_outputs_and_gradients_finite_at_saturated_gates(depth):
    """fp32, T = 512: α, η saturated at exactly 0 or 1 (gate biases ±30) keep outputs and gradients finite.

    θ stays at its initial ≈ 0.1: θ = θ_max with b = 16 is a batch GD step of size 16·θ_max on unit keys and diverges
    by design (the op-level extremes test covers θ = θ_max numerics; docs/titans.md#numerics).
    """
    for alpha_bias, eta_bias in ((30.0, -30.0), (-30.0, 30.0), (-30.0, -30.0), (30.0, 30.0)):
        layer = _seeded(lambda: TitansMemory(DIM, HEADS, memory_depth=depth, chunk_size=16))
        with torch.no_grad():
            bias = layer.w_gate.bias.view(HEADS, -1)
            bias[:, 0], bias[:, 1] = alpha_bias, eta_bias
        x = _x(T=512, B=1, dtype=torch.float32).requires_grad_()
        y, _ = layer(x)
        y.pow(2).mean().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_outputs_and_gradients_finite_under_nan_poisoning(request):
    layers = [lmm(1).float(), lmm(2).float(), mac().float()]
    request.getfixturevalue("nan_poisoned_empty")
    for layer in layers:
        x = _x(T=21, dtype=torch.float32).requires_grad_()
        y, state = layer(x[:, :9])
        y2, _ = layer(x[:, 9:], state)
        torch.cat([y, y2], dim=1).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(y2).all() and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ parameters
def test_per_head_initial_memory_updates_separately():
    """heads = 4: M_0 is a real (H, in, out) parameter; optimizer.step() succeeds and moves each head's slice
    differently (regression for the stride-0 `repeat` view of lucidrains/titans-pytorch#64)."""
    layer = _seeded(lambda: TitansMemory(DIM, 4, chunk_size=CHUNK))
    before = [w.detach().clone() for w in layer.memory_weights]
    assert all(0 not in w.stride() for w in layer.memory_weights)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    y, _ = layer(_x(T=20, dtype=torch.float32))
    y.pow(2).sum().backward()
    optimizer.step()
    for old, new in zip(before, layer.memory_weights):
        steps = (new.detach() - old).flatten(1)   # (H, in·out)
        assert (steps.abs().sum(1) > 0).all()
        assert not torch.allclose(steps[0], steps[1])


def test_state_dict_round_trips():
    for make in (lambda: lmm(2), mac, mag, mal):
        source, x = make(), _x(T=20)
        target = _seeded(make, seed=5)
        target.load_state_dict(source.state_dict())
        with torch.no_grad():
            assert torch.equal(source(x)[0], target(x)[0])


@pytest.mark.parametrize("cls", [TitansMemory, TitansMAC, TitansMAG, TitansMAL])
def test_meta_init_then_reset_equals_normal_build(cls):
    def build():
        return cls(DIM, HEADS) if cls is TitansMemory else cls(DIM, HEADS, persistent_tokens=3)

    _, reference = check_meta_init_equals_init(build, seed=7)
    again = _seeded(build, seed=8)
    torch.manual_seed(7)
    again.reset_parameters()   # reproducible under a seed
    for (name, a), (_, b) in zip(reference.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_initial_gates_follow_the_spec():
    layer = _seeded(lambda: TitansMemory(DIM, HEADS, theta_max=0.5))
    alpha, eta, theta = layer._gates(torch.zeros(1, 1, DIM))
    assert torch.allclose(alpha, torch.tensor(0.01), atol=1e-3)
    assert torch.allclose(eta, torch.tensor(0.5)) and theta.shape[-1] == 2
    assert torch.allclose(theta, torch.tensor(0.05), atol=5e-3)


@pytest.mark.parametrize("make, match", [
    (lambda: TitansMAC(DIM, HEADS, segment_len=20, memory=dict(chunk_size=16)), "segment_len"),
    (lambda: TitansMAC(DIM, HEADS, memory=dict(chunk=16)), "unknown memory option 'chunk'"),
    (lambda: TitansMemory(30, 4), "dim"),
    (lambda: TitansMemory(DIM, HEADS, chunk_size=0), "chunk_size"),
    (lambda: TitansMemory(DIM, HEADS, memory_depth=0), "memory_depth"),
    (lambda: TitansMemory(DIM, HEADS, theta_max=0.0), "theta_max"),
    (lambda: TitansMAG(DIM, HEADS, window=0), "window"),
    (lambda: TitansMAL(DIM, HEADS, persistent_tokens=-1), "persistent_tokens"),
])
def test_bad_arguments_raise_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match="dim=32"):
        lmm(2)(torch.randn(1, 4, DIM + 1, dtype=F64))


# ------------------------------------------------------------------------------------------------ config fields
def _config(name: str, **changes) -> ModelConfig:
    sections = titans_sections()
    sections[name] = dataclasses.replace(sections[name], **changes)
    return ModelConfig(dim=DIM, **sections)


@pytest.mark.parametrize("name, field, value", [
    ("titans", "heads", 4), ("titans", "head_dim", 8), ("titans", "memory_depth", 1),
    ("titans", "memory_expansion", 2), ("titans", "chunk_size", 4), ("titans", "conv_size", 2),
    ("titans", "momentum", False), ("titans", "forget", False), ("titans", "theta_max", 0.2),
    ("titans_mac", "segment_len", 8), ("titans_mac", "persistent_tokens", 5),
    ("titans_mag", "window", 3), ("titans_mag", "persistent_tokens", 5),
    ("titans_mal", "window", 3), ("titans_mal", "persistent_tokens", 0),
    ("titans_mac", "store", "attention"), ("titans_mac", "store", "attention_norm"),
    ("titans_mac", "memory_token_norm", False), ("titans_mac", "out_proj", False), ("titans_mac", "conv_size", 0),
    ("titans_mag", "out_proj", False), ("titans_mag", "conv_size", 0), ("titans_mag", "memory_persistent", False),
    ("titans_mal", "conv_size", 0), ("titans_mal", "memory_persistent", False),
])
def test_every_config_field_changes_the_mixer(name, field, value):
    """Each field of a Titans section reaches the mixer the model builds from it: parameter shapes or outputs
    change."""
    x = _x(T=24, dtype=torch.float32)

    def run(config):
        layer = _seeded(lambda: build_mixer(name, config))
        with torch.no_grad():
            return {n: p.shape for n, p in layer.named_parameters()}, layer(x)[0]

    (shapes, y), (shapes2, y2) = run(_config(name)), run(_config(name, **{field: value}))
    assert shapes != shapes2 or not torch.allclose(y, y2)


def test_momentum_and_forget_off_remove_their_gate_columns():
    layer = TitansMemory(DIM, HEADS, memory_depth=2, momentum=False, forget=False)
    assert layer.w_gate.out_features == HEADS * 2
    alpha, eta, theta = layer._gates(torch.randn(1, 3, DIM))
    assert not alpha.any() and not eta.any() and theta.shape == (1, 3, HEADS, 2)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("pattern", [["titans"], ["titans_mac"], ["titans_mag"], ["titans_mal"]])
def test_language_model_trains(pattern):
    """A 1-block LanguageModel with heads = 2 takes optimizer steps and its loss falls on a repeating sequence."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, dim=DIM, depth=1, pattern=pattern,
                         **titans_sections(heads=2, chunk_size=8, segment_len=16, window=8, persistent_tokens=2))
    model = LanguageModel(config)
    tokens = torch.randint(0, 32, (1, 12)).repeat(4, 3)[:, :33]  # (4, 33): period 12
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_language_model_generate_with_titans_state():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, dim=DIM, depth=2, pattern=["titans_mac", "titans"],
                         **titans_sections(heads=2, chunk_size=4, segment_len=8, persistent_tokens=2))
    model = LanguageModel(config).eval()
    prompt = torch.randint(0, 32, (2, 5))
    out = model.generate(prompt, max_new_tokens=7)
    # greedy decoding with the carried state equals re-running the whole prefix each step
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


def test_lmm_has_no_graph_breaks():
    """torch._dynamo traces the whole TitansMemory forward (torch path) in one graph."""
    torch._dynamo.reset()
    layer = _seeded(lambda: TitansMemory(DIM, HEADS, chunk_size=CHUNK))
    explanation = torch._dynamo.explain(layer)(_x(T=16, dtype=torch.float32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("depth", [1, 2])
def test_activation_checkpointing_gives_identical_results(depth):
    """checkpoint_chunks = 2 (groups of 2 chunks recomputed in backward) changes neither outputs nor gradients,
    also when the call starts mid-chunk from a state."""
    results = []
    for groups in (0, 2):
        layer = lmm(depth, checkpoint_chunks=groups)
        x = _x(T=45).requires_grad_()
        _, state = layer(x[:, :5].detach())
        y, new_state = layer(x[:, 5:], state)
        (y.pow(2).sum() + new_state.weights[0].sum()).backward()
        results.append((y, new_state.weights[0], x.grad, [p.grad for p in layer.parameters()]))
    (y, w, dx, grads), (y2, w2, dx2, grads2) = results
    assert rel_err(y2, y) < 1e-12 and rel_err(w2, w) < 1e-12 and rel_err(dx2, dx) < 1e-12
    assert all(rel_err(b, a) < 1e-12 for a, b in zip(grads, grads2))

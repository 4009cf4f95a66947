"""Tests of the deep (L ≥ 2) Titans memory op ``titans_mlp_memory`` (docs/titans.md#deep-memory and #tests)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import F64, assert_finite, random_functional
from tests.kernels.kit import titans_mlp_inputs as make_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.titans_linear_memory import _chunk_gate_coefficients
from zoo.kernels.titans_mlp_memory import (MLPMemoryState, _chunk_readout, _chunk_store_pass, _memory_mlp,
                                           titans_mlp_memory, titans_mlp_memory_reference)


def _outputs(o, state):
    return [o, *state.weights, *state.momentum]


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_torch_matches_reference_fp64_with_gradients(layers, chunk_size):
    inputs, weights = make_inputs(T=37, d=4, E=8, L=layers, seed=layers + chunk_size)
    results = {}
    for backend in ("reference", "torch"):
        leaves = [x.clone().requires_grad_() for x in inputs + weights]
        o, state = titans_mlp_memory(*leaves[:6], leaves[6:], chunk_size=chunk_size, backend=backend)
        outputs = _outputs(o, state)
        results[backend] = outputs + list(torch.autograd.grad(random_functional(outputs, seed=321), leaves))
    names = ["o"] + [f"W{i}" for i in range(layers)] + [f"S{i}" for i in range(layers)]
    names += ["dq", "dk", "dv", "dalpha", "deta", "dtheta"] + [f"dW0_{i}" for i in range(layers)]
    for name, got, want in zip(names, results["torch"], results["reference"]):
        assert rel_rms_error(got, want) <= 1e-9, name


@pytest.mark.parametrize("layers", [2, 3])
def test_torch_without_autograd_equals_with_it(layers):
    """Without autograd the chunk loop writes the states into two alternating buffers per tensor; it must give the
    outputs and final state of the autograd path (which allocates every chunk's state), also when streaming on."""
    inputs, weights = make_inputs(T=45, d=4, E=8, L=layers, seed=7)
    with_grad = titans_mlp_memory(*inputs, weights, chunk_size=4, backend="torch")
    with torch.no_grad():
        without = titans_mlp_memory(*inputs, weights, chunk_size=4, backend="torch")
        head = titans_mlp_memory(*(x[:, :21] for x in inputs), weights, chunk_size=4, backend="torch")
        tail = titans_mlp_memory(*(x[:, 21:] for x in inputs), weights, chunk_size=4, initial_state=head[1],
                                 backend="torch")
    for got, want in zip(_outputs(*without), _outputs(*with_grad)):
        assert torch.equal(got, want)
    streamed = torch.cat([head[0], tail[0]], dim=1)
    assert rel_rms_error(streamed, with_grad[0]) <= 1e-12
    for got, want in zip(_outputs(*tail)[1:], _outputs(*with_grad)[1:]):
        assert rel_rms_error(got, want) <= 1e-12


def test_torch_fp32_matches_fp64_reference():
    inputs, weights = make_inputs(T=64, L=2, seed=5)
    o_ref, state_ref = titans_mlp_memory_reference(*inputs, weights, chunk_size=16)
    o, state = titans_mlp_memory(*(x.float() for x in inputs), [w.float() for w in weights], chunk_size=16)
    assert o.dtype == torch.float32 and all(w.dtype == torch.float32 for w in state.weights)
    for got, want in zip(_outputs(o, state), _outputs(o_ref, state_ref)):
        assert rel_rms_error(got, want) <= 1e-5


@pytest.mark.parametrize("layers", [2, 3])
def test_dual_form_readout_equals_materialised_token_weights(layers):
    inputs, weights = make_inputs(B=2, T=16, H=2, d=4, E=8, L=layers, seed=6)
    q, k, v, alpha, eta, theta = inputs
    gen = torch.Generator().manual_seed(7)
    W = [w.unsqueeze(0).expand(2, *w.shape) + 0.1 * torch.randn(2, *w.shape, generator=gen, dtype=F64)
         for w in weights]
    S = [0.1 * torch.randn(2, *w.shape, generator=gen, dtype=F64) for w in weights]
    coef = _chunk_gate_coefficients(alpha, eta, 16, F64)
    Q, K, V = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, b, d)
    th = theta.permute(0, 2, 1, 3)  # (B, H, b, L)
    G, beta, f = coef["G"][:, :, 0], coef["beta"][:, :, 0, :, None], coef["f"][:, :, 0, :, None]
    acts, grads = _chunk_store_pass(K, V, W)
    gammas = [G * th[..., layer][..., None, :] for layer in range(layers)]
    dual = _chunk_readout(Q, W, S, acts, grads, gammas, beta, f)  # (B, H, b, d)
    for i in range(16):
        token_weights = [beta[:, :, i, :, None] * w + f[:, :, i, :, None] * s
                         - torch.einsum("bhs,bhsi,bhso->bhio", gamma[:, :, i], a, g)
                         for w, s, a, g, gamma in zip(W, S, acts, grads, gammas)]
        materialised = _memory_mlp(Q[:, :, i:i + 1], token_weights)[:, :, 0]  # (B, H, d)
        assert (dual[:, :, i] - materialised).abs().max() <= 1e-12


def test_chunk_size_one_equals_online_gradient_descent():
    inputs, weights = make_inputs(B=1, T=20, H=2, d=4, E=8, L=2, seed=8)
    q, k, v, alpha, eta, theta = inputs
    W = [w.unsqueeze(0) for w in weights]
    S = [torch.zeros_like(w) for w in W]
    expected = []
    for t in range(q.shape[1]):  # v1 eqs. 13-14, gradient at W_{t-1}
        leaves = [w.detach().requires_grad_() for w in W]
        k_t, v_t = k[:, t, :, None, :], v[:, t, :, None, :]
        hidden = torch.nn.functional.gelu(k_t @ leaves[0])
        pred = k_t + torch.nn.functional.layer_norm(hidden @ leaves[1], (4,), eps=1e-5)
        grads = torch.autograd.grad((pred - v_t).pow(2).sum(), leaves)
        S = [eta[:, t, :, None, None] * s - theta[:, t, :, layer, None, None] * g
             for layer, (s, g) in enumerate(zip(S, grads))]
        W = [(1 - alpha[:, t, :, None, None]) * w + s for w, s in zip(W, S)]
        expected.append(_memory_mlp(q[:, t, :, None, :], W)[:, :, 0])
    o, state = titans_mlp_memory(*inputs, weights, chunk_size=1, backend="torch")
    assert rel_rms_error(o, torch.stack(expected, dim=1)) <= 1e-12
    for got, want in zip(state.weights, W):
        assert rel_rms_error(got, want) <= 1e-12


def _split_run(inputs, weights, cuts, chunk_size, backend="torch"):
    outputs, state = [], None
    for start, stop in zip(cuts[:-1], cuts[1:]):
        o, state = titans_mlp_memory(*(x[:, start:stop] for x in inputs), weights, chunk_size=chunk_size,
                                     initial_state=state, backend=backend)
        outputs.append(o)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("dtype,tolerance", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_stream_split_equals_full(dtype, tolerance):
    inputs, weights = make_inputs(T=37, L=2, dtype=dtype, seed=9)
    full_o, full_state = titans_mlp_memory(*inputs, weights, chunk_size=16)
    for split in range(38):  # every split, inside chunks included
        o, state = _split_run(inputs, weights, [0, split, 37], 16)
        assert rel_rms_error(o, full_o) <= tolerance, split
        for got, want in zip(_outputs(o, state)[1:], _outputs(full_o, full_state)[1:]):
            assert rel_rms_error(got, want) <= tolerance, split
        assert torch.equal(state.pending_k, full_state.pending_k)
    for cuts in ([0, 3, 20, 37], [0, 16, 17, 37], [0, 15, 31, 37]):
        o, _ = _split_run(inputs, weights, cuts, 16)
        assert rel_rms_error(o, full_o) <= tolerance, cuts


def test_token_by_token_decode_equals_full():
    inputs, weights = make_inputs(T=37, L=3, d=4, E=8, seed=10)
    full_o, _ = titans_mlp_memory(*inputs, weights, chunk_size=4)
    o, _ = _split_run(inputs, weights, list(range(38)), 4)
    assert rel_rms_error(o, full_o) <= 1e-10


def test_reference_stream_split_equals_full():
    inputs, weights = make_inputs(T=21, L=2, d=4, E=8, seed=11)
    full_o, full_state = titans_mlp_memory_reference(*inputs, weights, chunk_size=8)
    o, state = _split_run(inputs, weights, [0, 5, 13, 21], 8, backend="reference")
    assert rel_rms_error(o, full_o) <= 1e-12
    assert all(rel_rms_error(a, b) <= 1e-12 for a, b in zip(state.weights, full_state.weights))


def test_state_holds_last_boundary_and_pending_tokens():
    inputs, weights = make_inputs(T=37, L=2, seed=12)
    _, state = titans_mlp_memory(*inputs, weights, chunk_size=16)
    assert isinstance(state, MLPMemoryState)
    assert state.pending_k.shape == (2, 5, 2, 8) and state.pending_gates.shape == (2, 5, 2, 4)
    torch.testing.assert_close(state.pending_v, inputs[2][:, 32:], rtol=0, atol=0)
    _, boundary = titans_mlp_memory(*(x[:, :32] for x in inputs), weights, chunk_size=16)
    assert boundary.pending_k.shape[1] == 0
    for got, want in zip(state.weights + state.momentum, boundary.weights + boundary.momentum):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_future_does_not_leak():
    inputs, weights = make_inputs(T=40, L=2, seed=13)
    o, _ = titans_mlp_memory(*inputs, weights, chunk_size=16)
    gen = torch.Generator().manual_seed(14)
    for t in (0, 7, 15, 16, 30):
        changed = [x.clone() for x in inputs]
        for x in changed:
            x[:, t + 1:] = torch.rand(x[:, t + 1:].shape, generator=gen, dtype=F64) * (0.1 if x is changed[3] else 1)
        o_changed, _ = titans_mlp_memory(*changed, weights, chunk_size=16)
        assert (o_changed[:, :t + 1] - o[:, :t + 1]).abs().max() <= 1e-12, t


def test_batch_and_heads_are_independent():
    inputs, weights = make_inputs(T=20, H=3, L=2, seed=15)
    o, _ = titans_mlp_memory(*inputs, weights, chunk_size=8)
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[1] = x[1].flip(0)
    o_changed, _ = titans_mlp_memory(*changed, weights, chunk_size=8)
    assert torch.equal(o_changed[0], o[0])
    for head in range(3):
        o_h, _ = titans_mlp_memory(*(x[:, :, head:head + 1] for x in inputs), [w[head:head + 1] for w in weights],
                                   chunk_size=8)
        torch.testing.assert_close(o_h, o[:, :, head:head + 1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_outputs_and_gradients_are_finite_under_nan_poisoning(nan_poisoned_empty, backend):
    inputs, weights = make_inputs(T=20, L=2, dtype=torch.float32, seed=16)
    leaves = [x.requires_grad_() for x in inputs + weights]
    o, state = titans_mlp_memory(*leaves[:6], leaves[6:], chunk_size=8, backend=backend)
    grads = torch.autograd.grad(random_functional(_outputs(o, state), seed=321), leaves)
    assert_finite(o=o, **{f"grad {index}": grad for index, grad in enumerate(grads)})


@pytest.mark.parametrize("edit,match", [
    (lambda i, w: (i[:2] + [i[2][..., :-1]] + i[3:], w), "v has shape"),
    (lambda i, w: (i[:5] + [i[5][..., :1]], w), "theta has shape"),
    (lambda i, w: (i, w[:1]), "weights must be a list of L >= 2"),
    (lambda i, w: (i, [w[0], w[1].transpose(-1, -2)]), r"weights\[1\] has shape"),
    (lambda i, w: (i[:3] + [i[3] + 2] + i[4:], w), "alpha has values above 1"),
    (lambda i, w: (i[:5] + [-i[5] - 1], w), "theta has values below 0"),
    (lambda i, w: ([i[0] * float("inf")] + i[1:], w), "q contains NaN or Inf"),
])
def test_bad_inputs_raise_naming_the_argument(edit, match):
    inputs, weights = make_inputs(B=1, T=6, L=2, seed=17)
    inputs, weights = edit(inputs, weights)
    with pytest.raises((ValueError, TypeError), match=match):
        titans_mlp_memory(*inputs, weights, chunk_size=4)


def test_bad_chunk_size_state_and_backend_raise():
    inputs, weights = make_inputs(B=1, T=6, L=2, seed=18)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_mlp_memory(*inputs, weights, chunk_size=0)
    with pytest.raises(ValueError, match="no Triton path"):
        titans_mlp_memory(*inputs, weights, backend="triton")
    _, state = titans_mlp_memory(*inputs, weights, chunk_size=4)
    with pytest.raises(ValueError, match="p < chunk_size"):
        titans_mlp_memory(*inputs, weights, chunk_size=2, initial_state=state)
    with pytest.raises(TypeError, match="MLPMemoryState"):
        titans_mlp_memory(*inputs, weights, chunk_size=4, initial_state=(state.weights, state.momentum))

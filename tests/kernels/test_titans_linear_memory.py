"""Tests of the op ``titans_linear_memory`` (docs/titans.md#the-linear-memory-op and #tests)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import F64, assert_finite, needs_triton, random_functional
from tests.kernels.kit import titans_linear_inputs as make_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.titans_linear_memory import (_titans_linear_memory_torch, titans_linear_memory,
                                              titans_linear_memory_reference)


def _run_with_grads(inputs, initial, chunk_size, backend, dtype=None):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    leaves = [x.detach().to(device, dtype or x.dtype).requires_grad_() for x in inputs + list(initial)]
    o, (M, S, *_) = titans_linear_memory(*leaves[:6], chunk_size=chunk_size, initial_state=tuple(leaves[6:]),
                                         backend=backend)
    grads = torch.autograd.grad(random_functional([o, M, S], seed=123), leaves)
    return (o, M, S), grads


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 37, 3, 8, 5), (2, 100, 2, 32, 16)])
@pytest.mark.parametrize("chunk_size", [1, 2, 16])
def test_torch_matches_reference_fp64(shape, chunk_size):
    inputs, initial = make_inputs(*shape)
    ref = titans_linear_memory(*inputs, chunk_size=chunk_size, initial_state=initial, backend="reference")
    out = titans_linear_memory(*inputs, chunk_size=chunk_size, initial_state=initial, backend="torch")
    for got, want in zip((out[0], *out[1]), (ref[0], *ref[1])):
        assert got.dtype == F64
        assert rel_rms_error(got, want) <= 1e-10


def test_torch_fp32_matches_fp64_reference():
    inputs, initial = make_inputs(2, 256, 2, 16, 16, seed=1)
    ref_o, (ref_M, ref_S) = titans_linear_memory_reference(*inputs, chunk_size=16, initial_state=initial)
    o, (M, S, *_) = titans_linear_memory(*(x.float() for x in inputs), chunk_size=16,
                                         initial_state=tuple(s.float() for s in initial), backend="torch")
    assert o.dtype == M.dtype == S.dtype == torch.float32
    for got, want in ((o, ref_o), (M, ref_M), (S, ref_S)):
        assert rel_rms_error(got, want) <= 1e-5


@pytest.mark.parametrize("shape,chunk_size", [((2, 37, 3, 8, 5), 1), ((2, 37, 3, 8, 5), 16), ((1, 50, 2, 16, 8), 4)])
def test_gradients_of_all_inputs_match_reference(shape, chunk_size):
    inputs, initial = make_inputs(*shape, seed=2)
    ref_outputs, ref_grads = _run_with_grads(inputs, initial, chunk_size, "reference")
    _, grads64 = _run_with_grads(inputs, initial, chunk_size, "torch")
    _, grads32 = _run_with_grads(inputs, initial, chunk_size, "torch", dtype=torch.float32)
    names = ["q", "k", "v", "alpha", "eta", "theta", "M_0", "S_0"]
    for name, g64, g32, want in zip(names, grads64, grads32, ref_grads):
        assert torch.isfinite(want).all(), name
        assert rel_rms_error(g64, want) <= 1e-9, name
        assert rel_rms_error(g32, want) <= 1e-4, name


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_fp64(backend):
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 1, 7, 1, 3, 2
    tensors = [torch.randn(B, T, H, K, generator=gen, dtype=F64), torch.randn(B, T, H, K, generator=gen, dtype=F64),
               torch.randn(B, T, H, V, generator=gen, dtype=F64)]
    tensors += [0.1 + 0.8 * torch.rand(B, T, H, generator=gen, dtype=F64) for _ in range(3)]  # away from the range ends
    tensors += [torch.randn(B, H, K, V, generator=gen, dtype=F64) for _ in range(2)]
    tensors = [t.requires_grad_() for t in tensors]

    def op(q, k, v, alpha, eta, theta, M0, S0):
        o, (M, S, *_) = titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size=4, initial_state=(M0, S0),
                                             backend=backend)
        return o, M, S

    assert torch.autograd.gradcheck(op, tensors)


def test_chunk_size_one_equals_online_gradient_descent():
    inputs, initial = make_inputs(2, 23, 2, 6, 4, seed=4)
    q, k, v, alpha, eta, theta = inputs
    M, S = initial
    expected = []
    for t in range(q.shape[1]):  # v1 eqs. 13-14 with the gradient at W_{t-1}
        k_t = k[:, t, :, :, None]  # (B, H, K, 1)
        grad = 2 * k_t * (k_t.transpose(-1, -2) @ M - v[:, t, :, None, :])  # (B, H, K, V)
        S = eta[:, t, :, None, None] * S - theta[:, t, :, None, None] * grad
        M = (1 - alpha[:, t, :, None, None]) * M + S
        expected.append((q[:, t, :, None, :] @ M)[:, :, 0])
    o, (M_out, S_out, *_) = titans_linear_memory(*inputs, chunk_size=1, initial_state=initial, backend="torch")
    assert rel_rms_error(o, torch.stack(expected, dim=1)) <= 1e-12
    assert rel_rms_error(M_out, M) <= 1e-12 and rel_rms_error(S_out, S) <= 1e-12


def _delta_rule(q, k, v, beta, M0):
    """DeltaNet in row form: M ← M − β kᵀ(kM − v); o = qM."""
    M, outputs = M0, []
    for t in range(q.shape[1]):
        k_t = k[:, t, :, None, :]  # (B, H, 1, K)
        M = M - beta[:, t, :, None, None] * k_t.transpose(-1, -2) @ (k_t @ M - v[:, t, :, None, :])
        outputs.append((q[:, t, :, None, :] @ M)[:, :, 0])
    return torch.stack(outputs, dim=1), M


def test_no_decay_no_momentum_chunk_one_is_deltanet():
    inputs, (M0, _) = make_inputs(2, 29, 2, 8, 6, seed=5)
    q, k, v, _, _, theta = inputs
    zeros = torch.zeros_like(theta)
    o, (M, *_) = titans_linear_memory(q, k, v, zeros, zeros, theta, chunk_size=1,
                                      initial_state=(M0, torch.zeros_like(M0)))
    o_delta, M_delta = _delta_rule(q, k, v, 2 * theta, M0)
    assert rel_rms_error(o, o_delta) <= 1e-10 and rel_rms_error(M, M_delta) <= 1e-10
    try:
        from zoo.kernels.gated_delta import gated_delta_rule
    except ImportError:
        return  # the gated_delta op is checked here once it exists
    o_gdn, M_gdn = gated_delta_rule(q, k, v, zeros, 2 * theta, initial_state=M0, scale=1.0)
    assert rel_rms_error(o, o_gdn) <= 1e-10 and rel_rms_error(M, M_gdn) <= 1e-10


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_full_forgetting_leaves_memory_equal_to_momentum(chunk_size):
    inputs, initial = make_inputs(1, 20, 2, 4, 4, seed=6)
    inputs[3] = torch.ones_like(inputs[3])
    o, (M, S) = _titans_linear_memory_torch(*inputs, chunk_size, initial)  # the state after the last token
    torch.testing.assert_close(M, S, rtol=0, atol=1e-12)
    # and the last output reads S_T
    torch.testing.assert_close(o[:, -1], torch.einsum("bhk,bhkv->bhv", inputs[0][:, -1], S), rtol=0, atol=1e-12)


def test_zero_learning_rate_only_decays_initial_memory():
    inputs, (M0, _) = make_inputs(2, 30, 2, 5, 3, seed=7)
    q, alpha = inputs[0], inputs[3]
    inputs[5] = torch.zeros_like(inputs[5])
    o, _ = titans_linear_memory(*inputs, chunk_size=8, initial_state=(M0, torch.zeros_like(M0)))
    decay = torch.cumprod(1 - alpha, dim=1)  # (B, T, H)
    expected = decay[..., None] * torch.einsum("bthk,bhkv->bthv", q, M0)
    assert rel_rms_error(o, expected) <= 1e-12


def test_single_chunk_without_gates_is_one_batch_gradient_step():
    inputs, (M0, _) = make_inputs(1, 12, 2, 6, 4, seed=8)
    q, k, v, _, _, theta = inputs
    zeros = torch.zeros_like(theta)
    _, (M, _) = _titans_linear_memory_torch(q, k, v, zeros, zeros, theta, 16,
                                            (M0, torch.zeros_like(M0)))  # the state after the last token
    error = torch.einsum("bthk,bhkv->bthv", k, M0) - v  # (B, T, H, V)
    expected = M0 - 2 * torch.einsum("bthk,bth,bthv->bhkv", k, theta, error)
    assert rel_rms_error(M, expected) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_stream_split_equals_full(backend, chunk_size):
    inputs, initial = make_inputs(2, 37, 2, 6, 5, seed=9)
    full_o, full_state = titans_linear_memory(*inputs, chunk_size=chunk_size, initial_state=initial, backend=backend)
    for split in range(0, 38, chunk_size):
        o1, state = titans_linear_memory(*(x[:, :split] for x in inputs), chunk_size=chunk_size,
                                         initial_state=initial, backend=backend)
        o2, (M, S, *_) = titans_linear_memory(*(x[:, split:] for x in inputs), chunk_size=chunk_size,
                                              initial_state=state, backend=backend)
        assert rel_rms_error(torch.cat([o1, o2], dim=1), full_o) <= 1e-12, split
        assert rel_rms_error(M, full_state[0]) <= 1e-12 and rel_rms_error(S, full_state[1]) <= 1e-12, split


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_stream_split_inside_a_chunk_equals_full(backend, chunk_size):
    """The pending tokens in the state keep chunks aligned to the sequence: a split at any t equals one call."""
    inputs, initial = make_inputs(2, 37, 2, 6, 5, seed=9)
    full_o, full_state = titans_linear_memory(*inputs, chunk_size=chunk_size, initial_state=initial, backend=backend)
    for split in range(38):
        o1, state = titans_linear_memory(*(x[:, :split] for x in inputs), chunk_size=chunk_size,
                                         initial_state=initial, backend=backend)
        assert state.pending_k.shape[1] == split % chunk_size
        o2, end_state = titans_linear_memory(*(x[:, split:] for x in inputs), chunk_size=chunk_size,
                                             initial_state=state, backend=backend)
        assert rel_rms_error(torch.cat([o1, o2], dim=1), full_o) <= 1e-12, split
        for got, want in zip(end_state, full_state):
            assert rel_rms_error(got, want) <= 1e-12, split


def test_token_by_token_equals_full():
    inputs, initial = make_inputs(1, 11, 2, 4, 3, seed=16)
    full_o, _ = titans_linear_memory(*inputs, chunk_size=4, initial_state=initial)
    state, outputs = initial, []
    for t in range(11):
        o, state = titans_linear_memory(*(x[:, t:t + 1] for x in inputs), chunk_size=4, initial_state=state)
        outputs.append(o)
    assert rel_rms_error(torch.cat(outputs, dim=1), full_o) <= 1e-12


def test_final_state_without_initial_state_starts_from_zero():
    inputs, initial = make_inputs(2, 19, 2, 4, 4, seed=10)
    zeros = tuple(torch.zeros_like(s) for s in initial)
    o, (M, S, *_) = titans_linear_memory(*inputs, chunk_size=4)
    o_ref, (M_ref, S_ref, *_) = titans_linear_memory(*inputs, chunk_size=4, initial_state=zeros, backend="reference")
    for got, want in ((o, o_ref), (M, M_ref), (S, S_ref)):
        assert rel_rms_error(got, want) <= 1e-12


def test_batch_and_heads_are_independent():
    inputs, initial = make_inputs(2, 21, 3, 4, 4, seed=11)
    o, (M, S, *_) = titans_linear_memory(*inputs, chunk_size=4, initial_state=initial)
    changed = [x.clone() for x in inputs]
    for x in changed:
        x[1] = x[1].flip(0)  # resample sample 1
    o_changed, (M_changed, *_) = titans_linear_memory(*changed, chunk_size=4, initial_state=initial)
    assert torch.equal(o_changed[0], o[0]) and torch.equal(M_changed[0], M[0])
    for head in range(3):
        o_h, (M_h, S_h, *_) = titans_linear_memory(*(x[:, :, head:head + 1] for x in inputs), chunk_size=4,
                                                   initial_state=tuple(s[:, head:head + 1] for s in initial))
        torch.testing.assert_close(o_h, o[:, :, head:head + 1], rtol=0, atol=1e-13)
        torch.testing.assert_close(M_h, M[:, head:head + 1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_outputs_and_gradients_are_finite_under_nan_poisoning(nan_poisoned_empty, backend):
    inputs, initial = make_inputs(1, 20, 1, 16, 16, dtype=torch.float32, seed=12)
    outputs, grads = _run_with_grads(inputs, initial, 16, backend)
    assert_finite(**dict(zip(["o", "M", "S", "dq", "dk", "dv", "dalpha", "deta", "dtheta", "dM_0", "dS_0"],
                             (*outputs, *grads))))


@pytest.mark.parametrize("chunk_size,theta_value,length", [(1, 1.0, 512), (16, 1.0 / 16, 2048)])
@pytest.mark.parametrize("alpha_value,eta_value", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_extreme_gates_stay_finite(alpha_value, eta_value, chunk_size, theta_value, length):
    """Gates at the ends of their range over long sequences in fp32 give finite outputs and gradients.

    The per-token step I − 2θkkᵀ is bounded for ‖k‖ = 1 and θ ≤ 1, and a chunk of b tokens takes b such gradients at once,
    so the chunked case uses θ = 1/b. α = 0 with η = 1 (undamped momentum, no forgetting) diverges in exact arithmetic
    (the token loop overflows too), so it is not part of this test.
    """
    inputs, _ = make_inputs(1, length, 1, 16, 16, dtype=torch.float32, seed=13, state=False)
    inputs[3] = torch.full_like(inputs[3], alpha_value)
    inputs[4] = torch.full_like(inputs[4], eta_value)
    inputs[5] = torch.full_like(inputs[5], theta_value)
    leaves = [x.requires_grad_() for x in inputs]
    o, (M, S, *_) = titans_linear_memory(*leaves, chunk_size=chunk_size, backend="torch")
    grads = torch.autograd.grad(random_functional([o, M, S], seed=123), leaves)
    assert_finite(**dict(zip(["o", "M", "S", "dq", "dk", "dv", "dalpha", "deta", "dtheta"], (o, M, S, *grads))))


def test_low_precision_inputs_give_outputs_in_v_dtype_and_fp32_states():
    inputs, _ = make_inputs(1, 10, 1, 4, 4, dtype=torch.bfloat16, seed=14, state=False)
    o, (M, S, *_) = titans_linear_memory(*inputs, chunk_size=4)
    assert o.dtype == torch.bfloat16 and M.dtype == S.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("shape", [(1, 16, 1, 16, 16), (2, 45, 2, 32, 16)])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_triton_matches_reference(shape, chunk_size):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs, initial = make_inputs(*shape, seed=15)
    ref_outputs, ref_grads = _run_with_grads(inputs, initial, chunk_size, "reference")
    leaves = [x.detach().float().to(device).requires_grad_() for x in inputs + list(initial)]
    o, (M, S, *_) = titans_linear_memory(*leaves[:6], chunk_size=chunk_size, initial_state=tuple(leaves[6:]),
                                         backend="triton")
    grads = torch.autograd.grad(random_functional([o.cpu(), M.cpu(), S.cpu()], seed=123), leaves)
    for got, want in zip((o, M, S), ref_outputs):
        assert rel_rms_error(got.cpu(), want) <= 2e-3
    tolerances = [8e-3, 8e-3, 8e-3, 2e-2, 2e-2, 2e-2, 8e-3, 8e-3]  # q k v alpha eta theta M_0 S_0
    for name, got, want, tol in zip(["q", "k", "v", "alpha", "eta", "theta", "M_0", "S_0"], grads, ref_grads,
                                    tolerances):
        assert rel_rms_error(got.cpu(), want) <= tol, name


@needs_triton
def test_triton_rejects_chunk_size_it_cannot_tile():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs, _ = make_inputs(1, 8, 1, 4, 4, dtype=torch.float32, state=False)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_linear_memory(*(x.to(device) for x in inputs), chunk_size=8, backend="triton")


def _bad(index, value):
    def edit(inputs):
        inputs[index] = value(inputs[index])
        return inputs
    return edit


@pytest.mark.parametrize("edit,match", [
    (_bad(1, lambda k: k[..., :-1]), "k has shape"),
    (_bad(2, lambda v: v[:, :-1]), "v has shape"),
    (_bad(3, lambda a: a[..., None]), "alpha has shape"),
    (_bad(3, lambda a: a + 1.5), "alpha has values above 1"),
    (_bad(4, lambda e: e - 2), "eta has values below 0"),
    (_bad(5, lambda t: -t - 1), "theta has values below 0"),
    (_bad(0, lambda q: q.masked_fill(torch.ones_like(q, dtype=torch.bool), float("nan"))), "q contains NaN"),
    (_bad(2, lambda v: v.long()), "v must be a floating-point"),
])
def test_bad_inputs_raise_naming_the_argument(edit, match):
    inputs, _ = make_inputs(1, 6, 2, 4, 3, state=False)
    with pytest.raises((ValueError, TypeError), match=match):
        titans_linear_memory(*edit(inputs), chunk_size=4)


def test_bad_chunk_size_state_and_backend_raise():
    inputs, initial = make_inputs(1, 6, 2, 4, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_linear_memory(*inputs, chunk_size=0)
    with pytest.raises(ValueError, match=r"initial_state\[0\]"):
        titans_linear_memory(*inputs, initial_state=(initial[0][:, :1], initial[1]))
    with pytest.raises(ValueError, match="backend"):
        titans_linear_memory(*inputs, backend="cuda")


def test_state_with_too_many_pending_tokens_raises():
    inputs, initial = make_inputs(1, 6, 2, 4, 3)
    _, state = titans_linear_memory(*inputs, chunk_size=8, initial_state=initial)
    with pytest.raises(ValueError, match="p < chunk_size=4"):
        titans_linear_memory(*inputs, chunk_size=4, initial_state=state)

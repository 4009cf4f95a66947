"""The op ``gated_delta_rule`` against its sequential reference (docs/mom.md#tests, items 1–7)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import (TRITON_DEVICE, TRITON_RUNNABLE, assert_errors_below, assert_finite, needs_triton,
                               outputs_and_grads, random_functional, rel_errors, run_without_triton)
from tests.kernels.kit import gated_delta_inputs as make_inputs
from zoo.kernels import gated_delta_rule
from zoo.kernels._common import rel_rms_error

NAMES = ("q", "k", "v", "g", "beta", "initial_state")
RESULT_NAMES = ("o", "final_state") + tuple("d" + n for n in NAMES)


def outputs_and_gradients(inputs, backend, **options):
    """[o, final_state, the gradients of all six inputs] through a random linear functional of (o, final_state)."""
    results = outputs_and_grads(lambda **kw: gated_delta_rule(**kw, backend=backend, **options),
                                dict(zip(NAMES, inputs)))
    return [*results.outputs, *results.grads.values()]


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, 65, 2, 16, 32), (1, 130, 1, 64, 64)])
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_chunked_matches_reference_float64(shape, use_qk_l2norm, scale):
    inputs = make_inputs(*shape, normalize_k=not use_qk_l2norm)
    options = dict(use_qk_l2norm=use_qk_l2norm, scale=scale)
    o, state = gated_delta_rule(*inputs, backend="torch", **options)
    o_ref, state_ref = gated_delta_rule(*inputs, backend="reference", **options)
    assert o.dtype == torch.float64 and state.dtype == torch.float64
    assert rel_rms_error(o, o_ref) < 1e-10
    assert rel_rms_error(state, state_ref) < 1e-10


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_chunked_float32_matches_float64_reference(use_qk_l2norm):
    inputs64 = make_inputs(2, 130, 2, 16, 32, normalize_k=not use_qk_l2norm)
    inputs32 = [x.detach().float() for x in inputs64]
    o, state = gated_delta_rule(*inputs32, backend="torch", use_qk_l2norm=use_qk_l2norm)
    o_ref, state_ref = gated_delta_rule(*inputs64, backend="reference", use_qk_l2norm=use_qk_l2norm)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_rms_error(o, o_ref) < 5e-5
    assert rel_rms_error(state, state_ref) < 5e-5


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_chunked_gradients_match_reference(use_qk_l2norm):
    inputs64 = make_inputs(2, 65, 2, 16, 32, normalize_k=not use_qk_l2norm)
    expected = outputs_and_gradients(inputs64, "reference", use_qk_l2norm=use_qk_l2norm)
    results64 = outputs_and_gradients(inputs64, "torch", use_qk_l2norm=use_qk_l2norm)
    assert_errors_below(rel_errors(results64, expected, RESULT_NAMES), {"default": 1e-9})
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    results32 = outputs_and_gradients(inputs32, "torch", use_qk_l2norm=use_qk_l2norm)
    assert_errors_below(rel_errors(results32, expected, RESULT_NAMES), {"default": 5e-4})


def test_chunked_gradcheck_with_small_chunks():
    inputs = make_inputs(1, 9, 1, 3, 2, normalize_k=False)
    inputs[3] = (inputs[3].detach() - 0.1).requires_grad_()  # keep g < 0 under the finite-difference steps
    function = lambda *xs: gated_delta_rule(*xs, use_qk_l2norm=True, scale=0.7, chunk_size=4,  # noqa: E731
                                            backend="torch")
    assert torch.autograd.gradcheck(function, inputs)


def varlen_inputs(lengths, H=2, K=8, V=16, dtype=torch.float64, device="cpu"):
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0)  # (N + 1,)
    inputs = make_inputs(1, sum(lengths), H, K, V, dtype=dtype, num_states=len(lengths), device=device)
    return inputs, cu_seqlens


def per_sequence_results(inputs, cu_seqlens, backend):
    """Run each packed sequence alone and stitch o, final_state and the input gradients back together."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for n in range(len(bounds) - 1):
        span = slice(bounds[n], bounds[n + 1])
        pieces = [x[:, span] for x in leaves[:5]]
        if bounds[n + 1] == bounds[n]:  # an empty sequence keeps its state
            outputs.append(pieces[2].new_zeros(1, 0, *pieces[2].shape[2:]))
            finals.append(leaves[5][n:n + 1] * 1.0)
            continue
        o, final = gated_delta_rule(*pieces, initial_state=leaves[5][n:n + 1], backend=backend)
        outputs.append(o)
        finals.append(final)
    o, final = torch.cat(outputs, dim=1), torch.cat(finals, dim=0)
    return [o, final, *torch.autograd.grad(random_functional([o, final]), leaves)]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_varlen_equals_per_sequence_calls(backend):
    inputs, cu_seqlens = varlen_inputs([0, 5, 70, 0, 64, 63])
    packed = outputs_and_gradients(inputs, backend, cu_seqlens=cu_seqlens)
    separate = per_sequence_results(inputs, cu_seqlens, backend)
    assert_errors_below(rel_errors(packed, separate, RESULT_NAMES), {"default": 1e-12})


def test_empty_sequence_keeps_initial_state():
    inputs, cu_seqlens = varlen_inputs([0, 7, 0])
    for backend in ("reference", "torch"):
        _, final_state = gated_delta_rule(*inputs, cu_seqlens=cu_seqlens, backend=backend)
        assert torch.equal(final_state[0], inputs[5][0]) and torch.equal(final_state[2], inputs[5][2])


def test_stream_split_equals_one_call():
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(1, 130, 1, 8, 8))
    o_full, state_full = gated_delta_rule(q, k, v, g, beta, h0, backend="torch")
    for t in range(131):
        first = [x[:, :t] for x in (q, k, v, g, beta)]
        second = [x[:, t:] for x in (q, k, v, g, beta)]
        o1, state = gated_delta_rule(*first, initial_state=h0, backend="torch")
        o2, state = gated_delta_rule(*second, initial_state=state, backend="torch")
        assert rel_rms_error(torch.cat([o1, o2], dim=1), o_full) <= 1e-12, f"split at t={t}"
        assert rel_rms_error(state, state_full) <= 1e-12, f"split at t={t}"


TRITON_TOLERANCE = {"o": 5e-3, "final_state": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dinitial_state": 8e-3,
                    "dg": 2e-2, "dbeta": 2e-2, "default": 0.0}


@needs_triton
@pytest.mark.parametrize("shape", [(1, 64, 1, 16, 16), (1, 100, 2, 32, 32), (2, 40, 1, 16, 24)])
def test_triton_matches_reference(shape):
    inputs = make_inputs(*shape, dtype=torch.float32, device=TRITON_DEVICE)
    expected = outputs_and_gradients(inputs, "reference")
    results = outputs_and_gradients(inputs, "triton")
    assert_errors_below(rel_errors(results, expected, RESULT_NAMES), TRITON_TOLERANCE)


@needs_triton
def test_triton_varlen_matches_reference():
    inputs, cu_seqlens = varlen_inputs([37, 0, 50], dtype=torch.float32, device=TRITON_DEVICE)
    expected = outputs_and_gradients(inputs, "reference", cu_seqlens=cu_seqlens, use_qk_l2norm=True)
    results = outputs_and_gradients(inputs, "triton", cu_seqlens=cu_seqlens, use_qk_l2norm=True)
    assert_errors_below(rel_errors(results, expected, RESULT_NAMES), TRITON_TOLERANCE)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_output_in_value_dtype_and_state_in_float32(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = [x.detach() for x in make_inputs(1, 70, 1, 16, 16, device=device)]
    low = [x.to(torch.bfloat16) for x in inputs[:3]] + [x.float() for x in inputs[3:]]
    o, state = gated_delta_rule(*low, backend=backend)
    o_ref, state_ref = gated_delta_rule(*inputs, backend="reference")
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_rms_error(o, o_ref) < 2e-2 and rel_rms_error(state, state_ref) < 2e-2


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_outputs_and_gradients_finite_with_nan_poisoned_empty(backend, nan_poisoned_empty):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs, cu_seqlens = varlen_inputs([20, 0, 45], dtype=torch.float32, device=device)
    assert_finite(**dict(zip(RESULT_NAMES, outputs_and_gradients(inputs, backend, cu_seqlens=cu_seqlens))))


def test_bad_inputs_raise_one_line_errors():
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(2, 10, 2, 4, 6))
    cu_seqlens = torch.tensor([0, 4, 10])
    cases = [
        (ValueError, "k has shape", dict(k=k[:, :9])),
        (ValueError, "v has shape", dict(v=v[:, :, :1])),
        (ValueError, "g has shape", dict(g=g[..., None])),
        (ValueError, "beta has shape", dict(beta=beta[:1])),
        (ValueError, "initial_state has shape", dict(initial_state=h0[:1])),
        (ValueError, "batch size 1", dict(cu_seqlens=cu_seqlens)),
        (ValueError, "values above 0", dict(g=-g)),
        (TypeError, "share a dtype", dict(v=v.float())),
        (ValueError, "backend must be one of", dict(backend="cuda")),
    ]
    arguments = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    for error, message, change in cases:
        with pytest.raises(error, match=message) as raised:
            gated_delta_rule(**{**arguments, **change})
        assert "\n" not in str(raised.value)
    packed = dict(q=q[:1], k=k[:1], v=v[:1], g=g[:1], beta=beta[:1])
    for bad_cu, message in [(torch.tensor([0, 4, 9]), "end at T=10"), (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
                            (torch.tensor([0.0, 10.0]), "int64"), (torch.tensor([[0, 10]]), "1-D")]:
        with pytest.raises((ValueError, TypeError), match=message):
            gated_delta_rule(**packed, cu_seqlens=bad_cu)


@pytest.mark.skipif(TRITON_RUNNABLE, reason="the Triton backend is runnable here")
def test_triton_backend_unavailable_says_so():
    q, k, v, g, beta, _ = (x.detach() for x in make_inputs(1, 4, 1, 4, 4))
    with pytest.raises(RuntimeError, match="triton"):
        gated_delta_rule(q, k, v, g, beta, backend="triton")


def test_torch_path_works_without_triton():
    run_without_triton("import torch\n"
                       "from zoo.kernels import gated_delta_rule\n"
                       "o, s = gated_delta_rule(*(torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), "
                       "torch.randn(1, 5, 1, 4)), -torch.rand(1, 5, 1), torch.rand(1, 5, 1))\n"
                       "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n")

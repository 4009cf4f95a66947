"""Properties of the Mamba-1 selective scan op (docs/mamba.md#selective-scan and #tests)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import (SELECTIVE_SCAN_OPTIONS, TRITON_DEVICE, assert_close_to,
                               assert_reference_backward_linear_in_T, needs_triton, outputs_and_grads)
from tests.kernels.kit import selective_scan_inputs as make_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.selective_scan import _selective_scan_chunked, selective_scan, selective_scan_reference

# all on, all off, and each option off in turn
OPTION_SETS = [set(SELECTIVE_SCAN_OPTIONS), set()] + [set(SELECTIVE_SCAN_OPTIONS) - {name}
                                                     for name in SELECTIVE_SCAN_OPTIONS]


def torch_path(**kw):
    return selective_scan(**kw, backend="torch")


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda s: "+".join(sorted(s)) or "none")
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [0, 1, 37, 130])
def test_selective_scan_matches_reference(T, G, options):
    for dtype, out_tol, grad_tol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 2e-3, 1e-2)):
        kwargs = make_inputs(T=T, G=G, dtype=dtype, options=options)
        ref = outputs_and_grads(selective_scan_reference, make_inputs(T=T, G=G, dtype=torch.float64, options=options))
        out = outputs_and_grads(torch_path, kwargs)
        y, final = out.outputs
        assert y.dtype == dtype and final.dtype == dtype
        if T == 0:
            assert y.shape == (2, 0, 8)
            expected = kwargs.get("initial_state", torch.zeros(2, 8, 4, dtype=dtype))
            assert torch.equal(final.detach(), expected.detach())
            continue
        assert_close_to(out, ref, out_tol, grad_tol)


def test_chunk_size_does_not_change_result():
    kwargs = make_inputs(T=130, G=2)
    y64, h64 = _selective_scan_chunked(**kwargs, chunk_size=64)
    for chunk in (1, 7, 16, 128, 256):
        y, h = _selective_scan_chunked(**kwargs, chunk_size=chunk)
        assert rel_rms_error(y, y64) < 1e-12 and rel_rms_error(h, h64) < 1e-12


def test_reference_gradcheck():
    kwargs = make_inputs(batch=1, T=5, Dm=4, N=2, G=2)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        return selective_scan_reference(**{**kwargs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, tuple(kwargs[k] for k in names))


def test_reference_backward_linear_in_T():
    assert_reference_backward_linear_in_T(
        selective_scan_reference, lambda T: make_inputs(batch=1, T=T, Dm=64, N=8, options={"D", "delta_softplus"}),
        T=1024)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_stream_split_equals_full(backend):
    T = 130
    kwargs = make_inputs(T=T, G=2)
    y_full, h_full = selective_scan(**kwargs, backend=backend)
    for t in (0, 1, 5, 63, 64, 65, T):
        head = {k: (v[:, :t] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kwargs.items()}
        tail = {k: (v[:, t:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kwargs.items()}
        y1, h1 = selective_scan(**head, backend=backend)
        y2, h2 = selective_scan(**{**tail, "initial_state": h1}, backend=backend)
        assert rel_rms_error(torch.cat([y1, y2], 1), y_full) < 1e-12, t
        assert rel_rms_error(h2, h_full) < 1e-12, t


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_future_does_not_leak(backend):
    T, t = 70, 40
    kwargs = make_inputs(T=T, G=2)
    y, _ = selective_scan(**kwargs, backend=backend)
    perturbed = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for name in ("u", "delta", "z", "B", "C"):
        perturbed[name][:, t + 1:] += torch.randn_like(perturbed[name][:, t + 1:])
    y_perturbed, _ = selective_scan(**perturbed, backend=backend)
    assert (y_perturbed[:, :t + 1] - y[:, :t + 1]).abs().max() < 1e-12
    assert (y_perturbed[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3


def test_half_precision_computes_in_fp32():
    kwargs = make_inputs(T=37, G=2, dtype=torch.bfloat16)
    y, final = selective_scan(**kwargs, backend="torch")
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, _ = selective_scan_reference(**make_inputs(T=37, G=2))
    assert rel_rms_error(y, y_ref) < 3e-2


def test_long_sequence_is_finite():
    """T = 65536 with Δ up to 10, A down to −16, then Δ = 1e-4. The float64 oracle here is the torch path in float64,
    which test_selective_scan_matches_reference ties to the reference loop at 1e-10 (the loop takes ~10 s here)."""
    T = 65536
    gen = torch.Generator().manual_seed(0)
    delta = torch.rand(1, T, 2, generator=gen, dtype=torch.float64) * 10  # Δ up to 10
    delta[:, T // 2:] = 1e-4  # then tiny steps
    kwargs64 = dict(u=torch.randn(1, T, 2, generator=gen, dtype=torch.float64), delta=delta,
                    A=torch.tensor([[-16.0, -0.01], [-1.0, -4.0]], dtype=torch.float64),
                    B=torch.randn(1, T, 2, generator=gen, dtype=torch.float64),
                    C=torch.randn(1, T, 2, generator=gen, dtype=torch.float64))
    y_ref, h_ref = selective_scan(**kwargs64, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = {k: v.to(dtype).requires_grad_() for k, v in kwargs64.items()}
        y, h = selective_scan(**kwargs, backend="torch")
        (y.float().square().mean() + h.square().mean()).backward()
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert all(torch.isfinite(v.grad).all() for v in kwargs.values())
        if dtype == torch.float32:
            assert rel_rms_error(y, y_ref) < 1e-3 and rel_rms_error(h, h_ref) < 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)])
def test_triton_interpreter_matches_reference(dtype):
    """Forward and backward of the Triton kernels (T = 37, Dm = 8, N = 4, G = 2, initial state), NaN-poisoned
    outputs; checkpoints every 16 steps so the backward walks several segments."""
    from zoo.kernels.selective_scan_triton import selective_scan_triton

    tolerances = {torch.float32: (2e-3, 1e-2), torch.float64: (1e-10, 1e-10)}
    dtypes = [(dtype, *tolerances[dtype])]
    if TRITON_DEVICE == "cuda" and dtype == torch.float32:
        dtypes.append((torch.bfloat16, 3e-2, 5e-2))
    ref = outputs_and_grads(selective_scan_reference, make_inputs(batch=1, T=37, Dm=8, N=4, G=2))
    for dtype, out_tol, grad_tol in dtypes:
        kwargs = make_inputs(batch=1, T=37, Dm=8, N=4, G=2, dtype=dtype, device=TRITON_DEVICE)
        out = outputs_and_grads(lambda **kw: selective_scan_triton(**kw, checkpoint_steps=16), kwargs)
        assert_close_to(out, ref, out_tol, grad_tol)
    # the public entry point, without optional inputs
    options = {"delta_softplus"}
    ref = outputs_and_grads(selective_scan_reference, make_inputs(batch=1, T=9, G=1, options=options))
    kwargs = make_inputs(batch=1, T=9, G=1, dtype=torch.float32, options=options, device=TRITON_DEVICE)
    out = outputs_and_grads(lambda **kw: selective_scan(**kw, backend="triton"), kwargs)
    assert_close_to(out, ref, 2e-3, 1e-2)


@pytest.mark.parametrize("change, message", [
    (dict(u=torch.randn(2, 5)), "u must be"),
    (dict(delta=torch.randn(2, 5, 7)), "delta has shape"),
    (dict(A=-torch.rand(7, 4)), "A has shape"),
    (dict(A=torch.ones(8, 4)), "A has values above"),
    (dict(B=torch.randn(2, 5, 3, 4), C=torch.randn(2, 5, 3, 4)), "must divide Dm"),
    (dict(C=torch.randn(2, 5, 2, 4)), "C has shape"),
    (dict(D=torch.randn(7)), "D has shape"),
    (dict(initial_state=torch.randn(2, 8, 5)), "initial_state has shape"),
    (dict(u=torch.randint(0, 3, (2, 5, 8))), "floating-point"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_raise(change, message):
    kwargs = dict(u=torch.randn(2, 5, 8), delta=torch.randn(2, 5, 8), A=-torch.rand(8, 4), B=torch.randn(2, 5, 4),
                  C=torch.randn(2, 5, 4))
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        selective_scan(**kwargs)

"""Properties of the Mamba-2 SSD op (docs/mamba.md#ssd and #tests)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import (SSD_OPTIONS, TRITON_DEVICE, assert_close_to, assert_reference_backward_linear_in_T,
                               needs_triton, outputs_and_grads)
from tests.kernels.kit import ssd_inputs as make_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.ssd import ssd, ssd_reference

OPTION_SETS = [set(SSD_OPTIONS), set()] + [set(SSD_OPTIONS) - {name} for name in SSD_OPTIONS]
TIME_INPUTS = ("x", "dt", "B", "C")


def with_backend(backend, **fixed):
    return lambda **kw: ssd(**kw, **fixed, backend=backend)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda s: "+".join(sorted(s)) or "none")
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_ssd_matches_reference(chunk_size, T, G, options):
    ref = outputs_and_grads(ssd_reference, make_inputs(T=T, G=G, options=options))
    for dtype, out_tol, grad_tol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 2e-3, 1e-2)):
        out = outputs_and_grads(with_backend("torch", chunk_size=chunk_size),
                                make_inputs(T=T, G=G, dtype=dtype, options=options))
        assert out.outputs[0].dtype == dtype and out.outputs[1].dtype == dtype
        assert_close_to(out, ref, out_tol, grad_tol)


def test_chunk_size_does_not_change_result():
    kwargs = make_inputs(T=130)
    y16, S16 = ssd(**kwargs, chunk_size=16, backend="torch")
    for chunk in (1, 2, 32, 64, 256):
        y, S = ssd(**kwargs, chunk_size=chunk, backend="torch")
        assert rel_rms_error(y, y16) < 1e-10 and rel_rms_error(S, S16) < 1e-10


@pytest.mark.parametrize("chunk_size", [0, 3, 48, 100])
def test_non_power_of_two_chunk_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        ssd(**make_inputs(T=10), chunk_size=chunk_size)


def test_empty_sequence_returns_initial_state():
    kwargs = make_inputs(T=0)
    for backend in ("reference", "torch"):
        y, S = ssd(**kwargs, backend=backend)
        assert y.shape == (2, 0, 4, 8)
        assert torch.equal(S.detach(), kwargs["initial_state"].detach())


def test_reference_gradcheck():
    kwargs = make_inputs(batch=1, T=4, H=2, P=2, G=1, N=2)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        return ssd_reference(**{**kwargs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, tuple(kwargs[k] for k in names))


def test_reference_backward_linear_in_T():
    assert_reference_backward_linear_in_T(
        ssd_reference, lambda T: make_inputs(batch=1, T=T, H=4, P=8, G=1, N=8, options={"D", "dt_softplus"}), T=512)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_stream_split_equals_full(backend):
    T = 130
    kwargs = make_inputs(T=T)
    y_full, S_full = ssd(**kwargs, chunk_size=16, backend=backend)
    for t in (0, 1, 5, 63, 64, 65, T):
        head = {k: (v[:, :t] if k in TIME_INPUTS else v) for k, v in kwargs.items()}
        tail = {k: (v[:, t:] if k in TIME_INPUTS else v) for k, v in kwargs.items()}
        y1, S1 = ssd(**head, chunk_size=16, backend=backend)
        y2, S2 = ssd(**{**tail, "initial_state": S1}, chunk_size=16, backend=backend)
        assert rel_rms_error(torch.cat([y1, y2], 1), y_full) < 1e-12, t
        assert rel_rms_error(S2, S_full) < 1e-12, t


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_future_does_not_leak(backend):
    T, t = 70, 40
    kwargs = make_inputs(T=T)
    y, _ = ssd(**kwargs, chunk_size=16, backend=backend)
    perturbed = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for name in TIME_INPUTS:
        perturbed[name][:, t + 1:] += torch.randn_like(perturbed[name][:, t + 1:])
    y_perturbed, _ = ssd(**perturbed, chunk_size=16, backend=backend)
    assert (y_perturbed[:, :t + 1] - y[:, :t + 1]).abs().max() < 1e-12
    assert (y_perturbed[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-3


def _varlen_vs_separate(backend, lengths, dtype, tol, chunk_size=16, device="cpu"):
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0)
    T = sum(lengths)
    kwargs = make_inputs(batch=1, T=T, n_states=len(lengths), dtype=dtype, device=device)
    packed = outputs_and_grads(lambda **kw: ssd(**kw, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                                                backend=backend), kwargs)
    ys, finals = [], []
    for k, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        one = {name: (v[:, start:end] if name in TIME_INPUTS else v) for name, v in kwargs.items()}
        one["initial_state"] = kwargs["initial_state"][k:k + 1]
        y, S = ssd_reference(**one)
        ys.append(y)
        finals.append(S)
    separate_kwargs = kwargs

    def separate(**_):
        return torch.cat(ys, 1), torch.cat(finals, 0)

    ref = outputs_and_grads(separate, separate_kwargs)
    assert_close_to(packed, ref, tol, tol * 5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ssd_varlen_equals_separate(backend):
    _varlen_vs_separate(backend, [1, 5, 16, 40], torch.float64, 1e-10)
    _varlen_vs_separate(backend, [1, 5, 16, 40], torch.float32, 2e-3)


def test_varlen_validation():
    kwargs = make_inputs(batch=1, T=10, n_states=2)
    with pytest.raises(ValueError, match="non-decreasing from 0 to T"):
        ssd(**kwargs, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="int32/int64"):
        ssd(**kwargs, cu_seqlens=torch.tensor([0.0, 4.0, 10.0]))
    with pytest.raises(ValueError, match=r"initial_state has shape .*nseq"):
        ssd(**kwargs, cu_seqlens=torch.tensor([0, 2, 4, 10]))
    with pytest.raises(ValueError, match="batch size 1"):
        ssd(**make_inputs(batch=2, T=10), cu_seqlens=torch.tensor([0, 10]))


def test_long_sequence_is_finite():
    """T = 65536 with Δ up to 10, A down to −16, then Δ = 1e-4; the float64 oracle is the torch path in float64,
    which test_ssd_matches_reference ties to the reference loop at 1e-10."""
    T = 65536
    gen = torch.Generator().manual_seed(0)
    dt = torch.rand(1, T, 2, generator=gen, dtype=torch.float64) * 10
    dt[:, T // 2:] = 1e-4
    kwargs64 = dict(x=torch.randn(1, T, 2, 2, generator=gen, dtype=torch.float64), dt=dt,
                    A=torch.tensor([-16.0, -0.01], dtype=torch.float64),
                    B=torch.randn(1, T, 1, 2, generator=gen, dtype=torch.float64),
                    C=torch.randn(1, T, 1, 2, generator=gen, dtype=torch.float64))
    y_ref, S_ref = ssd(**kwargs64, dt_softplus=False, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = {k: v.to(dtype).requires_grad_() for k, v in kwargs64.items()}
        y, S = ssd(**kwargs, dt_softplus=False, backend="torch")
        (y.float().square().mean() + S.square().mean()).backward()
        assert torch.isfinite(y).all() and torch.isfinite(S).all()
        assert all(torch.isfinite(v.grad).all() for v in kwargs.values())
        if dtype == torch.float32:
            assert rel_rms_error(y, y_ref) < 1e-3 and rel_rms_error(S, S_ref) < 1e-3


def test_intra_chunk_decay_does_not_cancel():
    """Chunked SSD step 2: L must come from the stable segment sum. The first token of each chunk decays by a = −4·10⁴,
    the others by −0.01, so the in-chunk cumulative sum Λ is about −4·10⁴ and Λ_i − Λ_j loses about 1 % of the small
    decays to float32 rounding; the segment sum keeps float32 accuracy."""
    T, chunk = 64, 16
    gen = torch.Generator().manual_seed(0)
    dt = torch.full((1, T, 2), 0.01, dtype=torch.float64)
    dt[:, ::chunk] = 4e4
    kwargs64 = dict(x=torch.randn(1, T, 2, 4, generator=gen, dtype=torch.float64), dt=dt,
                    A=torch.tensor([-1.0, -1.0], dtype=torch.float64),
                    B=torch.randn(1, T, 1, 4, generator=gen, dtype=torch.float64),
                    C=torch.randn(1, T, 1, 4, generator=gen, dtype=torch.float64))
    y_ref, _ = ssd_reference(**kwargs64, dt_softplus=False)
    kwargs = {k: v.float().requires_grad_() for k, v in kwargs64.items()}
    y, _ = ssd(**kwargs, chunk_size=chunk, dt_softplus=False, backend="torch")
    assert rel_rms_error(y, y_ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)])
def test_triton_interpreter_matches_reference(dtype):
    """Forward and backward of the Triton kernels (H = 4, P = 16, N = 16, chunk 16, initial states), dense and
    varlen, NaN-poisoned outputs."""
    tolerances = {torch.float32: (2e-3, 1e-2), torch.float64: (1e-10, 1e-10)}
    dtypes = [(dtype, *tolerances[dtype])]
    if TRITON_DEVICE == "cuda" and dtype == torch.float32:
        dtypes.append((torch.bfloat16, 3e-2, 5e-2))
    shape = dict(batch=2, T=37, H=4, P=16, G=2, N=16)
    ref = outputs_and_grads(ssd_reference, make_inputs(**shape))
    for dt_, out_tol, grad_tol in dtypes:
        out = outputs_and_grads(with_backend("triton", chunk_size=16),
                                make_inputs(**shape, dtype=dt_, device=TRITON_DEVICE))
        assert_close_to(out, ref, out_tol, grad_tol)
    _varlen_vs_separate("triton", [1, 5, 16, 15], dtype, tolerances[dtype][0], device=TRITON_DEVICE)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 5, 4)), "x must be"),
    (dict(dt=torch.randn(2, 5, 3)), "dt has shape"),
    (dict(A=-torch.rand(3)), "A has shape"),
    (dict(A=torch.ones(4)), "A has values above"),
    (dict(B=torch.randn(2, 5, 3, 8), C=torch.randn(2, 5, 3, 8)), "must divide the number of heads"),
    (dict(C=torch.randn(2, 5, 2, 4)), "C has shape"),
    (dict(D=torch.randn(5)), "D has shape"),
    (dict(initial_state=torch.randn(2, 4, 8, 4)), "initial_state has shape"),
    (dict(x=torch.randint(0, 3, (2, 5, 4, 8))), "floating-point"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_inputs_raise(change, message):
    kwargs = dict(x=torch.randn(2, 5, 4, 8), dt=torch.randn(2, 5, 4), A=-torch.rand(4), B=torch.randn(2, 5, 2, 8),
                  C=torch.randn(2, 5, 2, 8))
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ssd(**kwargs)

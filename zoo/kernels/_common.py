"""Shared plumbing for the ops in ``zoo.kernels``: backend dispatch, input checks, Triton detection, and the small
numerical helpers several ops use (compute dtype, l2 normalisation, Δ discretisation, packed-sequence bounds).

Every op file imports from here and nothing else in ``zoo``; the ops stay independent of each other.
Importing this module never imports Triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "torch", "triton")


@torch.compiler.assume_constant_result  # torch.compile reads the answer instead of tracing importlib
def triton_available() -> bool:
    """True when the ``triton`` package is importable (a GPU is not required: see ``triton_interpreted``)."""
    return _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


BACKEND_ENV = "ZOO_BACKEND"  # overrides what backend="auto" picks: "auto", "torch" or "triton"
MIN_CAPABILITY = (8, 0)  # auto runs Triton from Ampere on: the kernels were validated there (tl.dot, bf16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 stays on the exact torch path under auto
_warned: set[str] = set()


@torch.compiler.assume_constant_result  # runs once at trace time instead of breaking a compiled graph
def warn_once(message: str) -> bool:
    """Warn with ``message`` the first time it is seen in this process; returns whether it warned."""
    if message in _warned:
        return False
    _warned.add(message)
    warnings.warn(message, stacklevel=4)
    return True


@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device ``index``."""
    return _capability(index)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def backend_override(op: str) -> str:
    """The value of ``ZOO_BACKEND`` ("auto" when unset); a value outside auto/torch/triton raises one clear error."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "triton"):
        raise ValueError(f"{op}: {BACKEND_ENV} must be 'auto', 'torch' or 'triton', got "
                         f"{os.environ[BACKEND_ENV]!r}; unset it or pick one of those")
    return value


def auto_fallback_reason(on_cuda: bool, capability: tuple[int, int] | None, dtype: torch.dtype,
                         has_triton: bool) -> str | None:
    """Why ``auto`` must not use Triton for CUDA inputs (None when it may); CPU inputs need no reason."""
    if not on_cuda:
        return None
    if not has_triton:
        return "triton is not installed (pip install triton)"
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]}, the Triton kernels are validated "
                f"from {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere) on")
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels compute in float32, the inputs are {dtype} (kept exact on the torch path)"
    return None


def resolve_backend(backend: str, reference_tensor: torch.Tensor, op: str, *, auto_triton: bool = True,
                    triton_path: bool = True) -> str:
    """Map ``backend`` to a concrete one.

    ``"auto"`` follows ``ZOO_BACKEND`` when set; otherwise it picks Triton for CUDA tensors where the kernels are
    known to work (triton installed, compute capability >= 8.0, float32/bfloat16/float16 inputs; ``auto_triton``
    False keeps an op on the torch path), and warns once with the reason when CUDA inputs fall back to torch.
    ``triton_path`` False marks an op without kernels: ``ZOO_BACKEND=triton`` then runs its torch path (with a
    warning). Forcing ``"triton"`` without Triton, or on CPU tensors outside the interpreter, raises a one-line error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    on_gpu = reference_tensor.is_cuda
    if backend == "auto":
        override = backend_override(op)
        if override == "triton" and not triton_path:
            warn_once(f"{op}: {BACKEND_ENV}=triton, but the op has no Triton path; running its torch path")
            return "torch"
        if override != "auto":
            backend = override
        elif not (on_gpu and auto_triton and triton_path):
            return "torch"
        else:
            capability = cuda_capability(reference_tensor.device.index or 0)
            reason = auto_fallback_reason(on_gpu, capability, reference_tensor.dtype, triton_available())
            if reason is None:
                return "triton"
            warn_once(f"{op}: backend='auto' runs the torch path because {reason}; set {BACKEND_ENV}=triton or "
                      f"backend='triton' to force the kernels")
            return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton); "
                               f"use backend='torch' on this machine")
        if not on_gpu and not triton_interpreted():
            raise RuntimeError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               f"importing zoo; move the tensors to CUDA or use backend='torch'")
    return backend


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: states and gate maths never run in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


LOG2_E = 1.4426950408889634  # log2(e)


def step_exp(x: torch.Tensor) -> torch.Tensor:
    """e^x computed as 2^(x·log2 e), for the one-token steps.

    On CPU, ``torch.exp`` of a float32 tensor of a few thousand elements goes through a threaded vector library: at
    2 threads on a busy machine one call took 2.7 ms against 3 µs for ``exp2`` of the same tensor, which runs inline.
    The extra rounding (one multiply) is far below the float32 tolerance of the ops.
    """
    return torch.exp2(x * LOG2_E)


L2_NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x · (Σ x² + 1e-6)^-½ over the last dimension (differentiable; no division by zero at x = 0)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)


def discretise_delta(delta: torch.Tensor, bias: torch.Tensor | None, softplus: bool, dtype: torch.dtype):
    """Δ = softplus(delta + bias) if ``softplus`` else delta + bias, in ``dtype`` (the Mamba step size)."""
    step = delta.to(dtype)
    if bias is not None:
        step = step + bias.to(dtype)
    return F.softplus(step) if softplus else step


def sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of every packed sequence; the one host read of ``cu_seqlens`` (layout metadata) a path makes."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, batch: int, length: int, device: torch.device) -> int:
    """Raise unless ``cu_seqlens`` is a 1-D int32/int64 tensor [0, ..., T] on ``device`` with batch size 1; returns
    the number of packed sequences. The value checks (start, end, order) are skipped when not checkable."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor [0, ..., T] of length N + 1 >= 2")
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: cu_seqlens must be an int32/int64 tensor, got {cu_seqlens.dtype}; build it with "
                         f"dtype=torch.int64")
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs the sequences packed along time with batch size 1, got B={batch}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if values_checkable():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != length or bool((cu_seqlens.diff() < 0).any()):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to T={length}, got "
                             f"{cu_seqlens.tolist()}; make it start at 0 and end at T={length}")
    return cu_seqlens.numel() - 1


def check_chunk_size(op: str, chunk_size, power_of_two: bool = False) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is an int >= 1 (and a power of two when the op needs one)."""
    integer = not isinstance(chunk_size, bool) and isinstance(chunk_size, int) and chunk_size >= 1
    if power_of_two and not (integer and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"{op}: chunk_size must be a power of two (1, 2, 4, ...), got {chunk_size!r}")
    if not integer:
        raise ValueError(f"{op}: chunk_size must be an integer >= 1, got {chunk_size!r}")


def nan_filled(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of NaN: kernels write their outputs into these, so anything a kernel fails to write shows up."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def check_shape(op: str, name: str, tensor: torch.Tensor, shape: tuple, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``tensor.shape`` matches ``shape`` (``None`` entries match any size)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    ok = tensor.dim() == len(shape) and all(s is None or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {expected}{hint}")


def check_floating(op: str, name: str, tensor: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` holds floating-point values."""
    if not tensor.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")


def values_checkable() -> bool:
    """Whether value checks (finite, in range) may run: they sync with the host, so they are skipped under
    ``torch.compile`` tracing and can be switched off with ``ZOO_SKIP_VALUE_CHECKS=1`` for speed."""
    if torch.compiler.is_compiling():
        return False
    return os.environ.get("ZOO_SKIP_VALUE_CHECKS", "0") in ("", "0")


def check_finite(op: str, name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or Inf (skipped when values are not checkable)."""
    if values_checkable() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf")


def check_range(op: str, name: str, tensor: torch.Tensor, low: float | None, high: float | None) -> None:
    """Raise ``ValueError`` if ``tensor`` has values outside ``[low, high]`` (skipped when not checkable)."""
    if not values_checkable():
        return
    if low is not None and bool((tensor < low).any()):
        raise ValueError(f"{op}: {name} has values below {low} (min {tensor.min().item():.4g}); "
                         f"expected a value in [{low}, {high if high is not None else 'inf'}]")
    if high is not None and bool((tensor > high).any()):
        raise ValueError(f"{op}: {name} has values above {high} (max {tensor.max().item():.4g}); "
                         f"expected a value in [{low if low is not None else '-inf'}, {high}]")


def rel_rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``||out - ref|| / ||ref||`` computed in float64 (the design's tolerance measure); ``out`` is
    moved to ``ref``'s device, so a GPU result compares with a CPU reference."""
    out64, ref64 = out.detach().to(ref.device, torch.float64), ref.detach().double()
    denom = ref64.norm().clamp_min(1e-300)
    return float((out64 - ref64).norm() / denom)


def non_finite_tokens(*tensors: torch.Tensor) -> torch.Tensor:
    """(B, T, H) bool: any of ``tensors`` ((B, T, H) or (B, T, H, ...) each) holds NaN or ±inf at token t of head h."""
    bad = None
    for tensor in tensors:
        here = ~torch.isfinite(tensor)
        here = here.flatten(3).any(-1) if here.dim() > 3 else here  # (B, T, H)
        bad = here if bad is None else bad | here
    return bad


def zero_where(bad: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, T, H, ...) with the tokens ``bad`` (B, T, H) marks set to 0, so no masked product meets them."""
    return tensor.masked_fill(bad.view(*bad.shape, *(1,) * (tensor.dim() - 3)), 0.0)


def nan_from(bad: torch.Tensor, out: torch.Tensor, bounds: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``out`` (B, T, H, ...) set to NaN from each head's first ``bad`` (B, T, H) token on: where a recurrence carries
    a non-finite input, and nowhere before it. ``bounds`` (``sequence_bounds``) restarts the count at each packed
    sequence."""
    count = bad.cumsum(1)  # (B, T, H)
    if bounds is not None:
        before = F.pad(count, (0, 0, 1, 0))[:, [start for start, end in bounds for _ in range(end - start)]]
        count = count - before  # bad tokens since the start of each token's sequence
    reached = count > 0  # (B, T, H)
    return out.masked_fill(reached.view(*reached.shape, *(1,) * (out.dim() - 3)), float("nan"))


def ever_bad(bad: torch.Tensor, bounds: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """(B or N sequences, H) bool: a ``bad`` (B, T, H) token anywhere in the row (in the packed sequence)."""
    if bounds is None:
        return bad.any(1)
    count = F.pad(bad.cumsum(1), (0, 0, 1, 0))[0]  # (T + 1, H)
    return torch.stack([count[end] - count[start] > 0 for start, end in bounds]) if bounds else bad[0, :0]


def pick_step(backend: str, triton_step, torch_step, tensors):
    """The one-token step for a resolved backend: ``triton_step`` (forward only) when the backend is Triton and none
    of ``tensors`` (None allowed) needs a gradient, else ``torch_step``."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return triton_step if backend == "triton" and not needs_grad else torch_step

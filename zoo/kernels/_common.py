"""Shared plumbing for the ops in ``zoo.kernels``: backend dispatch, input checks, Triton detection.

Every op file imports from here and nothing else in ``zoo``; the ops stay independent of each other.
Importing this module never imports Triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package is importable (a GPU is not required: see ``triton_interpreted``)."""
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


def resolve_backend(backend: str, reference_tensor: torch.Tensor, op: str) -> str:
    """Map ``backend`` to a concrete one.

    ``"auto"`` picks Triton for CUDA tensors when Triton is installed, else the chunked torch path.
    Forcing ``"triton"`` without Triton, or on CPU tensors outside the interpreter, raises a one-line error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    on_gpu = reference_tensor.is_cuda
    if backend == "auto":
        return "triton" if on_gpu and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton); "
                               f"use backend='torch' on this machine")
        if not on_gpu and not triton_interpreted():
            raise RuntimeError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               f"importing zoo; move the tensors to CUDA or use backend='torch'")
    return backend


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

"""Kernel test kit: seeded input factories per op, outputs and gradients through a random functional, relative-RMS
checks with per-dtype defaults, NaN checks, and running a script with Triton hidden.

Every op test in ``tests/kernels`` builds its inputs and compares its results with these, so a new op's tests only add
an input factory here. Tolerances follow the kernel contract: relative RMS error ``||out - ref|| / ||ref||`` per tensor,
1e-10 in float64, about 2e-3 for outputs and 1e-2 for gradients in float32 (``docs/adding-a-mixer.md``).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.utils._pytree import tree_flatten

from zoo.kernels._common import rel_rms_error, triton_available, triton_interpreted

F64 = torch.float64
REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_RUNNABLE = triton_available() and (torch.cuda.is_available() or triton_interpreted())
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where backend="triton" runs its kernels
needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs triton, and CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU")

# (outputs, gradients) relative-RMS tolerances by compute dtype (the kernel contract's defaults)
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-3, 1e-2)}


# ---------------------------------------------------------------------------------------------------------- inputs
class Draw:
    """Seeded random tensors: drawn in float64 from one generator, then cast to ``dtype`` and moved to ``device``."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = F64, device="cpu"):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype, self.device = dtype, device

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).to(self.device)

    def randn(self, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """Normal(shift, scale²)."""
        return self._cast(torch.randn(*shape, generator=self.generator, dtype=F64) * scale + shift)

    def rand(self, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """Uniform [shift, shift + scale)."""
        return self._cast(torch.rand(*shape, generator=self.generator, dtype=F64) * scale + shift)

    def unit(self, *shape) -> torch.Tensor:
        """Normal vectors scaled to unit l2 norm over the last dimension."""
        return self._cast(torch.nn.functional.normalize(torch.randn(*shape, generator=self.generator, dtype=F64),
                                                        dim=-1))

    def gates(self, *shape, scale: float = 1.0) -> torch.Tensor:
        """Uniform [0, 1] with about 10 % exact 0 and 10 % exact 1 (the ends of a gate's range), times ``scale``."""
        gate = torch.rand(*shape, generator=self.generator, dtype=F64)
        pick = torch.rand(*shape, generator=self.generator, dtype=F64)
        return self._cast(scale * torch.where(pick < 0.1, 0.0, torch.where(pick > 0.9, 1.0, gate)))


def requiring_grad(tensors):
    """The same tensors as autograd leaves (a dict's tensor values, or every tensor of a list)."""
    if isinstance(tensors, dict):
        return {name: value.requires_grad_() if isinstance(value, torch.Tensor) else value
                for name, value in tensors.items()}
    return [tensor.requires_grad_() for tensor in tensors]


SELECTIVE_SCAN_OPTIONS = ("D", "z", "delta_bias", "delta_softplus", "initial_state")


def selective_scan_inputs(batch=2, T=37, Dm=8, N=4, G=1, dtype=F64, options=SELECTIVE_SCAN_OPTIONS, seed=0,
                          device="cpu"):
    """``selective_scan`` keyword arguments, leaves requiring grad; ``options`` names the optional inputs to give."""
    draw = Draw(seed, dtype, device)
    bc_shape = (batch, T, N) if G == 1 else (batch, T, G, N)
    kwargs = dict(u=draw.randn(batch, T, Dm), delta=draw.randn(batch, T, Dm, scale=0.5, shift=-0.5),
                  A=-draw.rand(Dm, N, scale=2, shift=0.3), B=draw.randn(*bc_shape), C=draw.randn(*bc_shape))
    if "delta_softplus" not in options:  # keep Δ positive without softplus
        kwargs["delta"] = draw.rand(batch, T, Dm, scale=0.5, shift=0.05)
    if "D" in options:
        kwargs["D"] = draw.randn(Dm)
    if "z" in options:
        kwargs["z"] = draw.randn(batch, T, Dm)
    if "delta_bias" in options:
        kwargs["delta_bias"] = draw.randn(Dm, scale=0.2) if "delta_softplus" in options else draw.randn(
            Dm, scale=0.01).abs()
    if "initial_state" in options:
        kwargs["initial_state"] = draw.randn(batch, Dm, N)
    kwargs["delta_softplus"] = "delta_softplus" in options
    return requiring_grad(kwargs)


SSD_OPTIONS = ("D", "dt_bias", "dt_softplus", "initial_state")


def ssd_inputs(batch=2, T=37, H=4, P=8, G=2, N=8, dtype=F64, options=SSD_OPTIONS, n_states=None, seed=0,
               device="cpu"):
    """``ssd`` keyword arguments, leaves requiring grad; ``n_states`` initial states (default ``batch``)."""
    draw = Draw(seed, dtype, device)
    kwargs = dict(x=draw.randn(batch, T, H, P), dt=draw.randn(batch, T, H, scale=0.5, shift=-1.0),
                  A=-draw.rand(H, scale=2, shift=0.3), B=draw.randn(batch, T, G, N), C=draw.randn(batch, T, G, N))
    if "dt_softplus" not in options:  # keep Δ positive without softplus
        kwargs["dt"] = draw.rand(batch, T, H, scale=0.5, shift=0.05)
    if "D" in options:
        kwargs["D"] = draw.randn(H)
    if "dt_bias" in options:
        kwargs["dt_bias"] = draw.randn(H, scale=0.2) if "dt_softplus" in options else draw.randn(H, scale=0.01).abs()
    if "initial_state" in options:
        kwargs["initial_state"] = draw.randn(n_states or batch, H, P, N)
    kwargs["dt_softplus"] = "dt_softplus" in options
    return requiring_grad(kwargs)


def gated_delta_inputs(B, T, H, K, V, dtype=F64, normalize_k=True, num_states=None, seed=0, device="cpu"):
    """[q, k, v, g, beta, initial_state], leaves requiring grad: g in [−3, 0] with some exact 0 and some −30 entries,
    β in [0, 1], unit keys unless ``normalize_k`` is False."""
    draw = Draw(seed, F64)
    q = draw.randn(B, T, H, K)  # (B, T, H, K)
    k = draw.unit(B, T, H, K) if normalize_k else draw.randn(B, T, H, K)  # (B, T, H, K)
    v = draw.randn(B, T, H, V)  # (B, T, H, V)
    g = -3 * draw.rand(B, T, H)  # (B, T, H)
    pick = draw.rand(B, T, H)
    g = torch.where(pick < 0.1, torch.zeros_like(g), g)
    g = torch.where(pick > 0.95, torch.full_like(g, -30.0), g)
    beta = draw.rand(B, T, H)  # (B, T, H)
    initial_state = draw.randn(num_states or B, H, K, V)  # (N, H, K, V)
    return requiring_grad([x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta, initial_state)])


def hash_lookup_inputs(N=37, K=3, tau=4, d_out=40, dtype=F64, seed=0, min_abs=1e-3, device="cpu"):
    """[x (N, K·τ) with every |x| > min_abs, tables (K, 2^τ, d_out), bias (d_out,)], leaves requiring grad."""
    draw = Draw(seed, F64)
    x = draw.randn(N, K * tau)
    x = torch.where(x.abs() < min_abs, torch.full_like(x, 2 * min_abs), x)
    tables, bias = draw.randn(K, 2 ** tau, d_out), draw.randn(d_out)
    return requiring_grad([t.to(device=device, dtype=dtype) for t in (x, tables, bias)])


def titans_linear_inputs(B, T, H, K, V, dtype=F64, seed=0, state=True):
    """([q, k (unit norm), v, alpha, eta, theta], (M_0, S_0) or None): gates in [0, 1] with exact 0s and 1s."""
    draw = Draw(seed, dtype)
    q, k, v = draw.unit(B, T, H, K), draw.unit(B, T, H, K), draw.randn(B, T, H, V)
    alpha, eta, theta = (draw.gates(B, T, H) for _ in range(3))
    initial = tuple(draw.randn(B, H, K, V) for _ in range(2)) if state else None
    return [q, k, v, alpha, eta, theta], initial


def titans_mlp_inputs(B=2, T=37, H=2, d=8, E=16, L=2, dtype=F64, seed=0):
    """([q, k (unit norm), v, alpha, eta, theta (B, T, H, L)], per-head initial weights [W^1, ..., W^L]).

    α ≤ 0.1 and θ ≤ 0.1 (the layer's init is α ≈ 0.01, θ ≈ 0.1): with α near 1 the deep weights collapse towards the
    momentum, LayerNorm then divides by a tiny σ and the fp64 comparison becomes ill-conditioned (a 1e-14 change in k
    moves the outputs by 1e-7), which says nothing about the op.
    """
    draw = Draw(seed, F64)
    q, k, v = draw.unit(B, T, H, d), draw.unit(B, T, H, d), draw.randn(B, T, H, d)
    alpha, eta = draw.gates(B, T, H, scale=0.1), draw.gates(B, T, H)
    theta = draw.gates(B, T, H, L, scale=0.1)
    sizes = [d] + [E] * (L - 1) + [d]
    weights = [draw.randn(H, n_in, n_out) / n_in ** 0.5 for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return [x.to(dtype) for x in (q, k, v, alpha, eta, theta)], [w.to(dtype) for w in weights]


# ---------------------------------------------------------------------------------------------------------- results
def random_functional(tensors, seed: int = 1) -> torch.Tensor:
    """Σ_x ⟨x, w_x⟩ with cotangents w_x drawn in float64 in order from one seeded generator (independent of strides
    and devices), so every gradient of it checks a whole backward pass."""
    generator = torch.Generator().manual_seed(seed)
    return sum((x * torch.randn(x.shape, generator=generator, dtype=F64).to(x)).sum() for x in tensors)


class Results(NamedTuple):
    """What an op returned, flattened (a state tuple field by field), and the gradients of its tensor inputs."""

    outputs: list
    grads: dict


def outputs_and_grads(fn, kwargs: dict, seed: int = 1) -> Results:
    """Run ``fn(**kwargs)``; the gradients of every tensor in ``kwargs`` (None where unused) through a random linear
    functional of all its outputs."""
    outputs = [x for x in tree_flatten(fn(**kwargs))[0] if isinstance(x, torch.Tensor)]
    leaves = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    loss = random_functional(outputs, seed)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if loss.requires_grad else ()
    return Results(outputs, dict(zip(leaves, grads)))


def rel_errors(results, expected, names) -> dict:
    """name -> relative RMS error of each result tensor against its expected one."""
    return {name: rel_rms_error(got, want) for name, got, want in zip(names, results, expected)}


def assert_errors_below(errors: dict, tolerance: dict) -> None:
    """Every error below its tolerance (``tolerance[name]``, else ``tolerance["default"]``), naming the ones above."""
    bad = {name: error for name, error in errors.items() if not error <= tolerance.get(name, tolerance["default"])}
    assert not bad, f"relative RMS errors above tolerance: {bad} (all: {errors})"


def assert_close_to(out: Results, ref: Results, out_tol: float | None = None, grad_tol: float | None = None) -> None:
    """Every output and every gradient of ``out`` within relative RMS of ``ref`` (defaults by the outputs' dtype);
    each gradient must exist and be finite."""
    default_out, default_grad = TOLERANCES.get(out.outputs[0].dtype, TOLERANCES[torch.float32])
    out_tol, grad_tol = out_tol or default_out, grad_tol or default_grad
    for index, (got, want) in enumerate(zip(out.outputs, ref.outputs)):
        error = rel_rms_error(got, want)
        assert error < out_tol, f"output {index}: {error:.2e}"
    for name, want in ref.grads.items():
        got = out.grads[name]
        assert got is not None and want is not None, f"{name} got no gradient"
        assert_finite(**{f"grad {name}": got})
        assert rel_rms_error(got, want) < grad_tol, f"grad {name}: {rel_rms_error(got, want):.2e}"


def assert_finite(**named: torch.Tensor) -> None:
    """Every tensor is free of NaN and Inf, naming the ones that are not (with the ``nan_poisoned_empty`` fixture of
    tests/conftest.py this shows memory a kernel read or returned without writing it)."""
    bad = [name for name, tensor in named.items() if not bool(torch.isfinite(tensor).all())]
    assert not bad, f"not finite: {bad}"


# ---------------------------------------------------------------------------------------------------------- no triton
def run_without_triton(script: str) -> None:
    """Run ``script`` in a fresh interpreter in which ``import triton`` fails (zoo must import and run without it)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                             os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None\n" + script], check=True,
                   env=environment, cwd=REPO_ROOT)


def graph_node_names(root) -> set[str]:
    """Type names of every autograd node reachable from ``root`` (a ``grad_fn``)."""
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def assert_reference_backward_linear_in_T(reference, make_kwargs, T: int) -> None:
    """The backward of a reference loop scales linearly: at 2T it takes under 3x the time at T (median of 3), and
    its graph holds no per-step ``SelectBackward0`` / ``CopySlices`` nodes (those make the backward quadratic)."""
    def backward_seconds(length):
        kwargs = make_kwargs(length)
        times = []
        for _ in range(3):
            y, final = reference(**kwargs)
            loss = y.sum() + final.sum()
            start = time.perf_counter()
            loss.backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times), loss

    short, _ = backward_seconds(T)
    long, loss = backward_seconds(2 * T)
    assert long / short < 3, f"backward T={2 * T} / T={T} = {long / short:.2f}"
    nodes = graph_node_names(loss.grad_fn)
    assert "SelectBackward0" not in nodes and "CopySlices" not in nodes, nodes

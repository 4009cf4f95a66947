"""Mamba-1 selective scan (S6): reference loop, chunked torch path, Triton path, public op.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752, Alg. 2.
Per channel d and state n:  h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t,  y_t = C_t·h_t + D u_t  (ZOH for A, Euler for B).
The Triton kernels live in ``selective_scan_triton.py``; this file holds parts 1, 2 and 4 of the kernel contract.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels._common import (
    check_finite,
    check_floating,
    check_range,
    check_shape,
    resolve_backend,
)

__all__ = ["selective_scan", "selective_scan_reference"]

OP = "selective_scan"
CHUNK_SIZE = 64  # Q of the chunked torch path; exact for every value, only speed depends on it


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16/fp32 all compute in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _grouped(x: torch.Tensor) -> torch.Tensor:
    """(B, T, N) -> (B, T, 1, N); (B, T, G, N) unchanged."""
    return x.unsqueeze(2) if x.dim() == 3 else x


def _discretise_delta(delta, delta_bias, delta_softplus, dtype):
    """Δ = softplus(delta + bias) or delta + bias, in the compute dtype."""
    Δ = delta.to(dtype)  # (B, T, Dm)
    if delta_bias is not None:
        Δ = Δ + delta_bias.to(dtype)
    return F.softplus(Δ) if delta_softplus else Δ


def _gate(y, z):
    """out = y·silu(z) when z is given."""
    return y if z is None else y * F.silu(z.to(y.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Reference: the plainest correct loop; backward linear in T (unbind, list, one stack; no per-step indexing)
# ---------------------------------------------------------------------------------------------------------------------
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None):
    """Sequential selective scan, one time step per Python iteration (the oracle; same arguments as ``selective_scan``).

    Returns ``(y (B, T, Dm) in u's dtype, final_state (B, Dm, N) in the compute dtype)``.
    """
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    B_g, C_g = _grouped(B).to(dtype), _grouped(C).to(dtype)  # (B, T, G, N)
    G, N = B_g.shape[2], B_g.shape[3]
    Dg = Dm // G
    Δ = _discretise_delta(delta, delta_bias, delta_softplus, dtype)  # (B, T, Dm)
    u_c = u.to(dtype)
    A_g = rearrange(A.to(dtype), "(g d) n -> g d n", g=G)  # (G, Dg, N)
    if initial_state is None:
        h = u_c.new_zeros(batch, G, Dg, N)  # (B, G, Dg, N)
    else:
        h = rearrange(initial_state.to(dtype), "b (g d) n -> b g d n", g=G)
    u_steps = rearrange(u_c, "b t (g d) -> b t g d", g=G).unbind(1)
    Δ_steps = rearrange(Δ, "b t (g d) -> b t g d", g=G).unbind(1)
    ys = []
    for u_t, Δ_t, B_t, C_t in zip(u_steps, Δ_steps, B_g.unbind(1), C_g.unbind(1)):
        a_t = torch.exp(Δ_t.unsqueeze(-1) * A_g)  # (B, G, Dg, N)
        h = a_t * h + (Δ_t * u_t).unsqueeze(-1) * B_t.unsqueeze(2)  # (B, G, Dg, N)
        ys.append(torch.einsum("bgdn,bgn->bgd", h, C_t))  # (B, G, Dg)
    y = torch.stack(ys, 1).reshape(batch, T, Dm) if T > 0 else u_c.new_zeros(batch, 0, Dm)  # (B, T, Dm)
    if D is not None:
        y = y + D.to(dtype) * u_c
    y = _gate(y, z)
    return y.to(u.dtype), h.reshape(batch, Dm, N)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunked torch path: local scans inside chunks of Q steps (vectorised over chunks), then a carry across chunks
# ---------------------------------------------------------------------------------------------------------------------
def _selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None, chunk_size=CHUNK_SIZE):
    """Two-level scan: Q + T/Q Python steps, O(T·Dm·N) work, differentiable by autograd, exact for every Q."""
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    B_g, C_g = _grouped(B).to(dtype), _grouped(C).to(dtype)  # (B, T, G, N)
    G, N = B_g.shape[2], B_g.shape[3]
    Q = max(1, min(chunk_size, T))  # a chunk longer than the sequence would only add padding
    nc = max(1, -(-T // Q))
    pad = nc * Q - T
    Δ = _discretise_delta(delta, delta_bias, delta_softplus, dtype)  # (B, T, Dm)
    u_c = u.to(dtype)
    Δ_g = rearrange(Δ, "b t (g d) -> b t g d", g=G)  # (B, T, G, Dg)
    A_g = rearrange(A.to(dtype), "(g d) n -> g d n", g=G)  # (G, Dg, N)
    λ = Δ_g.unsqueeze(-1) * A_g  # (B, T, G, Dg, N), ≤ 0
    b = (Δ_g * rearrange(u_c, "b t (g d) -> b t g d", g=G)).unsqueeze(-1) * B_g.unsqueeze(3)  # (B, T, G, Dg, N)
    # pad the discretised tail with λ = 0, b = 0: the state passes through unchanged
    λ = F.pad(λ, (0, 0, 0, 0, 0, 0, 0, pad))
    b = F.pad(b, (0, 0, 0, 0, 0, 0, 0, pad))
    λ = rearrange(λ, "b (c q) g d n -> b c q g d n", q=Q)  # (B, nc, Q, G, Dg, N)
    b = rearrange(b, "b (c q) g d n -> b c q g d n", q=Q)
    decay = torch.exp(λ)  # (B, nc, Q, G, Dg, N)
    # local scan from zero inside every chunk at once
    # P_t = exp(cumsum_in_chunk(λ)) as a running product: a CPU cumsum over a middle axis is ~10x slower
    h_local, P, local, prod = [], [], None, None
    for decay_q, b_q in zip(decay.unbind(2), b.unbind(2)):
        local = b_q if local is None else decay_q * local + b_q  # (B, nc, G, Dg, N)
        prod = decay_q if prod is None else decay_q * prod  # (B, nc, G, Dg, N), in [0, 1]
        h_local.append(local)
        P.append(prod)
    h_local = torch.stack(h_local, 2)  # (B, nc, Q, G, Dg, N)
    P = torch.stack(P, 2)  # (B, nc, Q, G, Dg, N), in [0, 1]
    # carry across chunks
    if initial_state is None:
        H = u_c.new_zeros(batch, G, Dm // G, N)  # (B, G, Dg, N)
    else:
        H = rearrange(initial_state.to(dtype), "b (g d) n -> b g d n", g=G)
    starts = []
    for P_end, h_end in zip(P[:, :, -1].unbind(1), h_local[:, :, -1].unbind(1)):
        starts.append(H)
        H = P_end * H + h_end  # (B, G, Dg, N)
    H_start = torch.stack(starts, 1)  # (B, nc, G, Dg, N)
    h = h_local + P * H_start.unsqueeze(2)  # (B, nc, Q, G, Dg, N)
    C_pad = rearrange(F.pad(C_g, (0, 0, 0, 0, 0, pad)), "b (c q) g n -> b c q g n", q=Q)  # (B, nc, Q, G, N)
    y = torch.einsum("bcqgdn,bcqgn->bcqgd", h, C_pad)  # (B, nc, Q, G, Dg)
    y = rearrange(y, "b c q g d -> b (c q) (g d)")[:, :T]  # (B, T, Dm)
    if D is not None:
        y = y + D.to(dtype) * u_c
    y = _gate(y, z)
    return y.to(u.dtype), H.reshape(batch, Dm, N)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op
# ---------------------------------------------------------------------------------------------------------------------
def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_floating(OP, name, t)
    if u.dim() != 3:
        raise ValueError(f"{OP}: u must be (B, T, Dm), got shape {tuple(u.shape)}")
    batch, T, Dm = u.shape
    check_shape(OP, "delta", delta, (batch, T, Dm))
    check_shape(OP, "A", A, (Dm, None), " (Dm, N)")
    N = A.shape[1]
    if B.dim() not in (3, 4):
        raise ValueError(f"{OP}: B must be (B, T, N) or (B, T, G, N), got shape {tuple(B.shape)}")
    check_shape(OP, "B", B, (batch, T, N) if B.dim() == 3 else (batch, T, None, N))
    check_shape(OP, "C", C, tuple(B.shape), " (the same shape as B)")
    G = 1 if B.dim() == 3 else B.shape[2]
    if G == 0 or Dm % G != 0:
        raise ValueError(f"{OP}: the number of groups G={G} must divide Dm={Dm}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_floating(OP, name, t)
            check_shape(OP, name, t, (Dm,))
    if z is not None:
        check_floating(OP, "z", z)
        check_shape(OP, "z", z, (batch, T, Dm))
    if initial_state is not None:
        check_floating(OP, "initial_state", initial_state)
        check_shape(OP, "initial_state", initial_state, (batch, Dm, N))
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{OP}: all inputs must be on one device, got {sorted(map(str, devices))}")
    check_range(OP, "A", A, None, 0.0)
    check_finite(OP, "A", A)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   *, backend="auto"):
    """Mamba-1 selective scan (S6) with initial state in and final state out.

    Shapes: ``u, delta, z: (B, T, Dm)``; ``A: (Dm, N)``, negative; ``B, C: (B, T, N)`` or ``(B, T, G, N)`` with
    G | Dm (groups are contiguous channel blocks); ``D, delta_bias: (Dm,)``; ``initial_state: (B, Dm, N)``.

    For channel d, state n, g = d // (Dm / G) and t = 1..T (Gu & Dao 2023, arXiv 2312.00752)::

        Δ_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
        h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t[g]·u_t          h_0 = initial_state (or 0)
        y_t = Σ_n C_t[g]·h_t + D·u_t;   out_t = y_t·silu(z_t) if z is given

    Computes in fp32 (float64 if any input is float64). Returns ``(out (B, T, Dm) in u's dtype,
    final_state = h_T (B, Dm, N) in the compute dtype)``; every input, ``initial_state`` included, gets a gradient,
    and a loss on ``final_state`` back-propagates.

    ``backend``: ``"auto"`` (Triton on CUDA, the chunked torch path otherwise), ``"reference"`` (sequential loop),
    ``"torch"`` or ``"triton"``.

    Example::

        >>> import torch
        >>> from zoo.kernels.selective_scan import selective_scan
        >>> u, delta = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
        >>> A = -torch.rand(8, 4) - 0.5
        >>> B, C = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
        >>> y, h = selective_scan(u, delta, A, B, C, delta_softplus=True)
        >>> y.shape, h.shape
        (torch.Size([2, 10, 8]), torch.Size([2, 8, 4]))
        >>> y2, _ = selective_scan(u[:, 4:], delta[:, 4:], A, B[:, 4:], C[:, 4:], delta_softplus=True,
        ...                        initial_state=selective_scan(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4],
        ...                                                     delta_softplus=True)[1])
        >>> torch.allclose(y2, y[:, 4:], atol=1e-5)
        True
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = resolve_backend(backend, u, OP)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)
    if backend == "reference":
        return selective_scan_reference(*args)
    if backend == "triton" and u.shape[1] > 0:
        from zoo.kernels.selective_scan_triton import selective_scan_triton

        return selective_scan_triton(*args)
    return _selective_scan_chunked(*args)

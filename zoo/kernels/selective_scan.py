"""Mamba-1 selective scan (S6): reference loop, chunked torch path, Triton path, public op.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752, Alg. 2.
Per channel d and state n:  h_t = exp(Δ_t A)·h_{t-1} + Δ_t B_t u_t,  y_t = C_t·h_t + D u_t  (ZOH for A, Euler for B).
The file holds the four numbered parts of the kernel contract; part 3's kernels live in ``selective_scan_triton.py``.
Part 5 is the one-token step ``selective_scan_step`` (decoding), which the op runs by itself for T = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels._common import (check_chunk_size, check_finite, check_floating, check_range, check_shape,
                                 compute_dtype, discretise_delta, pick_step, resolve_backend, step_exp)

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_step"]

OP = "selective_scan"
CHUNK_SIZE = 64  # Q of the chunked torch path; exact for every value, only speed depends on it


def _grouped(x: torch.Tensor) -> torch.Tensor:
    """(B, T, N) -> (B, T, 1, N); (B, T, G, N) unchanged."""
    return x.unsqueeze(2) if x.dim() == 3 else x


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
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    B_g, C_g = _grouped(B).to(dtype), _grouped(C).to(dtype)  # (B, T, G, N)
    G, N = B_g.shape[2], B_g.shape[3]
    Dg = Dm // G
    Δ = discretise_delta(delta, delta_bias, delta_softplus, dtype)  # (B, T, Dm)
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
# 2. Chunked torch path: one autograd Function, time-major chunks of Q steps, states recomputed in backward
# ---------------------------------------------------------------------------------------------------------------------
class _ChunkBuffers:
    """Work tensors of one chunk, (Q, B, G, N, Dg), allocated once and reused: fresh multi-MB allocations page-fault
    on every chunk, which costs as much as the arithmetic."""

    def __init__(self, like: torch.Tensor, chunk_size: int, N: int, count: int):
        shape = (chunk_size, *like.shape[1:-1], N, like.shape[-1])
        self.tensors = [like.new_empty(shape) for _ in range(count)]

    def view(self, q: int) -> list[torch.Tensor]:
        return [t[:q] for t in self.tensors]


def _chunk_coefficients(Δ_c, u_c, A_g, B_c, a, b):
    """a_t = exp(Δ_t A) and b_t = Δ_t u_t B_t of one chunk into the buffers a, b (Q, B, G, N, Dg); returns Δu."""
    torch.mul(Δ_c.unsqueeze(-2), A_g, out=a).exp_()
    Δu = Δ_c * u_c  # (Q, B, G, Dg)
    torch.mul(Δu.unsqueeze(-2), B_c.unsqueeze(-1), out=b)
    return Δu


def _scan_chunk(a, b, h, out):
    """out[q] = a[q]·out[q-1] + b[q] with out[-1] = h: one fused op per step on (B, G, N, Dg); ``out`` may be ``b``."""
    for a_q, b_q, out_q in zip(a.unbind(0), b.unbind(0), out.unbind(0)):
        h = torch.addcmul(b_q, a_q, h, out=out_q)
    return out


def _sum_over_states(vector, states, out=None):
    """Σ_n vector[n]·states[n, d]: (Q, B, G, N) with (Q, B, G, N, Dg) -> (Q, B, G, Dg), one batched matmul."""
    lead = states.shape[:3]
    flat_out = None if out is None else out.view(-1, 1, states.shape[-1])
    result = torch.bmm(vector.reshape(-1, 1, vector.shape[-1]), states.reshape(-1, *states.shape[3:]), out=flat_out)
    return result.view(*lead, states.shape[-1])


def _sum_over_channels(vector, states, work):
    """Σ_d vector[d]·states[n, d]: (Q, B, G, Dg) with (Q, B, G, N, Dg) -> (Q, B, G, N); a long contiguous reduction
    (batched matrix-vector products this thin are several times slower on CPU)."""
    return torch.mul(states, vector.unsqueeze(-2), out=work).sum(-1)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """The S6 recurrence on discretised inputs, y_t = C_t·h_t (D, gate and softplus stay in autograd outside).

    Inputs are time-major: Δ, u (T, B, G, Dg); A (G, N, Dg); B, C (T, B, G, N); h0 (B, G, N, Dg) (the state is
    N-major so that the reductions over N are batched matmuls). Forward keeps only the chunk-start states
    (nc, B, G, N, Dg); backward recomputes each chunk's states from its
    start and runs the adjoint ĝ_t = C_t gy_t + a_{t+1}ĝ_{t+1} backwards through it, so memory is O(T·Dm + T/Q·Dm·N)
    instead of the O(T·Dm·N) an autograd scan keeps, and every step is one fused op.
    """

    @staticmethod
    def forward(ctx, Δ, u, A, B, C, h0, chunk_size):
        T, N = Δ.shape[0], A.shape[-2]
        y = Δ.new_empty(Δ.shape)  # (T, B, G, Dg)
        buffers = _ChunkBuffers(Δ, chunk_size, N, 2)
        starts, h = [], h0
        for t0 in range(0, T, chunk_size):
            sl = slice(t0, min(T, t0 + chunk_size))
            a, b = buffers.view(sl.stop - t0)
            starts.append(h)
            _chunk_coefficients(Δ[sl], u[sl], A, B[sl], a, b)
            hs = _scan_chunk(a, b, h, out=b)  # (Q, B, G, N, Dg), in place of b
            _sum_over_states(C[sl], hs, out=y[sl])
            h = hs[-1].clone()
        ctx.save_for_backward(Δ, u, A, B, C, torch.stack(starts))
        ctx.chunk_size = chunk_size
        return y, h

    @staticmethod
    def backward(ctx, gy, g_final):
        Δ, u, A, B, C, starts = ctx.saved_tensors
        Q, T, N = ctx.chunk_size, Δ.shape[0], A.shape[-2]
        gΔ, gu, gB, gC = torch.empty_like(Δ), torch.empty_like(u), torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        carry = g_final.clone()  # a_{t+1}·ĝ_{t+1} flowing into h_t (autograd passes zeros for an unused output)
        buffers = _ChunkBuffers(Δ, Q, N, 4)
        for c in reversed(range(starts.shape[0])):
            sl = slice(c * Q, min(T, (c + 1) * Q))
            a, b, hs, work = buffers.view(sl.stop - sl.start)
            Δu = _chunk_coefficients(Δ[sl], u[sl], A, B[sl], a, b)
            _scan_chunk(a, b, starts[c], out=hs)  # (Q, B, G, N, Dg)
            gC[sl] = _sum_over_channels(gy[sl], hs, work)
            hs.sub_(b)  # a_t·h_{t-1} = h_t − b_t
            g = torch.mul(gy[sl].unsqueeze(-2), C[sl].unsqueeze(-1), out=b)  # C_t gy_t, then ĝ_t in place
            g[-1] += carry
            for q in range(g.shape[0] - 2, -1, -1):
                g[q].addcmul_(a[q + 1], g[q + 1])
            carry = a[0] * g[0]
            gΔu = _sum_over_states(B[sl], g)  # (Q, B, G, Dg)
            gB[sl] = _sum_over_channels(Δu, g, work)
            gλ = hs.mul_(g)  # ĝ_t·a_t·h_{t-1}
            gΔ[sl] = torch.mul(gλ, A, out=a).sum(-2) + gΔu * u[sl]
            gA += gλ.mul_(Δ[sl].unsqueeze(-2)).sum((0, 1))
            gu[sl] = gΔu * Δ[sl]
        return gΔ, gu, gA, gB, gC, carry, None


def _selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None, chunk_size=CHUNK_SIZE):
    """The torch fast path: discretise in autograd, scan in ``_ChunkedSelectiveScan``, then D and the gate."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    B_g, C_g = _grouped(B).to(dtype), _grouped(C).to(dtype)  # (B, T, G, N)
    G, N = B_g.shape[2], B_g.shape[3]
    u_c = u.to(dtype)
    Δ = discretise_delta(delta, delta_bias, delta_softplus, dtype)  # (B, T, Dm)
    if initial_state is None:
        h0 = u_c.new_zeros(batch, G, N, Dm // G)  # (B, G, N, Dg)
    else:
        h0 = rearrange(initial_state.to(dtype), "b (g d) n -> b g n d", g=G).contiguous()
    if T == 0:
        return u.new_zeros(batch, 0, Dm), rearrange(h0, "b g n d -> b (g d) n")

    def time_major(x):  # (B, T, ...) -> (T, B, ...), contiguous
        return x.transpose(0, 1).contiguous()

    y, h = _ChunkedSelectiveScan.apply(
        time_major(rearrange(Δ, "b t (g d) -> b t g d", g=G)), time_major(rearrange(u_c, "b t (g d) -> b t g d", g=G)),
        rearrange(A.to(dtype), "(g d) n -> g n d", g=G).contiguous(), time_major(B_g), time_major(C_g), h0,
        max(1, min(chunk_size, T)))
    y = rearrange(y, "t b g d -> b t (g d)")  # (B, T, Dm)
    if D is not None:
        y = y + D.to(dtype) * u_c
    y = _gate(y, z)
    return y.to(u.dtype), rearrange(h, "b g n d -> b (g d) n")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Triton path: the kernels and their registered ops live in selective_scan_triton.py (imported only when used)
# ---------------------------------------------------------------------------------------------------------------------
def _selective_scan_triton(*args):
    from zoo.kernels.selective_scan_triton import selective_scan_triton

    return selective_scan_triton(*args)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op
# ---------------------------------------------------------------------------------------------------------------------
def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend."""
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
    check_chunk_size(OP, chunk_size)
    check_range(OP, "A", A, None, 0.0)
    check_finite(OP, "A", A)
    return resolve_backend(backend, u, OP)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   chunk_size=CHUNK_SIZE, *, backend="auto"):
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

    ``chunk_size``: time steps per chunk of the torch path (exact for every value; only speed depends on it).
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
    backend = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size, backend)
    if u.shape[1] == 1 and backend != "reference":  # decoding: the one-token step
        state = initial_state if initial_state is not None else u.new_zeros(
            u.shape[0], u.shape[2], A.shape[1], dtype=compute_dtype(u, delta, A, B, C, D, z, delta_bias))
        tensors = (u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], state, D, None if z is None else z[:, 0], delta_bias)
        y, state = step_function(backend, *tensors)(*tensors, bool(delta_softplus))
        return y[:, None], state
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)
    if backend == "reference":
        return selective_scan_reference(*args)
    if backend == "triton" and u.shape[1] > 0:
        return _selective_scan_triton(*args)
    return _selective_scan_chunked(*args, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------------------------------
# 5. One-token step (decoding)
# ---------------------------------------------------------------------------------------------------------------------
def _per_channel(x: torch.Tensor, Dm: int) -> torch.Tensor:
    """B or C of one token, (B, N) or (B, G, N), as (B, 1 or Dm, N): each group repeated over its Dm/G channels."""
    if x.dim() == 2:
        return x[:, None]
    batch, G, N = x.shape
    return x[:, :, None].expand(batch, G, Dm // G, N).reshape(batch, Dm, N) if G > 1 else x


def selective_scan_step_torch(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One token of S6 in torch (autograd through it); shapes as :func:`selective_scan_step`, no validation."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, state)
    Dm = u.shape[-1]
    Δ = discretise_delta(delta, delta_bias, delta_softplus, dtype)  # (B, Dm)
    u_c = u.to(dtype)
    B_c, C_c = _per_channel(B.to(dtype), Dm), _per_channel(C.to(dtype), Dm)  # (B, 1 or Dm, N)
    h = torch.addcmul(step_exp(Δ[..., None] * A.to(dtype)) * state.to(dtype), (Δ * u_c)[..., None], B_c)  # (B, Dm, N)
    y = (h * C_c).sum(-1)  # (B, Dm)
    if D is not None:
        y = torch.addcmul(y, D.to(dtype), u_c)
    return _gate(y, z).to(u.dtype), h


def _selective_scan_step_triton(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False):
    from zoo.kernels.selective_scan_triton import selective_scan_step_triton

    return selective_scan_step_triton(u, delta, A, B, C, state, D, z, delta_bias, delta_softplus)


def step_function(backend: str, *tensors):
    """The step for a resolved backend: the Triton kernel (forward only) when none of ``tensors`` (None allowed)
    needs a gradient, else torch."""
    return pick_step(backend, _selective_scan_step_triton, selective_scan_step_torch, tensors)


def selective_scan_step(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                        backend="auto"):
    """One token of :func:`selective_scan` from the state it returned: ``(out, new_state)`` (decoding).

    Shapes (no time axis): ``u, delta, z: (B, Dm)``; ``A: (Dm, N)``; ``B, C: (B, N)`` or ``(B, G, N)``;
    ``D, delta_bias: (Dm,)``; ``state: (B, Dm, N)`` (not modified). Same maths and dtypes as :func:`selective_scan`:
    ``h' = exp(Δ·A)·h + Δ·B·u``, ``out = (Σ_n C·h' + D·u)·silu(z)``. Returns ``(out (B, Dm) in u's dtype,
    new_state (B, Dm, N) in the compute dtype)``. ``backend``: "auto" (Triton on CUDA, else torch), "torch" or
    "triton"; the Triton step has no backward, so the torch step runs whenever an input needs a gradient.

    Example::

        >>> import torch
        >>> from zoo.kernels.selective_scan import selective_scan, selective_scan_step
        >>> u, delta = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
        >>> A = -torch.rand(8, 4) - 0.5
        >>> B, C = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
        >>> y, _ = selective_scan(u, delta, A, B, C, delta_softplus=True)
        >>> _, h = selective_scan(u[:, :9], delta[:, :9], A, B[:, :9], C[:, :9], delta_softplus=True)
        >>> y_last, h = selective_scan_step(u[:, 9], delta[:, 9], A, B[:, 9], C[:, 9], h, delta_softplus=True)
        >>> y_last.shape, torch.allclose(y_last, y[:, 9], atol=1e-5)
        (torch.Size([2, 8]), True)
    """
    op = f"{OP}_step"
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("state", state)):
        check_floating(op, name, t)
    if u.dim() != 2:
        raise ValueError(f"{op}: u must be (B, Dm) (one token, no time axis), got shape {tuple(u.shape)}")
    batch, Dm = u.shape
    check_shape(op, "delta", delta, (batch, Dm))
    check_shape(op, "A", A, (Dm, None), " (Dm, N)")
    N = A.shape[1]
    if B.dim() not in (2, 3):
        raise ValueError(f"{op}: B must be (B, N) or (B, G, N), got shape {tuple(B.shape)}")
    check_shape(op, "B", B, (batch, N) if B.dim() == 2 else (batch, None, N))
    check_shape(op, "C", C, tuple(B.shape), " (the same shape as B)")
    G = 1 if B.dim() == 2 else B.shape[1]
    if G == 0 or Dm % G != 0:
        raise ValueError(f"{op}: the number of groups G={G} must divide Dm={Dm}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_floating(op, name, t)
            check_shape(op, name, t, (Dm,))
    if z is not None:
        check_floating(op, "z", z)
        check_shape(op, "z", z, (batch, Dm))
    check_shape(op, "state", state, (batch, Dm, N), " (B, Dm, N)")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    if backend == "reference":
        raise ValueError(f"{op}: backend must be 'auto', 'torch' or 'triton', got 'reference'")
    check_range(op, "A", A, None, 0.0)
    tensors = (u, delta, A, B, C, state, D, z, delta_bias)
    return step_function(resolve_backend(backend, u, op), *tensors)(*tensors, bool(delta_softplus))

"""Mamba-2 state-space duality (SSD): reference loop, chunked torch path, Triton path, public op.

Paper: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality", arXiv 2405.21060 (Listing 1 is the chunked algorithm). Each head h (group g = h // (H/G)) carries a P×N
state:  S_t = exp(Δ_t A_h)·S_{t-1} + Δ_t·x_t ⊗ B_t[g],  y_t = S_t·C_t[g] + D_h·x_t.
The Triton kernels live in ``ssd_triton.py``; this file holds parts 1, 2 and 4 of the kernel contract.
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
    values_checkable,
)

__all__ = ["ssd", "ssd_reference"]

OP = "ssd"


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16/fp32 all compute in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _discretise_dt(dt, dt_bias, dt_softplus, dtype):
    """Δ = softplus(dt + dt_bias) or dt + dt_bias, in the compute dtype."""
    Δ = dt.to(dtype)  # (B, T, H)
    if dt_bias is not None:
        Δ = Δ + dt_bias.to(dtype)
    return F.softplus(Δ) if dt_softplus else Δ


def _sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] per packed sequence (reads cu_seqlens on the host: it is layout metadata)."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Reference: one time step per Python iteration (unbind, list, one stack); varlen loops over the sequences
# ---------------------------------------------------------------------------------------------------------------------
def _ssd_reference_dense(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, dtype):
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Δ = _discretise_dt(dt, dt_bias, dt_softplus, dtype)  # (B, T, H)
    a = Δ * A.to(dtype)  # (B, T, H), ≤ 0
    X = x.to(dtype) * Δ.unsqueeze(-1)  # (B, T, H, P)
    if initial_state is None:
        S = x.new_zeros(batch, G, H // G, P, N, dtype=dtype)  # (B, G, H/G, P, N)
    else:
        S = rearrange(initial_state.to(dtype), "b (g h) p n -> b g h p n", g=G)
    a_steps = rearrange(a, "b t (g h) -> b t g h", g=G).unbind(1)
    X_steps = rearrange(X, "b t (g h) p -> b t g h p", g=G).unbind(1)
    ys = []
    for a_t, X_t, B_t, C_t in zip(a_steps, X_steps, B.to(dtype).unbind(1), C.to(dtype).unbind(1)):
        S = torch.exp(a_t)[..., None, None] * S + torch.einsum("bghp,bgn->bghpn", X_t, B_t)  # (B, G, H/G, P, N)
        ys.append(torch.einsum("bghpn,bgn->bghp", S, C_t))  # (B, G, H/G, P)
    y = torch.stack(ys, 1).reshape(batch, T, H, P) if T > 0 else x.new_zeros(batch, 0, H, P, dtype=dtype)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    return y, S.reshape(batch, H, P, N)


def ssd_reference(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=True, initial_state=None, *,
                  cu_seqlens=None):
    """Sequential SSD recurrence (the oracle; same arguments as ``ssd``; ``chunk_size`` is ignored).

    Returns ``(y (B, T, H, P) in x's dtype, final_state (B or nseq, H, P, N) in the compute dtype)``.
    """
    dtype = _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    if cu_seqlens is None:
        y, S = _ssd_reference_dense(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, dtype)
        return y.to(x.dtype), S
    ys, finals = [], []
    for k, (start, end) in enumerate(_sequence_bounds(cu_seqlens)):
        init = None if initial_state is None else initial_state[k:k + 1]
        y, S = _ssd_reference_dense(x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], D,
                                    dt_bias, dt_softplus, init, dtype)
        ys.append(y)
        finals.append(S)
    return torch.cat(ys, 1).to(x.dtype), torch.cat(finals, 0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunked torch path (Listing 1 of the paper, with a stable segment sum and a sequential inter-chunk pass)
# ---------------------------------------------------------------------------------------------------------------------
def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = Σ_{k=j+1..i} a[..., k] for i ≥ j, −inf above the diagonal."""
    Q = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, Q)  # (..., Q_k, Q_j): entry [k, j] = a_k
    below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)  # k > j
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)  # (..., Q_i, Q_j)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))  # i ≥ j
    return seg.masked_fill(~causal, float("-inf"))


def _ssd_chunked_dense(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, seq_lens=None):
    """Dense chunked SSD; ``seq_lens`` (B,) right-pads each row after discretisation (a = 0, X = 0 past its end)."""
    dtype = _compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = chunk_size
    nc = max(1, -(-T // Q))
    pad = nc * Q - T
    x_c = x.to(dtype)
    Δ = _discretise_dt(dt, dt_bias, dt_softplus, dtype)  # (B, T, H)
    if seq_lens is not None:
        Δ = Δ * (torch.arange(T, device=x.device) < seq_lens[:, None]).unsqueeze(-1)
    a = Δ * A.to(dtype)  # (B, T, H)
    X = x_c * Δ.unsqueeze(-1)  # (B, T, H, P)
    a = rearrange(F.pad(a, (0, 0, 0, pad)), "b (c q) (g h) -> b g h c q", q=Q, g=G)  # (B, G, H/G, nc, Q)
    X = rearrange(F.pad(X, (0, 0, 0, 0, 0, pad)), "b (c q) (g h) p -> b c q g h p", q=Q, g=G)
    B_c = rearrange(F.pad(B.to(dtype), (0, 0, 0, 0, 0, pad)), "b (c q) g n -> b c q g n", q=Q)  # (B, nc, Q, G, N)
    C_c = rearrange(F.pad(C.to(dtype), (0, 0, 0, 0, 0, pad)), "b (c q) g n -> b c q g n", q=Q)
    Λ = torch.cumsum(a, -1)  # (B, G, H/G, nc, Q)
    L = torch.exp(_segsum(a))  # (B, G, H/G, nc, Q, Q)
    # 1. intra-chunk, the masked attention-like form
    CB = torch.einsum("bcign,bcjgn->bgcij", C_c, B_c)  # (B, G, nc, Q, Q)
    Y_diag = torch.einsum("bgcij,bghcij,bcjghp->bcighp", CB, L, X)  # (B, nc, Q, G, H/G, P)
    # 2. chunk states from zero: decay to the chunk end is the last row of L
    S_chunk = torch.einsum("bghcj,bcjghp,bcjgn->bcghpn", L[..., -1, :], X, B_c)  # (B, nc, G, H/G, P, N)
    # 3. sequential pass across chunks
    if initial_state is None:
        S = x_c.new_zeros(batch, G, H // G, P, N)
    else:
        S = rearrange(initial_state.to(dtype), "b (g h) p n -> b g h p n", g=G)
    chunk_decay = torch.exp(Λ[..., -1])  # (B, G, H/G, nc)
    starts = []
    for decay_c, S_c in zip(chunk_decay.unbind(-1), S_chunk.unbind(1)):
        starts.append(S)
        S = decay_c[..., None, None] * S + S_c  # (B, G, H/G, P, N)
    S_start = torch.stack(starts, 1)  # (B, nc, G, H/G, P, N)
    # 4. contribution of the state entering each chunk
    Y_off = torch.einsum("bcghpn,bcign,bghci->bcighp", S_start, C_c, torch.exp(Λ))  # (B, nc, Q, G, H/G, P)
    y = rearrange(Y_diag + Y_off, "b c q g h p -> b (c q) (g h) p")[:, :T]  # (B, T, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x_c
    return y, S.reshape(batch, H, P, N)


def _unpack(packed: torch.Tensor, bounds, max_len: int) -> torch.Tensor:
    """(1, T, ...) packed -> (nseq, max_len, ...) right-padded with zeros."""
    rows = [F.pad(packed[0, s:e], (0, 0) * (packed.dim() - 2) + (0, max_len - (e - s))) for s, e in bounds]
    return torch.stack(rows, 0)


def _repack(padded: torch.Tensor, bounds) -> torch.Tensor:
    """(nseq, max_len, ...) -> (1, T, ...)."""
    return torch.cat([padded[k, :e - s] for k, (s, e) in enumerate(bounds)], 0).unsqueeze(0)


def _varlen(dense_fn, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens):
    """Unpack to (nseq, Tmax), run a dense path that masks Δ past each row's length, repack."""
    bounds = _sequence_bounds(cu_seqlens)
    lengths = [e - s for s, e in bounds]
    max_len = max(lengths) if lengths else 0
    seq_lens = torch.tensor(lengths, device=x.device, dtype=torch.int32)
    y, final = dense_fn(_unpack(x, bounds, max_len), _unpack(dt, bounds, max_len), A, _unpack(B, bounds, max_len),
                        _unpack(C, bounds, max_len), chunk_size, D, dt_bias, dt_softplus, initial_state, seq_lens)
    return _repack(y, bounds), final


def _ssd_chunked(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens=None):
    """Chunked torch SSD, dense or varlen."""
    if cu_seqlens is None:
        y, S = _ssd_chunked_dense(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    else:
        y, S = _varlen(_ssd_chunked_dense, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state,
                       cu_seqlens)
    return y.to(x.dtype), S


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op
# ---------------------------------------------------------------------------------------------------------------------
def _validate(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, cu_seqlens):
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_floating(OP, name, t)
    if x.dim() != 4:
        raise ValueError(f"{OP}: x must be (B, T, H, P), got shape {tuple(x.shape)}")
    batch, T, H, P = x.shape
    check_shape(OP, "dt", dt, (batch, T, H))
    check_shape(OP, "A", A, (H,))
    check_shape(OP, "B", B, (batch, T, None, None), " (B, T, G, N)")
    check_shape(OP, "C", C, tuple(B.shape), " (the same shape as B)")
    G = B.shape[2]
    if G == 0 or H % G != 0:
        raise ValueError(f"{OP}: the number of groups G={G} must divide the number of heads H={H}")
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{OP}: chunk_size must be a power of two, got {chunk_size!r}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_floating(OP, name, t)
            check_shape(OP, name, t, (H,))
    states = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"{OP}: cu_seqlens needs batch size 1 (sequences packed along time), got B={batch}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{OP}: cu_seqlens must be a 1-d int32/int64 tensor (nseq + 1,), got "
                             f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
        if values_checkable():
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens.diff() < 0).any()):
                raise ValueError(f"{OP}: cu_seqlens must be non-decreasing from 0 to T={T}, got "
                                 f"{cu_seqlens.tolist()}")
        states = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_floating(OP, "initial_state", initial_state)
        check_shape(OP, "initial_state", initial_state, (states, H, P, B.shape[3]),
                    " (nseq, H, P, N)" if cu_seqlens is not None else " (B, H, P, N)")
    devices = {t.device for t in (x, dt, A, B, C, D, dt_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{OP}: all inputs must be on one device, got {sorted(map(str, devices))}")
    check_range(OP, "A", A, None, 0.0)
    check_finite(OP, "A", A)


def ssd(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=True, initial_state=None, *,
        cu_seqlens=None, backend="auto"):
    """Mamba-2 SSD scan (state-space duality) with initial states in and final states out.

    Shapes: ``x: (B, T, H, P)``; ``dt: (B, T, H)``; ``A: (H,)``, negative; ``B, C: (B, T, G, N)`` with G | H;
    ``D, dt_bias: (H,)``; ``initial_state: (B, H, P, N)``, or ``(nseq, H, P, N)`` with ``cu_seqlens``.

    Head h reads group g = h // (H/G) (Dao & Gu 2024, arXiv 2405.21060)::

        Δ_t = softplus(dt_t + dt_bias) (or dt_t + dt_bias),   a_t = Δ_t·A_h
        S_t = exp(a_t)·S_{t-1} + Δ_t·x_t ⊗ B_t[g],   y_t = S_t·C_t[g] + D_h·x_t,   S_0 = initial_state (or 0)

    ``chunk_size`` (a power of two) sets the chunk of the matmul form; results depend on it only by rounding.
    ``cu_seqlens`` (int, (nseq+1,), B == 1) packs sequences along time: sequence k starts from ``initial_state[k]``
    and ``final_state[k]`` is its state after its last token. Computes in fp32 (float64 if any input is float64).
    Returns ``(y (B, T, H, P) in x's dtype, final_state in the compute dtype)``. ``backend``: ``"auto"`` (Triton on
    CUDA, chunked torch otherwise), ``"reference"``, ``"torch"`` or ``"triton"``.

    Example::

        >>> import torch
        >>> from zoo.kernels.ssd import ssd
        >>> x, dt = torch.randn(1, 50, 4, 8), torch.randn(1, 50, 4)
        >>> A, B, C = -torch.rand(4) - 0.5, torch.randn(1, 50, 2, 16), torch.randn(1, 50, 2, 16)
        >>> y, S = ssd(x, dt, A, B, C, chunk_size=16)
        >>> y.shape, S.shape
        (torch.Size([1, 50, 4, 8]), torch.Size([1, 4, 8, 16]))
        >>> cu = torch.tensor([0, 20, 50])
        >>> y_packed, S_packed = ssd(x, dt, A, B, C, chunk_size=16, cu_seqlens=cu)
        >>> torch.allclose(y_packed[:, :20], ssd(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20])[0], atol=1e-5)
        True
    """
    _validate(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, cu_seqlens)
    backend = resolve_backend(backend, x, OP)
    args = (x, dt, A, B, C, chunk_size, D, dt_bias, bool(dt_softplus), initial_state)
    if backend == "reference":
        return ssd_reference(*args, cu_seqlens=cu_seqlens)
    if backend == "triton" and x.shape[1] > 0:
        from zoo.kernels.ssd_triton import ssd_triton

        if cu_seqlens is None:
            return ssd_triton(*args)
        y, S = _varlen(ssd_triton, *args, cu_seqlens)
        return y, S
    return _ssd_chunked(*args, cu_seqlens=cu_seqlens)

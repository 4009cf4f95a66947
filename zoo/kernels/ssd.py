"""Mamba-2 state-space duality (SSD): reference loop, chunked torch path, Triton path, public op.

Paper: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality", arXiv 2405.21060 (Listing 1 is the chunked algorithm). Each head h (group g = h // (H/G)) carries a P×N
state:  S_t = exp(Δ_t A_h)·S_{t-1} + Δ_t·x_t ⊗ B_t[g],  y_t = S_t·C_t[g] + D_h·x_t.
The file holds the four numbered parts of the kernel contract; part 3's kernels live in ``ssd_triton.py``.
Part 5 is the one-token step ``ssd_step`` (decoding), which the op runs by itself for T = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels._common import (check_chunk_size, check_cu_seqlens, check_finite, check_floating, check_range,
                                 check_shape, compute_dtype, discretise_delta, nan_from, non_finite_tokens, pick_step,
                                 resolve_backend, sequence_bounds, step_exp, zero_where)

__all__ = ["ssd", "ssd_reference", "ssd_step"]

OP = "ssd"


# ---------------------------------------------------------------------------------------------------------------------
# 1. Reference: one time step per Python iteration (unbind, list, one stack); varlen loops over the sequences
# ---------------------------------------------------------------------------------------------------------------------
def _ssd_reference_dense(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, dtype):
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Δ = discretise_delta(dt, dt_bias, dt_softplus, dtype)  # (B, T, H)
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
    dtype = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    if cu_seqlens is None:
        y, S = _ssd_reference_dense(x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, dtype)
        return y.to(x.dtype), S
    ys, finals = [], []
    for k, (start, end) in enumerate(sequence_bounds(cu_seqlens)):
        init = None if initial_state is None else initial_state[k:k + 1]
        y, S = _ssd_reference_dense(x[:, start:end], dt[:, start:end], A, B[:, start:end], C[:, start:end], D,
                                    dt_bias, dt_softplus, init, dtype)
        ys.append(y)
        finals.append(S)
    return torch.cat(ys, 1).to(x.dtype), torch.cat(finals, 0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunked torch path (Listing 1 of the paper: stable segment sum, sequential inter-chunk pass, manual backward)
# ---------------------------------------------------------------------------------------------------------------------
def _chunks(t: torch.Tensor, Q: int) -> torch.Tensor:
    """(B, T, ...) -> (B·nc, Q, ...), a view whenever the time axis has one stride (T a multiple of Q)."""
    return t.reshape(-1, Q, *t.shape[2:])


def _group_slices(G: int, width: int):
    """The channel slice of each of G equal groups of ``width`` channels."""
    return [slice(g * width // G, (g + 1) * width // G) for g in range(G)]


def _stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.stack without the copy when there is one tensor (one group, the common case)."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim)


def _outer_over_time(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_q left[q] ⊗ right[q] per group: (s, Q, H, P) with (s, Q, G, N) -> (s, G, Hg·P, N)."""
    s, Q, H, P = left.shape
    G = right.shape[2]
    flat = left.reshape(s, Q, H * P)
    return _stack([torch.bmm(flat[..., sl].transpose(1, 2), right[:, :, g])
                   for g, sl in enumerate(_group_slices(G, H * P))], 1)


def _read_out(vector: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """states·vector per group: (s, Q, G, N) with (s, G, Hg·P, N) -> (s, Q, H·P)."""
    G = vector.shape[2]
    outs = [torch.bmm(vector[:, :, g], states[:, g].transpose(1, 2)) for g in range(G)]
    return outs[0] if G == 1 else torch.cat(outs, -1)


def _contract_channels(left: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Σ over a group's channels: (s, Q, H·P) with (s, G, Hg·P, N) -> (s, Q, G, N)."""
    G = states.shape[1]
    return _stack([torch.bmm(left[..., sl], states[:, g])
                   for g, sl in enumerate(_group_slices(G, left.shape[-1]))], 2)


def _masked_CB(C_c: torch.Tensor, B_c: torch.Tensor) -> torch.Tensor:
    """(C_i·B_j) for j ≤ i, else 0: (s, Q, G, N) twice -> (G, s, Q, Q)."""
    return _stack([torch.bmm(C_c[:, :, g], B_c[:, :, g].transpose(1, 2)).tril_() for g in range(B_c.shape[2])], 0)


def _decay_matrix(a: torch.Tensor) -> torch.Tensor:
    """L_ij = exp(Σ_{k=j+1..i} a_k) for j ≤ i, and 1 above the diagonal (where C·Bᵀ is masked): a (b, nc, Q, H) ->
    (H, s, Q, Q), head-major.

    The stable segment sum: a broadcast over (Q, Q), zeroed where k ≤ j, summed down the rows. The difference of
    cumulative sums Λ_i − Λ_j would cancel catastrophically once Λ is large.
    """
    H, Q = a.shape[-1], a.shape[-2]
    a = a.permute(3, 0, 1, 2).reshape(H, -1, Q, 1).contiguous()                         # (H, s, Q_k, 1)
    below = torch.ones(Q, Q, dtype=a.dtype, device=a.device).tril_(-1)                  # [k, j] = 1 for k > j
    return (a * below).cumsum_(-2).exp_()


def _times_CB(L: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """L ⊙ C·Bᵀ of each head's group: (H, s, Q, Q) with (G, s, Q, Q)."""
    return (L.view(CB.shape[0], -1, *L.shape[1:]) * CB.unsqueeze(1)).view(L.shape)      # (G, Hg, s, Q, Q)


def _per_head_products(M: torch.Tensor, V: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """M[h]·V[:, :, h] (or M[h]ᵀ·V[:, :, h]), one matmul per head: M (H, s, Q, Q), V (s, Q, H, P) -> (H, s, Q, P)."""
    products = V.new_empty(M.shape[0], *V.shape[:2], V.shape[-1])
    for h in range(M.shape[0]):
        torch.bmm(M[h].transpose(1, 2) if transpose else M[h], V[:, :, h], out=products[h])
    return products


def _reached_per_head(bad: torch.Tensor) -> torch.Tensor:
    """(s, Q, H, 1) bool -> (H, s, Q, 1): True from each chunk's first True on (the positions a bad X reaches)."""
    return (bad.cumsum(1) > 0).permute(2, 0, 1, 3)


def _time_major(per_head: torch.Tensor) -> torch.Tensor:
    """(H, s, Q, P) -> a (s, Q, H, P) view."""
    return per_head.permute(1, 2, 0, 3)


def _dot_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis of a·b, as one batched matmul of rows (no full-size product): (..., P) -> (...)."""
    P = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, P), b.reshape(-1, P, 1)).view(a.shape[:-1])


def _pass_states(S_chunk: torch.Tensor, decay: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """S_{c+1} = decay_c·S_c + S_chunk_c from S_0: (b, nc, H, P, N), (b, nc, H), (b, H, P, N) -> (b, nc+1, H, P, N)."""
    batch, nc = S_chunk.shape[:2]
    S_all = S_chunk.new_empty(batch, nc + 1, *S_chunk.shape[2:])
    S, chunk, decays = S_all.unbind(1), S_chunk.unbind(1), decay[..., None, None].unbind(1)
    S[0].copy_(S0)
    for c in range(nc):
        S[c + 1].copy_(torch.addcmul(chunk[c], decays[c], S[c]))  # torch.compile refuses out= into a strided slice
    return S_all


def _pass_states_backward(g_read: torch.Tensor, decay: torch.Tensor, g_final: torch.Tensor, S_all: torch.Tensor):
    """Adjoint of ``_pass_states``: g_read (b, nc, H, P, N) is the gradient of each chunk-start state from its
    read-out. Returns (gradient of each chunk's S_chunk = of the state after it, gradient of S_0, gradient of each
    chunk decay (b, nc, H) = <gradient of the state after it, the state before it>, taken while both are in cache)."""
    batch, nc, H = g_read.shape[:3]
    g_after = torch.empty_like(g_read)
    g_decay = g_read.new_empty(batch, nc, H)
    g, read, decays = g_after.unbind(1), g_read.unbind(1), decay[..., None, None].unbind(1)
    S, g_d = S_all.flatten(-2).unbind(1), g_decay.unbind(1)
    g[nc - 1].copy_(g_final)
    for c in range(nc - 1, 0, -1):
        torch.linalg.vecdot(g[c].flatten(-2), S[c], out=g_d[c])
        torch.addcmul(read[c], decays[c], g[c], out=g[c - 1])
    torch.linalg.vecdot(g[0].flatten(-2), S[0], out=g_d[0])
    return g_after, torch.addcmul(read[0], decays[0], g[0]), g_decay


class _ChunkedSSD(torch.autograd.Function):
    """The SSD recurrence on discretised Δ, chunked as Listing 1 of the paper, with a hand-written backward.

    Inputs: x (b, T, H, P), Δ (b, T, H), A (H,), B, C (b, T, G, N), D (H,) or None, S0 (b, H, P, N), chunk Q | T (the
    caller pads). Tensors stay time-major as they arrive, so the state terms (chunk states and the read-out of each
    chunk-start state: most of the FLOPs) are one batched matmul over all heads of a group, and the intra-chunk term
    (C·Bᵀ ⊙ L)·X is one matmul per head. Forward keeps x, Δ, B, C, the chunk-start states, their read-out and L (its
    stable segment sum costs three passes); backward recomputes X = Δ·x, the decays and C·Bᵀ ⊙ L. Λ is the in-chunk
    cumulative sum of a = Δ·A; its gradient collects Σ_p gy·y_read (read-out), Σ_j gL_ij·L_ij − Σ_i gL_ij·L_ij
    (intra-chunk) and the chunk-state and chunk-decay terms, and a = Δ·A gets it back by a reverse cumulative sum.
    """

    @staticmethod
    def forward(ctx, x, Δ, A, B, C, D, S0, Q):
        batch, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        B_c, C_c = _chunks(B, Q), _chunks(C, Q)                                         # (s, Q, G, N), s = b·nc
        X = _chunks(x * Δ.unsqueeze(-1), Q)                                             # (s, Q, H, P)
        a = (Δ * A).view(batch, T // Q, Q, H)                                           # (b, nc, Q, H)
        Λ = torch.cumsum(a, 2)                                                          # in-chunk log decays
        L = _decay_matrix(a)                                                             # (H, s, Q, Q)
        M = _times_CB(L, _masked_CB(C_c, B_c))                                            # C·Bᵀ ⊙ L
        # M's masked zeros would still multiply a later non-finite X (0 · NaN): it enters the intra-chunk product as
        # 0, and the outputs from it on get NaN, so it reaches no earlier output (the states keep the true X)
        finite = torch.isfinite(X).all(-1, keepdim=True)                                 # (s, Q, H, 1)
        Y_diag = _per_head_products(M, X.masked_fill(~finite, 0.0))                      # (C·Bᵀ ⊙ L)·X
        Y_diag.masked_fill_(_reached_per_head(~finite), float("nan"))
        Xw = X.mul_(torch.exp(Λ[:, :, -1:] - Λ).view(-1, Q, H, 1))                       # decayed to the chunk end
        S_chunk = _outer_over_time(Xw, B_c).view(batch, T // Q, H, P, N)
        S_all = _pass_states(S_chunk, torch.exp(Λ[:, :, -1]), S0)                       # (b, nc+1, H, P, N)
        Z = _read_out(C_c, S_all[:, :-1].reshape(-1, G, H // G * P, N)).view(-1, Q, H, P)  # S_start·C_i
        y = torch.addcmul(_time_major(Y_diag), Z, torch.exp(Λ).view(-1, Q, H, 1), out=torch.empty_like(Z))
        y = y.view(batch, T, H, P)                                                      # exp(Λ)·Z + Y_diag
        if D is not None:
            y.addcmul_(x, D.view(H, 1))
        ctx.save_for_backward(x, Δ, A, B, C, D, S_all, Z, L)
        ctx.Q = Q
        return y, S_all[:, -1]

    @staticmethod
    def backward(ctx, gy, g_final):
        x, Δ, A, B, C, D, S_all, Z, L = ctx.saved_tensors
        Q = ctx.Q
        batch, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        gy = gy.contiguous()
        B_c, C_c, gY = _chunks(B, Q), _chunks(C, Q), _chunks(gy, Q)
        X = _chunks(x * Δ.unsqueeze(-1), Q)                                             # (s, Q, H, P)
        a = (Δ * A).view(batch, T // Q, Q, H)                                           # (b, nc, Q, H)
        Λ = torch.cumsum(a, 2)                                                          # in-chunk log decays
        # intra-chunk term (C·Bᵀ ⊙ L)·X
        M = _times_CB(L, _masked_CB(C_c, B_c))                                            # (H, s, Q, Q)
        gX_diag = _per_head_products(M, gY, transpose=True)                               # (H, s, Q, P)
        gM = M.new_empty(M.shape)                                                         # (H, s, Q, Q)
        for h in range(H):
            torch.bmm(gY[:, :, h], X[:, :, h].transpose(1, 2), out=gM[h])
        gCB = (L * gM).view(G, H // G, *L.shape[1:]).sum(1).tril_()                        # (G, s, Q, Q)
        gL = M.mul_(gM)                                                                   # gL_ij·L_ij
        gΛ = (gL.sum(-1) - gL.sum(-2)).permute(1, 2, 0).reshape(Λ.shape)                  # (b, nc, Q, H)
        del L, M, gM, gL
        w = torch.exp(Λ[:, :, -1:] - Λ).view(-1, Q, H, 1)
        Xw = X.mul_(w)
        # read-out of the chunk-start states, y_read = exp(Λ)·Z with Z = C·S_startᵀ
        gZ = gY * torch.exp(Λ).view(-1, Q, H, 1)                                        # (s, Q, H, P)
        S_start = S_all[:, :-1].reshape(-1, G, H // G * P, N)                            # (s, G, Hg·P, N)
        gΛ += _dot_last(gZ, Z).view(Λ.shape)
        g_read = _outer_over_time(gZ, C_c)                                               # (s, G, Hg·P, N)
        gC = _contract_channels(gZ.view(-1, Q, H * P), S_start)                          # (s, Q, G, N)
        del gZ
        # state passing, backwards; the chunk decay exp(Λ_last) multiplies S_start
        decay = torch.exp(Λ[:, :, -1])                                                   # (b, nc, H)
        g_after, g_S0, g_decay = _pass_states_backward(g_read.view(batch, -1, H, P, N), decay, g_final, S_all)
        gΛ[:, :, -1].addcmul_(g_decay, decay)
        # chunk states Σ_j w_j·X_j ⊗ B_j
        g_after = g_after.view(-1, G, H // G * P, N)
        gXw = _read_out(B_c, g_after).view(-1, Q, H, P)                                  # (s, Q, H, P)
        gB = _contract_channels(Xw.view(-1, Q, H * P), g_after)                          # (s, Q, G, N)
        g_logw = _dot_last(gXw, Xw).view(Λ.shape)
        gΛ.sub_(g_logw)
        gΛ[:, :, -1] += g_logw.sum(2)
        gX = torch.addcmul(_time_major(gX_diag), gXw, w, out=gXw)                        # (s, Q, H, P)
        for g in range(G):
            gC[:, :, g].baddbmm_(gCB[g], B_c[:, :, g])
            gB[:, :, g].baddbmm_(gCB[g].transpose(1, 2), C_c[:, :, g])
        # back to a = Δ·A and X = Δ·x
        ga = gΛ.flip(2).cumsum(2).flip(2).view(batch, T, H)                               # Λ is a cumsum of a
        gX = gX.view(batch, T, H, P)
        x = x.contiguous()
        gΔ = _dot_last(gX, x).addcmul_(ga, A)
        gA = (ga * Δ).sum((0, 1))
        gx = gX.mul_(Δ.unsqueeze(-1))
        gD = None
        if D is not None:
            gx.addcmul_(gy, D.view(H, 1))
            gD = _dot_last(gy, x).sum((0, 1))
        return gx, gΔ, gA, gB.view(B.shape), gC.view(C.shape), gD, g_S0, None


def _ssd_chunked_dense(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, seq_lens=None):
    """Dense chunked SSD; ``seq_lens`` (B,) right-pads each row after discretisation (Δ = 0 past its end)."""
    dtype = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, T, H, P = x.shape
    N = B.shape[3]
    Q = chunk_size
    pad = max(1, -(-T // Q)) * Q - T
    Δ = discretise_delta(dt, dt_bias, dt_softplus, dtype)  # (B, T, H)
    if seq_lens is not None:
        Δ = Δ * (torch.arange(T, device=x.device) < seq_lens[:, None]).unsqueeze(-1)
    x_c, B_c, C_c = x.to(dtype), B.to(dtype), C.to(dtype)
    if pad:
        x_c, Δ, B_c, C_c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x_c, Δ, B_c, C_c))
    if initial_state is None:
        S0 = x_c.new_zeros(batch, H, P, N)
    else:
        S0 = initial_state.to(dtype)
    y, S = _ChunkedSSD.apply(x_c, Δ, A.to(dtype), B_c, C_c, None if D is None else D.to(dtype), S0, Q)
    return y[:, :T], S


def _unpack(packed: torch.Tensor, bounds, max_len: int) -> torch.Tensor:
    """(1, T, ...) packed -> (nseq, max_len, ...) right-padded with zeros."""
    rows = [F.pad(packed[0, s:e], (0, 0) * (packed.dim() - 2) + (0, max_len - (e - s))) for s, e in bounds]
    return torch.stack(rows, 0)


def _repack(padded: torch.Tensor, bounds) -> torch.Tensor:
    """(nseq, max_len, ...) -> (1, T, ...)."""
    return torch.cat([padded[k, :e - s] for k, (s, e) in enumerate(bounds)], 0).unsqueeze(0)


def _varlen(dense_fn, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens):
    """Unpack to (nseq, Tmax), run a dense path that masks Δ past each row's length, repack."""
    bounds = sequence_bounds(cu_seqlens)
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
# 3. Triton path: the kernels and their registered ops live in ssd_triton.py (imported only when used)
# ---------------------------------------------------------------------------------------------------------------------
def _ssd_triton_dense(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, seq_lens=None):
    """The kernels with non-finite x, Δ and B entering as 0 and the outputs from them on and the final states after
    them NaN: their masked in-chunk products multiply by 0 (0 · NaN = NaN). C reaches only its own output."""
    from zoo.kernels.ssd_triton import ssd_triton

    bad_B = non_finite_tokens(B)  # (B, T, G)
    bad = non_finite_tokens(x, dt) | bad_B.repeat_interleave(x.shape[2] // B.shape[2], dim=2)  # (B, T, H)
    y, final = ssd_triton(zero_where(bad, x), zero_where(bad, dt), A, zero_where(bad_B, B), C, chunk_size, D, dt_bias,
                          dt_softplus, initial_state, seq_lens=seq_lens)
    return nan_from(bad, y), final.masked_fill(bad.any(1)[..., None, None], float("nan"))


def _ssd_triton(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, cu_seqlens=None):
    args = (x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    if cu_seqlens is None:
        return _ssd_triton_dense(*args)
    return _varlen(_ssd_triton_dense, *args, cu_seqlens)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op
# ---------------------------------------------------------------------------------------------------------------------
def _validate(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, cu_seqlens, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend (``"auto"`` is the torch path)."""
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
    check_chunk_size(OP, chunk_size, power_of_two=True)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_floating(OP, name, t)
            check_shape(OP, name, t, (H,))
    states = batch if cu_seqlens is None else check_cu_seqlens(OP, cu_seqlens, batch, T, x.device)
    if initial_state is not None:
        check_floating(OP, "initial_state", initial_state)
        check_shape(OP, "initial_state", initial_state, (states, H, P, B.shape[3]),
                    " (nseq, H, P, N)" if cu_seqlens is not None else " (B, H, P, N)")
    devices = {t.device for t in (x, dt, A, B, C, D, dt_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{OP}: all inputs must be on one device, got {sorted(map(str, devices))}")
    check_range(OP, "A", A, None, 0.0)
    check_finite(OP, "A", A)
    return resolve_backend(backend, x, OP, auto_triton=False)  # "auto": see ssd's docstring


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
    Returns ``(y (B, T, H, P) in x's dtype, final_state in the compute dtype)``.
    ``backend``: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``. Unlike the other ops, ``"auto"`` picks the
    chunked torch path on every device: on an H100 the Triton kernels are correct but slower than it (forward +
    backward 0.34x at T = 2048 and 0.17x at 8192 for H 24, P 64, N 128; ``benchmarks/results/triton_gpu.md``), so
    they run only when ``backend="triton"`` (or ``ZOO_BACKEND=triton``) asks for them.

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
    backend = _validate(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, cu_seqlens, backend)
    if x.shape[1] == 1 and cu_seqlens is None and backend != "reference":  # decoding: the one-token step
        state = initial_state if initial_state is not None else x.new_zeros(
            *x.shape[:1], *x.shape[2:], B.shape[3], dtype=compute_dtype(x, dt, A, B, C, D, dt_bias))
        tensors = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, D, dt_bias)
        y, state = step_function(backend, *tensors)(*tensors, bool(dt_softplus))
        return y[:, None], state
    args = (x, dt, A, B, C, chunk_size, D, dt_bias, bool(dt_softplus), initial_state)
    if backend == "reference":
        return ssd_reference(*args, cu_seqlens=cu_seqlens)
    if backend == "triton" and x.shape[1] > 0:
        return _ssd_triton(*args, cu_seqlens=cu_seqlens)
    return _ssd_chunked(*args, cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------------------------------------------------
# 5. One-token step (decoding)
# ---------------------------------------------------------------------------------------------------------------------
def ssd_step_torch(x, dt, A, B, C, state, D=None, dt_bias=None, dt_softplus=True):
    """One token of SSD in torch (autograd through it); shapes as :func:`ssd_step`, no validation."""
    dtype = compute_dtype(x, dt, A, B, C, D, dt_bias, state)
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    Δ = discretise_delta(dt, dt_bias, dt_softplus, dtype)  # (B, H)
    decay = step_exp(Δ * A.to(dtype)).view(batch, G, H // G, 1, 1)
    X = (x.to(dtype) * Δ[..., None]).view(batch, G, H // G, P, 1)  # Δ·x
    S = torch.addcmul(decay * state.to(dtype).view(batch, G, H // G, P, N), X,
                      B.to(dtype).view(batch, G, 1, 1, N))  # (B, G, H/G, P, N)
    y = (S.view(batch, G, H // G * P, N) @ C.to(dtype).view(batch, G, N, 1)).view(batch, H, P)  # S·C
    if D is not None:
        y = torch.addcmul(y, D.to(dtype)[:, None], x.to(dtype))
    return y.to(x.dtype), S.view(batch, H, P, N)


def _ssd_step_triton(x, dt, A, B, C, state, D=None, dt_bias=None, dt_softplus=True):
    from zoo.kernels.ssd_triton import ssd_step_triton

    return ssd_step_triton(x, dt, A, B, C, state, D, dt_bias, dt_softplus)


def step_function(backend: str, *tensors):
    """The step for a resolved backend: the Triton kernel (forward only) when none of ``tensors`` (None allowed)
    needs a gradient, else torch."""
    return pick_step(backend, _ssd_step_triton, ssd_step_torch, tensors)


def ssd_step(x, dt, A, B, C, state, D=None, dt_bias=None, dt_softplus=True, *, backend="auto"):
    """One token of :func:`ssd` from the state it returned: ``(y, new_state)`` (decoding).

    Shapes (no time axis): ``x: (B, H, P)``; ``dt: (B, H)``; ``A: (H,)``; ``B, C: (B, G, N)``; ``D, dt_bias: (H,)``;
    ``state: (B, H, P, N)`` (not modified). Same maths and dtypes as :func:`ssd`: ``S' = exp(Δ·A)·S + Δ·x ⊗ B``,
    ``y = S'·C + D·x``. Returns ``(y (B, H, P) in x's dtype, new_state (B, H, P, N) in the compute dtype)``.
    ``backend``: "auto" (the Triton kernel on CUDA, else torch), "torch" or "triton"; the Triton step has no
    backward, so the torch step runs whenever an input needs a gradient.

    Example::

        >>> import torch
        >>> from zoo.kernels.ssd import ssd, ssd_step
        >>> x, dt = torch.randn(1, 20, 4, 8), torch.randn(1, 20, 4)
        >>> A, B, C = -torch.rand(4) - 0.5, torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)
        >>> y, _ = ssd(x, dt, A, B, C, chunk_size=16)
        >>> _, S = ssd(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], chunk_size=16)
        >>> y_last, S = ssd_step(x[:, 19], dt[:, 19], A, B[:, 19], C[:, 19], S)
        >>> y_last.shape, torch.allclose(y_last, y[:, 19], atol=1e-5)
        (torch.Size([1, 4, 8]), True)
    """
    op = f"{OP}_step"
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("state", state)):
        check_floating(op, name, t)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, H, P) (one token, no time axis), got shape {tuple(x.shape)}")
    batch, H, P = x.shape
    check_shape(op, "dt", dt, (batch, H))
    check_shape(op, "A", A, (H,))
    check_shape(op, "B", B, (batch, None, None), " (B, G, N)")
    check_shape(op, "C", C, tuple(B.shape), " (the same shape as B)")
    G = B.shape[1]
    if G == 0 or H % G != 0:
        raise ValueError(f"{op}: the number of groups G={G} must divide the number of heads H={H}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_floating(op, name, t)
            check_shape(op, name, t, (H,))
    check_shape(op, "state", state, (batch, H, P, B.shape[2]), " (B, H, P, N)")
    devices = {t.device for t in (x, dt, A, B, C, D, dt_bias, state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    if backend == "reference":
        raise ValueError(f"{op}: backend must be 'auto', 'torch' or 'triton', got 'reference'")
    check_range(op, "A", A, None, 0.0)
    tensors = (x, dt, A, B, C, state, D, dt_bias)
    return step_function(resolve_backend(backend, x, op), *tensors)(*tensors, bool(dt_softplus))

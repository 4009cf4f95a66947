"""Part 3 of ``ssd``: Triton forward/backward kernels and the registered ops (the GPU path).

Forward (docs/mamba.md#ssd): (1) chunk cumsum Λ and chunk states S^c = Σ_j exp(Λ_Q − Λ_j)·X_j ⊗ B_j, one program per
(batch·head, chunk); (2) sequential state passing per (batch·head), fp32, from the initial state; (3) the chunk
output (C·Bᵀ ⊙ L)·X + exp(Λ)·C·S_startᵀ + D·x, recomputing C·Bᵀ and L. Stored: Δ, Λ, the chunk-start states and the
final state. Backward: (1) gS_start from the output stage; (2) reverse state passing seeded by g_final; (3) one
program per chunk for gx, gdt, gB, gC and partial sums of gA, gD, gdt_bias. Exponents are clamped to ≤ 0.

Variable-length batches reach these kernels unpacked to rows with a per-row length ``seq_lens``: Δ is 0 past a
row's end, so the state passes through unchanged and each row's final state is the state at its last token.
The same kernels run under ``TRITON_INTERPRET=1`` on CPU tensors. Importing this module without Triton succeeds.
"""
from __future__ import annotations

import torch

from zoo.kernels._common import compute_dtype, nan_filled, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from zoo.kernels._triton_math import softplus as _softplus

    @triton.jit
    def _ssd_chunk_state_fwd_kernel(x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, len_ptr, delta_ptr, Lam_ptr, Sc_ptr,
                                    T, H, G, P, N, nc,
                                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LEN: tl.constexpr,
                                    Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                                    BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        c = tl.cast(tl.program_id(1), tl.int64)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        g = h // (H // G)
        q = tl.arange(0, BLOCK_Q)
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        t = c * Q + q  # (BLOCK_Q,)
        limit = tl.load(len_ptr + b) if HAS_LEN else T
        valid = (q < Q) & (t < T) & (t < limit)
        raw = tl.load(dt_ptr + (b * T + t) * H + h, mask=valid, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h).to(COMPUTE)
        dlt = _softplus(raw) if SOFTPLUS else raw
        dlt = tl.where(valid, dlt, 0.0)  # Δ = 0 past the end: a = 0, X = 0
        Lam = tl.cumsum(dlt * tl.load(A_ptr + h).to(COMPUTE), 0)  # (BLOCK_Q,)
        Lam_last = tl.sum(tl.where(q == Q - 1, Lam, 0.0), 0)
        row = (b * H + h) * nc * Q + c * Q + q
        tl.store(delta_ptr + row, dlt, mask=q < Q)
        tl.store(Lam_ptr + row, Lam, mask=q < Q)
        xm = tl.load(x_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=valid[:, None] & (p[None, :] < P),
                     other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_P)
        Bm = tl.load(B_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=valid[:, None] & (n[None, :] < N),
                     other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_N)
        w = tl.where(valid, tl.exp(tl.minimum(Lam_last - Lam, 0.0)) * dlt, 0.0)  # decay to the chunk end, times Δ
        S = tl.dot(tl.trans(xm * w[:, None]), Bm, input_precision=PRECISION)  # (BLOCK_P, BLOCK_N)
        pn = p[:, None] * N + n[None, :]
        tl.store(Sc_ptr + ((b * nc + c) * H + h) * P * N + pn, S, mask=(p[:, None] < P) & (n[None, :] < N))

    @triton.jit
    def _ssd_state_passing_fwd_kernel(Sc_ptr, Lam_ptr, h0_ptr, Sstart_ptr, final_ptr, H, P, N, nc,
                                      HAS_H0: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
                                      BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pn = p[:, None] * N + n[None, :]
        mask = (p[:, None] < P) & (n[None, :] < N)
        if HAS_H0:
            S = tl.load(h0_ptr + (b * H + h) * P * N + pn, mask=mask, other=0.0).to(COMPUTE)
        else:
            S = tl.zeros([BLOCK_P, BLOCK_N], COMPUTE)
        for c in range(0, nc):
            c64 = tl.cast(c, tl.int64)
            off = ((b * nc + c64) * H + h) * P * N + pn
            tl.store(Sstart_ptr + off, S, mask=mask)
            decay = tl.exp(tl.load(Lam_ptr + (b * H + h) * nc * Q + c64 * Q + Q - 1))
            S = decay * S + tl.load(Sc_ptr + off, mask=mask, other=0.0)
        tl.store(final_ptr + (b * H + h) * P * N + pn, S, mask=mask)

    @triton.jit
    def _ssd_chunk_scan_fwd_kernel(x_ptr, B_ptr, C_ptr, D_ptr, delta_ptr, Lam_ptr, Sstart_ptr, y_ptr,
                                   T, H, G, P, N, nc,
                                   HAS_D: tl.constexpr, Q: tl.constexpr, BLOCK_Q: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr,
                                   PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        c = tl.cast(tl.program_id(1), tl.int64)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        g = h // (H // G)
        q = tl.arange(0, BLOCK_Q)
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        t = c * Q + q
        inside = (q < Q) & (t < T)
        row = (b * H + h) * nc * Q + c * Q + q
        dlt = tl.load(delta_ptr + row, mask=q < Q, other=0.0)
        Lam = tl.load(Lam_ptr + row, mask=q < Q, other=0.0)
        xm = tl.load(x_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=inside[:, None] & (p[None, :] < P), other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_P)
        Bm = tl.load(B_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :],
                     mask=inside[:, None] & (n[None, :] < N), other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_N)
        Cm = tl.load(C_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :],
                     mask=inside[:, None] & (n[None, :] < N), other=0.0).to(COMPUTE)
        causal = (q[:, None] >= q[None, :]) & inside[:, None] & inside[None, :]
        L = tl.where(causal, tl.exp(tl.minimum(Lam[:, None] - Lam[None, :], 0.0)), 0.0)  # (BLOCK_Q, BLOCK_Q)
        CB = tl.dot(Cm, tl.trans(Bm), input_precision=PRECISION)  # (BLOCK_Q, BLOCK_Q)
        y = tl.dot(CB * L, xm * dlt[:, None], input_precision=PRECISION)  # (BLOCK_Q, BLOCK_P)
        pn = p[:, None] * N + n[None, :]
        S0 = tl.load(Sstart_ptr + ((b * nc + c) * H + h) * P * N + pn, mask=(p[:, None] < P) & (n[None, :] < N),
                     other=0.0)  # (BLOCK_P, BLOCK_N)
        decay_in = tl.where(inside, tl.exp(tl.minimum(Lam, 0.0)), 0.0)
        y += decay_in[:, None] * tl.dot(Cm, tl.trans(S0), input_precision=PRECISION)
        if HAS_D:
            y += tl.load(D_ptr + h).to(COMPUTE) * xm
        tl.store(y_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=inside[:, None] & (p[None, :] < P))

    @triton.jit
    def _ssd_state_grad_kernel(gy_ptr, C_ptr, Lam_ptr, gSout_ptr, T, H, G, P, N, nc,
                               Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
        # gS_start^c from Y_off = exp(Λ_i)·C_i·S_startᵀ:  Σ_i exp(Λ_i)·gy_i ⊗ C_i
        pid_bh = tl.program_id(0)
        c = tl.cast(tl.program_id(1), tl.int64)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        g = h // (H // G)
        q = tl.arange(0, BLOCK_Q)
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        t = c * Q + q
        inside = (q < Q) & (t < T)
        Lam = tl.load(Lam_ptr + (b * H + h) * nc * Q + c * Q + q, mask=q < Q, other=0.0)
        gy = tl.load(gy_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=inside[:, None] & (p[None, :] < P), other=0.0).to(COMPUTE)
        Cm = tl.load(C_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :],
                     mask=inside[:, None] & (n[None, :] < N), other=0.0).to(COMPUTE)
        decay_in = tl.where(inside, tl.exp(tl.minimum(Lam, 0.0)), 0.0)
        gS = tl.dot(tl.trans(gy * decay_in[:, None]), Cm, input_precision=PRECISION)  # (BLOCK_P, BLOCK_N)
        pn = p[:, None] * N + n[None, :]
        tl.store(gSout_ptr + ((b * nc + c) * H + h) * P * N + pn, gS, mask=(p[:, None] < P) & (n[None, :] < N))

    @triton.jit
    def _ssd_state_passing_bwd_kernel(gSout_ptr, Sstart_ptr, Lam_ptr, gfinal_ptr, gSc_ptr, gLamlast_ptr, gh0_ptr,
                                      H, P, N, nc, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                                      COMPUTE: tl.constexpr):
        # reverse of S_start^{c+1} = exp(Λ_Q^c)·S_start^c + S^c, seeded by g_final
        pid_bh = tl.program_id(0)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pn = p[:, None] * N + n[None, :]
        mask = (p[:, None] < P) & (n[None, :] < N)
        g_acc = tl.load(gfinal_ptr + (b * H + h) * P * N + pn, mask=mask, other=0.0).to(COMPUTE)
        for c_rev in range(0, nc):
            c64 = tl.cast(nc - 1 - c_rev, tl.int64)
            off = ((b * nc + c64) * H + h) * P * N + pn
            tl.store(gSc_ptr + off, g_acc, mask=mask)  # gradient of the chunk state S^c
            decay = tl.exp(tl.load(Lam_ptr + (b * H + h) * nc * Q + c64 * Q + Q - 1))
            S0 = tl.load(Sstart_ptr + off, mask=mask, other=0.0)
            tl.store(gLamlast_ptr + (b * H + h) * nc + c64, decay * tl.sum(tl.sum(S0 * g_acc, 1), 0))
            g_acc = tl.load(gSout_ptr + off, mask=mask, other=0.0) + decay * g_acc
        tl.store(gh0_ptr + (b * H + h) * P * N + pn, g_acc, mask=mask)

    @triton.jit
    def _ssd_chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, C_ptr, D_ptr, len_ptr, delta_ptr, Lam_ptr,
                              Sstart_ptr, gSc_ptr, gLamlast_ptr, gy_ptr,
                              gx_ptr, gdt_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr, gbias_ptr,
                              T, H, G, P, N, nc,
                              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                              HAS_LEN: tl.constexpr, Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        c = tl.cast(tl.program_id(1), tl.int64)
        b = tl.cast(pid_bh // H, tl.int64)
        h = pid_bh % H
        g = h // (H // G)
        q = tl.arange(0, BLOCK_Q)
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        t = c * Q + q
        inside = (q < Q) & (t < T)
        limit = tl.load(len_ptr + b) if HAS_LEN else T
        valid = inside & (t < limit)
        row = (b * H + h) * nc * Q + c * Q + q
        dlt = tl.load(delta_ptr + row, mask=q < Q, other=0.0)
        Lam = tl.load(Lam_ptr + row, mask=q < Q, other=0.0)
        Lam_last = tl.sum(tl.where(q == Q - 1, Lam, 0.0), 0)
        mask_qp = inside[:, None] & (p[None, :] < P)
        mask_qn = inside[:, None] & (n[None, :] < N)
        x_off = ((b * T + t[:, None]) * H + h) * P + p[None, :]
        bc_off = ((b * T + t[:, None]) * G + g) * N + n[None, :]
        xm = tl.load(x_ptr + x_off, mask=mask_qp, other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_P)
        gy = tl.load(gy_ptr + x_off, mask=mask_qp, other=0.0).to(COMPUTE)
        Bm = tl.load(B_ptr + bc_off, mask=mask_qn, other=0.0).to(COMPUTE)  # (BLOCK_Q, BLOCK_N)
        Cm = tl.load(C_ptr + bc_off, mask=mask_qn, other=0.0).to(COMPUTE)
        pn = p[:, None] * N + n[None, :]
        mask_pn = (p[:, None] < P) & (n[None, :] < N)
        state_off = ((b * nc + c) * H + h) * P * N + pn
        S0 = tl.load(Sstart_ptr + state_off, mask=mask_pn, other=0.0)  # (BLOCK_P, BLOCK_N)
        gS = tl.load(gSc_ptr + state_off, mask=mask_pn, other=0.0)
        X = xm * dlt[:, None]
        # intra-chunk:  Y_diag = (CB ⊙ L)·X
        causal = (q[:, None] >= q[None, :]) & inside[:, None] & inside[None, :]
        L = tl.where(causal, tl.exp(tl.minimum(Lam[:, None] - Lam[None, :], 0.0)), 0.0)
        CB = tl.dot(Cm, tl.trans(Bm), input_precision=PRECISION)  # (BLOCK_Q, BLOCK_Q)
        gX = tl.dot(tl.trans(CB * L), gy, input_precision=PRECISION)  # (BLOCK_Q, BLOCK_P)
        gM = tl.dot(gy, tl.trans(X), input_precision=PRECISION)  # (BLOCK_Q, BLOCK_Q)
        gCB = gM * L
        gC = tl.dot(gCB, Bm, input_precision=PRECISION)  # (BLOCK_Q, BLOCK_N)
        gB = tl.dot(tl.trans(gCB), Cm, input_precision=PRECISION)
        gseg = gCB * CB  # ∂L/∂segsum[i, j] (L already masked)
        gLam = tl.sum(gseg, 1) - tl.sum(gseg, 0)
        # state entering the chunk:  Y_off = exp(Λ_i)·C_i·S_startᵀ
        decay_in = tl.where(inside, tl.exp(tl.minimum(Lam, 0.0)), 0.0)
        gC += decay_in[:, None] * tl.dot(gy, S0, input_precision=PRECISION)
        y_off = tl.dot(Cm, tl.trans(S0), input_precision=PRECISION)  # (BLOCK_Q, BLOCK_P)
        gLam += decay_in * tl.sum(gy * y_off, 1)
        # chunk state:  S^c = Σ_j w_j·X_j ⊗ B_j,  w_j = exp(Λ_Q − Λ_j)
        w = tl.where(inside, tl.exp(tl.minimum(Lam_last - Lam, 0.0)), 0.0)
        XG = tl.dot(X, gS, input_precision=PRECISION)  # (BLOCK_Q, BLOCK_N)
        gB += w[:, None] * XG
        gX += w[:, None] * tl.dot(Bm, tl.trans(gS), input_precision=PRECISION)
        gw = tl.sum(XG * Bm, 1) * w
        gLam -= gw
        gLam_last = tl.sum(gw, 0) + tl.load(gLamlast_ptr + (b * H + h) * nc + c)
        gLam += tl.where(q == Q - 1, gLam_last, 0.0)
        # Λ = cumsum(a):  g_a = reverse cumsum of gΛ
        g_a = tl.cumsum(gLam, 0, reverse=True)
        A_h = tl.load(A_ptr + h).to(COMPUTE)
        g_dlt = g_a * A_h + tl.sum(gX * xm, 1)
        gx = gX * dlt[:, None]
        if HAS_D:
            D_h = tl.load(D_ptr + h).to(COMPUTE)
            gx += D_h * gy
            tl.store(gD_ptr + pid_bh * nc + c, tl.sum(tl.sum(gy * xm, 1), 0))
        raw = tl.load(dt_ptr + (b * T + t) * H + h, mask=valid, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h).to(COMPUTE)
        g_raw = g_dlt * tl.sigmoid(raw) if SOFTPLUS else g_dlt
        g_raw = tl.where(valid, g_raw, 0.0)
        tl.store(gA_ptr + pid_bh * nc + c, tl.sum(g_a * dlt, 0))
        tl.store(gbias_ptr + pid_bh * nc + c, tl.sum(g_raw, 0))
        tl.store(gx_ptr + x_off, gx, mask=mask_qp)
        tl.store(gdt_ptr + (b * T + t) * H + h, g_raw, mask=inside)
        bh_off = ((b * T + t[:, None]) * H + h) * N + n[None, :]  # per-head partials, summed over heads in torch
        tl.store(gB_ptr + bh_off, gB, mask=mask_qn)
        tl.store(gC_ptr + bh_off, gC, mask=mask_qn)


def _pow2_at_least_16(n: int) -> int:
    """tl.dot needs every dimension ≥ 16 and a power of two."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _blocks(x: torch.Tensor, B: torch.Tensor, chunk_size: int, compute: torch.dtype) -> dict:
    """The kernels' block sizes and compute dtype (one fixed config per shape)."""
    P, N = x.shape[3], B.shape[3]
    return dict(Q=chunk_size, BLOCK_Q=_pow2_at_least_16(chunk_size), BLOCK_P=_pow2_at_least_16(P),
                BLOCK_N=_pow2_at_least_16(N), COMPUTE=tl.float64 if compute == torch.float64 else tl.float32)


PRECISION = "ieee"  # float32 dots stay float32 (no TF32)

# The forward and backward are registered ops (docs/training.md#compiling-a-model): torch.compile traces through them
# with their fake implementations instead of breaking the graph at an opaque autograd.Function.


@torch.library.custom_op("zoo::ssd_forward", mutates_args=())
def _forward_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, dt_bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                seq_lens: torch.Tensor | None, chunk_size: int, dt_softplus: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, T, H, P), the final state (B, H, P, N), and Δ, Λ (B, H, nc·Q) and the chunk-start states
    (B, nc, H, P, N) kept for the backward."""
    compute = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = chunk_size
    nc = -(-T // Q)
    dev = x.device
    blocks = _blocks(x, B, chunk_size, compute)
    dummy = x.new_empty(1)
    delta = nan_filled((batch, H, nc * Q), compute, dev)
    Lam = nan_filled((batch, H, nc * Q), compute, dev)
    S_chunk = nan_filled((batch, nc, H, P, N), compute, dev)
    S_start = nan_filled((batch, nc, H, P, N), compute, dev)
    final = nan_filled((batch, H, P, N), compute, dev)
    y = nan_filled((batch, T, H, P), x.dtype, dev)
    lens = seq_lens if seq_lens is not None else dummy
    _ssd_chunk_state_fwd_kernel[(batch * H, nc)](
        x, dt, A, dt_bias if dt_bias is not None else dummy, B, lens, delta, Lam, S_chunk, T, H, G, P, N, nc,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LEN=seq_lens is not None, PRECISION=PRECISION,
        **blocks)
    _ssd_state_passing_fwd_kernel[(batch * H,)](
        S_chunk, Lam, initial_state if initial_state is not None else dummy, S_start, final, H, P, N, nc,
        HAS_H0=initial_state is not None, Q=Q, BLOCK_P=blocks["BLOCK_P"], BLOCK_N=blocks["BLOCK_N"],
        COMPUTE=blocks["COMPUTE"])
    _ssd_chunk_scan_fwd_kernel[(batch * H, nc)](
        x, B, C, D if D is not None else dummy, delta, Lam, S_start, y, T, H, G, P, N, nc,
        HAS_D=D is not None, PRECISION=PRECISION, **blocks)
    return y, final, delta, Lam, S_start


@_forward_op.register_fake
def _forward_fake(x, dt, A, B, C, D, dt_bias, initial_state, seq_lens, chunk_size, dt_softplus):
    compute = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_state)
    batch, T, H, P = x.shape
    N = B.shape[3]
    nc = -(-T // chunk_size)
    delta = x.new_empty(batch, H, nc * chunk_size, dtype=compute)
    return (x.new_empty(batch, T, H, P), x.new_empty(batch, H, P, N, dtype=compute), delta, torch.empty_like(delta),
            x.new_empty(batch, nc, H, P, N, dtype=compute))


@torch.library.custom_op("zoo::ssd_backward", mutates_args=())
def _backward_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, dt_bias: torch.Tensor | None, seq_lens: torch.Tensor | None,
                 delta: torch.Tensor, Lam: torch.Tensor, S_start: torch.Tensor, gy: torch.Tensor, gfinal: torch.Tensor,
                 chunk_size: int, dt_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gx, gdt, gA, gB, gC, gD, gdt_bias, g_initial (the gradients of absent inputs come back as (1,) placeholders,
    dropped by the autograd wrapper)."""
    compute = S_start.dtype
    blocks = _blocks(x, B, chunk_size, compute)
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = chunk_size
    nc = S_start.shape[1]
    dev = x.device
    dummy = x.new_empty(1)
    gy = gy.contiguous()
    gfinal = gfinal.to(compute).contiguous()
    gS_out = nan_filled((batch, nc, H, P, N), compute, dev)
    _ssd_state_grad_kernel[(batch * H, nc)](gy, C, Lam, gS_out, T, H, G, P, N, nc, PRECISION=PRECISION, **blocks)
    gS_chunk = nan_filled((batch, nc, H, P, N), compute, dev)
    gLam_last = nan_filled((batch, H, nc), compute, dev)
    gh0 = nan_filled((batch, H, P, N), compute, dev)
    _ssd_state_passing_bwd_kernel[(batch * H,)](
        gS_out, S_start, Lam, gfinal, gS_chunk, gLam_last, gh0, H, P, N, nc, Q=Q, BLOCK_P=blocks["BLOCK_P"],
        BLOCK_N=blocks["BLOCK_N"], COMPUTE=blocks["COMPUTE"])
    gx = nan_filled((batch, T, H, P), compute, dev)
    gdt = nan_filled((batch, T, H), compute, dev)
    gB_head = nan_filled((batch, T, H, N), compute, dev)
    gC_head = nan_filled((batch, T, H, N), compute, dev)
    gA_part = nan_filled((batch, H, nc), compute, dev)
    gD_part = nan_filled((batch, H, nc), compute, dev)
    gbias_part = nan_filled((batch, H, nc), compute, dev)
    _ssd_chunk_bwd_kernel[(batch * H, nc)](
        x, dt, A, dt_bias if dt_bias is not None else dummy, B, C, D if D is not None else dummy,
        seq_lens if seq_lens is not None else dummy, delta, Lam, S_start, gS_chunk, gLam_last, gy,
        gx, gdt, gB_head, gC_head, gA_part, gD_part, gbias_part, T, H, G, P, N, nc,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_LEN=seq_lens is not None,
        PRECISION=PRECISION, **blocks)
    gB = gB_head.view(batch, T, G, H // G, N).sum(3)  # sum over each group's heads
    gC = gC_head.view(batch, T, G, H // G, N).sum(3)
    return (gx.to(x.dtype), gdt.to(dt.dtype), gA_part.sum((0, 2)).to(A.dtype), gB.to(B.dtype), gC.to(C.dtype),
            gD_part.sum((0, 2)).to(D.dtype) if D is not None else x.new_zeros(1),
            gbias_part.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else x.new_zeros(1), gh0)


@_backward_op.register_fake
def _backward_fake(x, dt, A, B, C, D, dt_bias, seq_lens, delta, Lam, S_start, gy, gfinal, chunk_size, dt_softplus):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(1)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            like(D), like(dt_bias), torch.empty_like(gfinal, dtype=S_start.dtype))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, initial_state, seq_lens, chunk_size, dt_softplus = inputs
    _, _, delta, Lam, S_start = output
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_lens, delta, Lam, S_start)
    ctx.config = (chunk_size, dt_softplus, initial_state is not None)


def _autograd_backward(ctx, gy, gfinal, *_):
    x, dt, A, B, C, D, dt_bias, seq_lens, delta, Lam, S_start = ctx.saved_tensors
    chunk_size, dt_softplus, has_h0 = ctx.config
    gx, gdt, gA, gB, gC, gD, gbias, gh0 = _backward_op(x, dt, A, B, C, D, dt_bias, seq_lens, delta, Lam, S_start, gy,
                                                      gfinal, chunk_size, dt_softplus)
    return (gx, gdt, gA, gB, gC, gD if D is not None else None, gbias if dt_bias is not None else None,
            gh0 if has_h0 else None, None, None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=True, initial_state=None,
               seq_lens=None):
    """Triton SSD (arguments as ``ssd``, inputs validated; ``seq_lens`` (B,) masks each row past its length).
    Needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        raise RuntimeError("ssd: backend='triton' needs the triton package")
    tensors = [t.contiguous() if t is not None else None for t in (x, dt, A, B, C, D, dt_bias, initial_state)]
    x, dt, A, B, C, D, dt_bias, initial_state = tensors
    y, final, *_ = _forward_op(x, dt, A, B, C, D, dt_bias, initial_state, seq_lens, int(chunk_size),
                               bool(dt_softplus))
    return y, final


# ---------------------------------------------------------------------------------------------------------------------
# The one-token step (decoding), forward only
# ---------------------------------------------------------------------------------------------------------------------
if triton_available():
    @triton.jit
    def _ssd_step_kernel(x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, C_ptr, D_ptr, S_ptr, y_ptr, S_out_ptr, H, G, P, N,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        """One (batch·head, P block): S' = exp(Δ·A)·S + Δ·x ⊗ B, y = S'·C + D·x."""
        pid_bh = tl.cast(tl.program_id(0), tl.int64)
        b, h = pid_bh // H, pid_bh % H
        g = h // (H // G)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        mask_p, mask_n = p < P, n < N
        mask_pn = mask_p[:, None] & mask_n[None, :]
        dt = tl.load(dt_ptr + pid_bh).to(COMPUTE)
        if HAS_BIAS:
            dt += tl.load(bias_ptr + h).to(COMPUTE)
        if SOFTPLUS:
            dt = _softplus(dt)
        decay = tl.exp(dt * tl.load(A_ptr + h).to(COMPUTE))
        x = tl.load(x_ptr + pid_bh * P + p, mask=mask_p, other=0.0).to(COMPUTE)  # (BLOCK_P,)
        Bt = tl.load(B_ptr + (b * G + g) * N + n, mask=mask_n, other=0.0).to(COMPUTE)  # (BLOCK_N,)
        Ct = tl.load(C_ptr + (b * G + g) * N + n, mask=mask_n, other=0.0).to(COMPUTE)
        offsets = pid_bh * P * N + p[:, None] * N + n[None, :]
        S = tl.load(S_ptr + offsets, mask=mask_pn, other=0.0).to(COMPUTE)  # (BLOCK_P, BLOCK_N)
        S = decay * S + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(S * Ct[None, :], 1)
        if HAS_D:
            y += tl.load(D_ptr + h).to(COMPUTE) * x
        tl.store(S_out_ptr + offsets, S, mask=mask_pn)
        tl.store(y_ptr + pid_bh * P + p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def ssd_step_triton(x, dt, A, B, C, state, D=None, dt_bias=None, dt_softplus=True):
    """Triton one-token step of ``ssd_step`` (inputs validated; no backward): one program per (batch·head, P block).
    Returns (y (B, H, P) in x's dtype, new state (B, H, P, N) in the compute dtype)."""
    if not triton_available():
        raise RuntimeError("ssd_step: backend='triton' needs the triton package")
    compute = compute_dtype(x, dt, A, B, C, D, dt_bias, state)
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, dt, A, B, C, D, dt_bias = (t.contiguous() if t is not None else None for t in (x, dt, A, B, C, D, dt_bias))
    state = state.to(compute).contiguous()
    y = nan_filled((batch, H, P), x.dtype, x.device)
    new_state = nan_filled((batch, H, P, N), compute, x.device)
    block_p = min(16, triton.next_power_of_2(P))
    dummy = x.new_empty(1)
    _ssd_step_kernel[(batch * H, triton.cdiv(P, block_p))](
        x, dt, A, dt_bias if dt_bias is not None else dummy, B, C, D if D is not None else dummy, state, y,
        new_state, H, G, P, N, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_D=D is not None,
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(N),
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, num_warps=4)
    return y, new_state

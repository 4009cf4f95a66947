"""Triton chunk kernels for the gated delta rule, forward and hand-written backward (docs/mom.md#backward-of-one-chunk).

Part 3 of the op in ``gated_delta.py``; imported only when ``backend="triton"`` is asked for, so ``import zoo`` never
needs Triton. Every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``): one fixed config, no autotune,
``tl.cast`` on loop variables and program ids.

Layout: the batch is folded into time, so every tensor is (T_total, H, ·) with sequence boundaries ``cu_seqlens``
(B equal sequences become ``cu_seqlens = [0, T, 2T, ...]``). A chunk is C consecutive tokens of one sequence; the
chunk → (sequence, local index) map is built on the device (no host reads). Intermediates are float32:
G (chunk-local cumsum of g), W = T diag(βe^G) K, Ũ = T diag(β) V, U = Ũ − W S, chunk-start states h and their
gradients dh. Matmuls use ``input_precision="ieee"`` so float32 stays float32 (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels._common import compute_dtype, l2_normalize


DOT = tl.constexpr("ieee")  # float32 matmuls stay float32 (no TF32); a global a kernel reads must be a constexpr
WARPS = 4  # the single fixed launch config (no autotuning: the interpreter needs one config)


def _block(n: int) -> int:
    """Power-of-two tile size ≥ 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _chunk_coordinates(cu_seqlens, chunk_seq, chunk_local, i_c, BT: tl.constexpr):
    """Sequence id, first token and real length of global chunk ``i_c`` (sequence id −1 marks an unused slot)."""
    seq = tl.load(chunk_seq + i_c)
    safe = tl.maximum(seq, 0)
    eos = tl.cast(tl.load(cu_seqlens + safe + 1), tl.int64)
    start = tl.cast(tl.load(cu_seqlens + safe), tl.int64) + tl.cast(tl.load(chunk_local + i_c), tl.int64) * BT
    return seq, start, tl.minimum(eos - start, BT)


@triton.jit
def _load_rows(ptr, start, i_h, n, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
               i_d=0, BD_OFF: tl.constexpr = 0):
    """Load a (BT, BD) float32 tile of rows start..start+n of head i_h from a (T, H, D) tensor, zero elsewhere."""
    rows = tl.arange(0, BT)
    cols = i_d * BD_OFF + tl.arange(0, BD)
    offsets = ((start + rows[:, None]) * H + i_h) * D + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < D)
    return tl.cast(tl.load(ptr + offsets, mask=mask, other=0.0), tl.float32)


@triton.jit
def _store_rows(ptr, value, start, i_h, n, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                i_d=0, BD_OFF: tl.constexpr = 0):
    """Store a (BT, BD) tile into rows start..start+n of head i_h of a (T, H, D) tensor."""
    rows = tl.arange(0, BT)
    cols = i_d * BD_OFF + tl.arange(0, BD)
    offsets = ((start + rows[:, None]) * H + i_h) * D + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < D)
    tl.store(ptr + offsets, tl.cast(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_gates(ptr, start, i_h, n, H: tl.constexpr, BT: tl.constexpr):
    """Load a (BT,) float32 gate column (g, β or G) of head i_h; zero past the sequence end."""
    rows = tl.arange(0, BT)
    return tl.cast(tl.load(ptr + (start + rows) * H + i_h, mask=rows < n, other=0.0), tl.float32)


@triton.jit
def _load_cumulative(G, start, i_h, n, H: tl.constexpr, BT: tl.constexpr):
    """Load chunk-local G (BT,) and G_n; rows past the sequence end hold G_n (no decay), so every exp(G_i − G_j)
    with j ≤ i stays ≤ 1."""
    rows = tl.arange(0, BT)
    Gc = _load_gates(G, start, i_h, n, H, BT)
    G_last = tl.sum(tl.where(rows == n - 1, Gc, 0.0), axis=0)
    return tl.where(rows < n, Gc, G_last), G_last


@triton.jit
def _load_state(ptr, base, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, i_v):
    """Load a (BK, BV) float32 tile of the K×V state at element offset ``base``."""
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    return tl.cast(tl.load(ptr + base + rk[:, None] * V + rv[None, :], mask=mask, other=0.0), tl.float32)


@triton.jit
def _store_state(ptr, value, base, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, i_v):
    """Store a (BK, BV) tile of a K×V state at element offset ``base``."""
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mask = (rk[:, None] < K) & (rv[None, :] < V)
    tl.store(ptr + base + rk[:, None] * V + rv[None, :], tl.cast(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decay_matrix(G, BT: tl.constexpr):
    """Λ_ij = exp(G_i − G_j) for j ≤ i, else 0 (masked to −inf before the exp)."""
    rows = tl.arange(0, BT)
    lower = rows[:, None] >= rows[None, :]
    return tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _ut_inverse(k, beta, Lam, BT: tl.constexpr):
    """T = (I + A)^-1 with A = strict_lower(β_i (k_i·k_j) Λ_ij), blockwise: the 16×16 diagonal blocks B by
    substitution (T ← I − A_B T, exact after 15 steps, each row converging as forward substitution does), then the
    merge (B + E)^-1 = (I + N)^-1 B^-1 with N = B^-1 E strictly block-lower, (I + N)^-1 = (I − N)(I + N²) for 4 blocks.
    """
    rows = tl.arange(0, BT)
    strict = rows[:, None] > rows[None, :]
    A = tl.where(strict, beta[:, None] * tl.dot(k, tl.trans(k), input_precision=DOT) * Lam, 0.0)  # (BT, BT)
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)  # (BT, BT)
    same_block = (rows[:, None] // 16) == (rows[None, :] // 16)
    A_diag = tl.where(same_block, A, 0.0)  # (BT, BT) diagonal blocks
    A_off = tl.where(same_block, 0.0, A)  # (BT, BT) strictly block-lower part E
    B_inv = eye
    for _ in range(15):
        B_inv = eye - tl.dot(A_diag, B_inv, input_precision=DOT)
    N = tl.dot(B_inv, A_off, input_precision=DOT)  # (BT, BT)
    N2 = tl.dot(N, N, input_precision=DOT)
    inv = tl.dot(eye - N, eye + N2, input_precision=DOT)
    if BT > 64:  # more than 4 blocks: N^4 ≠ 0
        N4 = tl.dot(N2, N2, input_precision=DOT)
        inv = tl.dot(inv, eye + N4, input_precision=DOT)
    return tl.dot(inv, B_inv, input_precision=DOT)


# ---------------------------------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _prepare_kernel(k, v, g, beta, cu_seqlens, chunk_seq, chunk_local, G_out, w_out, u_tilde_out,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr):
    """Per chunk: G = cumsum(g), T = (I + A)^-1, W = T diag(βe^G) K, Ũ = T diag(β) V. Grid (chunk slots, H)."""
    i_c = tl.cast(tl.program_id(0), tl.int64)
    i_h = tl.cast(tl.program_id(1), tl.int64)
    seq, start, n = _chunk_coordinates(cu_seqlens, chunk_seq, chunk_local, i_c, BT)
    if seq < 0:
        return
    G = tl.cumsum(_load_gates(g, start, i_h, n, H, BT), axis=0)  # (BT,)
    b = _load_gates(beta, start, i_h, n, H, BT)  # (BT,)
    kt = _load_rows(k, start, i_h, n, H, K, BT, BK)  # (BT, BK)
    vt = _load_rows(v, start, i_h, n, H, V, BT, BV)  # (BT, BV)
    Tm = _ut_inverse(kt, b, _decay_matrix(G, BT), BT)  # (BT, BT)
    w = tl.dot(Tm, (b * tl.exp(G))[:, None] * kt, input_precision=DOT)  # (BT, BK)
    u_tilde = tl.dot(Tm, b[:, None] * vt, input_precision=DOT)  # (BT, BV)
    rows = tl.arange(0, BT)
    tl.store(G_out + (start + rows) * H + i_h, G, mask=rows < n)
    _store_rows(w_out, w, start, i_h, n, H, K, BT, BK)
    _store_rows(u_tilde_out, u_tilde, start, i_h, n, H, V, BT, BV)


@triton.jit
def _state_fwd_kernel(k, w, u_tilde, G, h0, cu_seqlens, chunk_offsets, h_out, u_out, ht_out,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_H0: tl.constexpr):
    """Sequential over one sequence's chunks: store each chunk-start state and U = Ũ − W S; advance
    S' = e^{G_n} S + Kᵀ diag(e^{G_n − G}) U. Grid (cdiv(V, BV), N, H)."""
    i_v = tl.cast(tl.program_id(0), tl.int64)
    i_n = tl.cast(tl.program_id(1), tl.int64)
    i_h = tl.cast(tl.program_id(2), tl.int64)
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    first_chunk = tl.cast(tl.load(chunk_offsets + i_n), tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    state_base = (i_n * H + i_h) * K * V
    if HAS_H0:
        S = _load_state(h0, state_base, K, V, BK, BV, i_v)  # (BK, BV)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    rows = tl.arange(0, BT)
    for j in range(0, num_chunks):
        start = bos + tl.cast(j, tl.int64) * BT
        n = tl.minimum(eos - start, BT)
        _store_state(h_out, S, ((first_chunk + tl.cast(j, tl.int64)) * H + i_h) * K * V, K, V, BK, BV, i_v)
        Gc, G_last = _load_cumulative(G, start, i_h, n, H, BT)  # (BT,), scalar
        decay_to_end = tl.where(rows < n, tl.exp(G_last - Gc), 0.0)  # (BT,)
        kt = _load_rows(k, start, i_h, n, H, K, BT, BK)  # (BT, BK)
        wt = _load_rows(w, start, i_h, n, H, K, BT, BK)  # (BT, BK)
        u = _load_rows(u_tilde, start, i_h, n, H, V, BT, BV, i_v, BV) - tl.dot(wt, S, input_precision=DOT)
        _store_rows(u_out, u, start, i_h, n, H, V, BT, BV, i_v, BV)
        S = tl.exp(G_last) * S + tl.dot(tl.trans(kt * decay_to_end[:, None]), u, input_precision=DOT)
    _store_state(ht_out, S, state_base, K, V, BK, BV, i_v)


@triton.jit
def _output_kernel(q, k, u, G, h, cu_seqlens, chunk_seq, chunk_local, o_out, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
    """O = scale·(diag(e^G) Q S + ((QKᵀ) ⊙ Λ) U). Grid (chunk slots, H, cdiv(V, BV))."""
    i_c = tl.cast(tl.program_id(0), tl.int64)
    i_h = tl.cast(tl.program_id(1), tl.int64)
    i_v = tl.cast(tl.program_id(2), tl.int64)
    seq, start, n = _chunk_coordinates(cu_seqlens, chunk_seq, chunk_local, i_c, BT)
    if seq < 0:
        return
    Gc, _ = _load_cumulative(G, start, i_h, n, H, BT)  # (BT,)
    qt = _load_rows(q, start, i_h, n, H, K, BT, BK)  # (BT, BK)
    kt = _load_rows(k, start, i_h, n, H, K, BT, BK)  # (BT, BK)
    ut = _load_rows(u, start, i_h, n, H, V, BT, BV, i_v, BV)  # (BT, BV)
    S = _load_state(h, (i_c * H + i_h) * K * V, K, V, BK, BV, i_v)  # (BK, BV)
    qkl = tl.dot(qt, tl.trans(kt), input_precision=DOT) * _decay_matrix(Gc, BT)  # (BT, BT)
    o = tl.dot(qt * tl.exp(Gc)[:, None], S, input_precision=DOT) + tl.dot(qkl, ut, input_precision=DOT)
    _store_rows(o_out, scale * o, start, i_h, n, H, V, BT, BV, i_v, BV)


# ---------------------------------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _state_bwd_kernel(q, k, w, G, do, dht, cu_seqlens, chunk_offsets, dh_out, du_out, dh0_out, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_DHT: tl.constexpr):
    """Chunks in reverse with dS' in registers: store dS' per chunk and dU = scale·((QKᵀ)⊙Λ)ᵀ dO + diag(e) K dS';
    then dS = scale·Qᵀ diag(e^G) dO + e^{G_n} dS' − Wᵀ dU. Grid (cdiv(V, BV), N, H)."""
    i_v = tl.cast(tl.program_id(0), tl.int64)
    i_n = tl.cast(tl.program_id(1), tl.int64)
    i_h = tl.cast(tl.program_id(2), tl.int64)
    bos = tl.cast(tl.load(cu_seqlens + i_n), tl.int64)
    eos = tl.cast(tl.load(cu_seqlens + i_n + 1), tl.int64)
    first_chunk = tl.cast(tl.load(chunk_offsets + i_n), tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    state_base = (i_n * H + i_h) * K * V
    if HAS_DHT:
        dS = _load_state(dht, state_base, K, V, BK, BV, i_v)  # (BK, BV)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    rows = tl.arange(0, BT)
    for jj in range(0, num_chunks):
        j = num_chunks - 1 - tl.cast(jj, tl.int64)
        start = bos + j * BT
        n = tl.minimum(eos - start, BT)
        _store_state(dh_out, dS, ((first_chunk + j) * H + i_h) * K * V, K, V, BK, BV, i_v)
        Gc, G_last = _load_cumulative(G, start, i_h, n, H, BT)  # (BT,), scalar
        decay_to_end = tl.where(rows < n, tl.exp(G_last - Gc), 0.0)  # (BT,)
        qt = _load_rows(q, start, i_h, n, H, K, BT, BK)  # (BT, BK)
        kt = _load_rows(k, start, i_h, n, H, K, BT, BK)  # (BT, BK)
        wt = _load_rows(w, start, i_h, n, H, K, BT, BK)  # (BT, BK)
        dot_ = _load_rows(do, start, i_h, n, H, V, BT, BV, i_v, BV)  # (BT, BV)
        qkl = tl.dot(qt, tl.trans(kt), input_precision=DOT) * _decay_matrix(Gc, BT)  # (BT, BT)
        du = scale * tl.dot(tl.trans(qkl), dot_, input_precision=DOT) \
            + tl.dot(kt * decay_to_end[:, None], dS, input_precision=DOT)  # (BT, BV)
        _store_rows(du_out, du, start, i_h, n, H, V, BT, BV, i_v, BV)
        dS = scale * tl.dot(tl.trans(qt * tl.exp(Gc)[:, None]), dot_, input_precision=DOT) \
            + tl.exp(G_last) * dS - tl.dot(tl.trans(wt), du, input_precision=DOT)
    _store_state(dh0_out, dS, state_base, K, V, BK, BV, i_v)


@triton.jit
def _chunk_bwd_kernel(q, k, v, beta, G, u, du, do, h, dh, cu_seqlens, chunk_seq, chunk_local,
                      dq_out, dk_out, dv_out, dbeta_out, dg_out, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr):
    """Per chunk, given S, dS', U, dU: UT-transform backward, dq, dk, dv, dβ, dg (docs/mom.md#backward-of-one-chunk).
    Grid (chunk slots, H); K and V each fit one tile."""
    i_c = tl.cast(tl.program_id(0), tl.int64)
    i_h = tl.cast(tl.program_id(1), tl.int64)
    seq, start, n = _chunk_coordinates(cu_seqlens, chunk_seq, chunk_local, i_c, BT)
    if seq < 0:
        return
    rows = tl.arange(0, BT)
    valid = rows < n
    inclusive = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    Gc, G_last = _load_cumulative(G, start, i_h, n, H, BT)  # (BT,), scalar
    b = _load_gates(beta, start, i_h, n, H, BT)  # (BT,)
    eG = tl.where(valid, tl.exp(Gc), 0.0)  # (BT,) e^{G_i}
    decay_to_end = tl.where(valid, tl.exp(G_last - Gc), 0.0)  # (BT,) e_i
    qt = _load_rows(q, start, i_h, n, H, K, BT, BK)  # (BT, BK)
    kt = _load_rows(k, start, i_h, n, H, K, BT, BK)  # (BT, BK)
    vt = _load_rows(v, start, i_h, n, H, V, BT, BV)  # (BT, BV)
    ut = _load_rows(u, start, i_h, n, H, V, BT, BV)  # (BT, BV)
    dut = _load_rows(du, start, i_h, n, H, V, BT, BV)  # (BT, BV)
    dot_ = _load_rows(do, start, i_h, n, H, V, BT, BV)  # (BT, BV)
    S = _load_state(h, (i_c * H + i_h) * K * V, K, V, BK, BV, 0)  # (BK, BV) chunk-start state
    dS_end = _load_state(dh, (i_c * H + i_h) * K * V, K, V, BK, BV, 0)  # (BK, BV) gradient of the chunk-end state

    Lam = _decay_matrix(Gc, BT)  # (BT, BT)
    kk = tl.dot(kt, tl.trans(kt), input_precision=DOT)  # (BT, BT)
    qk = tl.dot(qt, tl.trans(kt), input_precision=DOT)  # (BT, BT)
    Tm = _ut_inverse(kt, b, Lam, BT)  # (BT, BT)
    x_w = (b * eG)[:, None] * kt  # (BT, BK)
    x_u = b[:, None] * vt  # (BT, BV)

    # UT transform: W = T X_w, Ũ = T X_u, with dW = −dU Sᵀ and dŨ = dU.
    dw = -tl.dot(dut, tl.trans(S), input_precision=DOT)  # (BT, BK)
    dx_w = tl.dot(tl.trans(Tm), dw, input_precision=DOT)  # (BT, BK)
    dx_u = tl.dot(tl.trans(Tm), dut, input_precision=DOT)  # (BT, BV)
    dT = tl.dot(dw, tl.trans(x_w), input_precision=DOT) + tl.dot(dut, tl.trans(x_u), input_precision=DOT)
    dA = -tl.dot(tl.dot(tl.trans(Tm), dT, input_precision=DOT), tl.trans(Tm), input_precision=DOT)
    dA = tl.where(strict, dA, 0.0)  # (BT, BT)

    # Inputs.
    dou = tl.dot(dot_, tl.trans(ut), input_precision=DOT)  # (BT, BT) dO Uᵀ
    m_o = tl.where(inclusive, dou * Lam, 0.0)  # (BT, BT)
    d_a = dA * b[:, None] * Lam  # (BT, BT) D_A
    dq = scale * (eG[:, None] * tl.dot(dot_, tl.trans(S), input_precision=DOT)
                  + tl.dot(m_o, kt, input_precision=DOT))  # (BT, BK)
    k_ds = tl.dot(kt, dS_end, input_precision=DOT)  # (BT, BV) K dS'
    dk = scale * tl.dot(tl.trans(m_o), qt, input_precision=DOT) \
        + decay_to_end[:, None] * tl.dot(ut, tl.trans(dS_end), input_precision=DOT) \
        + (b * eG)[:, None] * dx_w + tl.dot(d_a, kt, input_precision=DOT) \
        + tl.dot(tl.trans(d_a), kt, input_precision=DOT)  # (BT, BK)
    dv = b[:, None] * dx_u  # (BT, BV)
    dxw_k = tl.sum(dx_w * kt, axis=1)  # (BT,) ⟨dX_w,i, k_i⟩
    db = eG * dxw_k + tl.sum(dx_u * vt, axis=1) + tl.sum(dA * kk * Lam, axis=1)  # (BT,)

    # Gate: dG_i, then dg = reverse cumsum of dG.
    dLam = tl.where(inclusive, scale * dou * qk, 0.0) + dA * b[:, None] * kk  # (BT, BT)
    p = dLam * Lam  # (BT, BT)
    qs = tl.dot(qt, S, input_precision=DOT)  # (BT, BV) Q S
    delta = decay_to_end * tl.sum(k_ds * ut, axis=1)  # (BT,) δ_i = e_i ⟨k_i dS', U_i⟩
    dG = scale * eG * tl.sum(dot_ * qs, axis=1) + tl.sum(p, axis=1) - tl.sum(p, axis=0) + b * eG * dxw_k - delta
    end_term = tl.sum(delta, axis=0) + tl.exp(G_last) * tl.sum(tl.sum(S * dS_end, axis=1), axis=0)
    dG = tl.where(rows == n - 1, dG + end_term, dG)
    dg = tl.sum(tl.where(rows[:, None] >= rows[None, :], dG[:, None], 0.0), axis=0)  # (BT,) Σ_{i ≥ t} dG_i

    _store_rows(dq_out, dq, start, i_h, n, H, K, BT, BK)
    _store_rows(dk_out, dk, start, i_h, n, H, K, BT, BK)
    _store_rows(dv_out, dv, start, i_h, n, H, V, BT, BV)
    tl.store(dbeta_out + (start + rows) * H + i_h, db, mask=valid)
    tl.store(dg_out + (start + rows) * H + i_h, dg, mask=valid)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers and the registered ops (forward, backward, fake implementations and autograd)
# ---------------------------------------------------------------------------------------------------------------------

def _chunk_map(cu_seqlens: torch.Tensor, total: int, chunk_size: int):
    """On-device chunk → (sequence, local chunk) map over the static bound ⌈T/C⌉ + N slots; unused slots get −1."""
    N = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (N,)
    chunks = (lengths + chunk_size - 1) // chunk_size  # (N,)
    chunk_offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])  # (N + 1,)
    slots = torch.arange(triton.cdiv(total, chunk_size) + N, device=cu_seqlens.device)  # (slots,)
    seq = torch.searchsorted(chunk_offsets[1:].contiguous(), slots, right=True)  # (slots,)
    local = slots - chunk_offsets[seq.clamp(max=N - 1)]  # (slots,)
    seq = torch.where(slots < chunk_offsets[-1], seq, -1)
    return seq.to(torch.int32), local.to(torch.int32), chunk_offsets, slots.numel()


def _states(q, k, v, g, beta, h0, cu_seqlens, chunk_size):
    """Prepare and state kernels: G, W, U, the chunk-start states h, the final state and the chunk map.
    The forward runs them once; the backward runs them again instead of keeping h (slots × H × K × V) alive."""
    T, H, K = k.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    chunk_seq, chunk_local, chunk_offsets, slots = _chunk_map(cu_seqlens, T, chunk_size)
    BT, BK, BV = chunk_size, _block(K), _block(V)
    G = torch.empty(T, H, dtype=torch.float32, device=q.device)  # (T, H)
    w = torch.empty(T, H, K, dtype=torch.float32, device=q.device)  # (T, H, K)
    u_tilde = torch.empty(T, H, V, dtype=torch.float32, device=q.device)  # (T, H, V)
    _prepare_kernel[(slots, H)](k, v, g, beta, cu_seqlens, chunk_seq, chunk_local, G, w, u_tilde,
                                H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, num_warps=WARPS)
    h = torch.empty(slots, H, K, V, dtype=torch.float32, device=q.device)  # (slots, H, K, V) chunk-start states
    u = torch.empty(T, H, V, dtype=torch.float32, device=q.device)  # (T, H, V)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)  # (N, H, K, V)
    BV_state = min(BV, 64)
    _state_fwd_kernel[(triton.cdiv(V, BV_state), N, H)](
        k, w, u_tilde, G, h0 if h0 is not None else ht, cu_seqlens, chunk_offsets, h, u, ht,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_state, HAS_H0=h0 is not None, num_warps=WARPS)
    return ht, (G, w, u, h, chunk_seq, chunk_local, chunk_offsets, slots)


def _forward(q, k, v, g, beta, h0, cu_seqlens, scale, chunk_size):
    """Run the forward kernels; returns o (T, H, V) in v's dtype and the final state (N, H, K, V) in float32."""
    T, H, K = k.shape
    V = v.shape[-1]
    ht, (G, _, u, h, chunk_seq, chunk_local, _, slots) = _states(q, k, v, g, beta, h0, cu_seqlens, chunk_size)
    BV_state = min(_block(V), 64)
    o = torch.empty(T, H, V, dtype=v.dtype, device=q.device)  # (T, H, V)
    _output_kernel[(slots, H, triton.cdiv(V, BV_state))](
        q, k, u, G, h, cu_seqlens, chunk_seq, chunk_local, o, scale,
        H=H, K=K, V=V, BT=chunk_size, BK=_block(K), BV=BV_state, num_warps=WARPS)
    return o, ht


def _backward(q, k, v, beta, h0, cu_seqlens, scale, chunk_size, do, dht, saved):
    """Run the backward kernels; returns dq, dk, dv, dg, dβ, dh0 (float32)."""
    G, w, u, h, chunk_seq, chunk_local, chunk_offsets, slots = saved
    T, H, K = k.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BT, BK, BV = chunk_size, _block(K), _block(V)
    BV_state = min(BV, 64)
    dh = torch.empty(slots, H, K, V, dtype=torch.float32, device=q.device)  # (slots, H, K, V)
    du = torch.empty(T, H, V, dtype=torch.float32, device=q.device)  # (T, H, V)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)  # (N, H, K, V)
    _state_bwd_kernel[(triton.cdiv(V, BV_state), N, H)](
        q, k, w, G, do, dht if dht is not None else dh0, cu_seqlens, chunk_offsets, dh, du, dh0, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_state, HAS_DHT=dht is not None, num_warps=WARPS)
    dq = torch.empty(T, H, K, dtype=torch.float32, device=q.device)  # (T, H, K)
    dk = torch.empty(T, H, K, dtype=torch.float32, device=q.device)  # (T, H, K)
    dv = torch.empty(T, H, V, dtype=torch.float32, device=q.device)  # (T, H, V)
    dbeta = torch.empty(T, H, dtype=torch.float32, device=q.device)  # (T, H)
    dg = torch.empty(T, H, dtype=torch.float32, device=q.device)  # (T, H)
    _chunk_bwd_kernel[(slots, H)](
        q, k, v, beta, G, u, du, do, h, dh, cu_seqlens, chunk_seq, chunk_local, dq, dk, dv, dbeta, dg, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, num_warps=WARPS)
    return dq, dk, dv, dg, dbeta, dh0


# The forward and backward are registered ops (docs/training.md#compiling-a-model): torch.compile traces through them
# with their fake implementations instead of breaking the graph at an opaque autograd.Function.

@torch.library.custom_op("zoo::gated_delta_rule_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, scale: float,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o (T, H, V) in v's dtype and the final state (N, H, K, V) in float32 of packed (T, H, ·) inputs."""
    return _forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size)


@_forward_op.register_fake
def _forward_fake(q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size):
    T, H, K = k.shape
    N = cu_seqlens.shape[0] - 1
    return v.new_empty(T, H, v.shape[-1]), q.new_empty(N, H, K, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("zoo::gated_delta_rule_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor, scale: float, chunk_size: int,
                 do: torch.Tensor, dht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dg, dβ in the inputs' dtypes and dh0 (N, H, K, V) in float32. The backward recomputes G, T, W, U
    and the chunk-start states from the inputs, runs the reverse state kernel (dS per chunk and dU), then the
    per-chunk kernel for dq, dk, dv, dβ and dg (docs/mom.md#backward-of-one-chunk)."""
    _, saved = _states(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    dq, dk, dv, dg, dbeta, dh0 = _backward(q, k, v, beta, initial_state, cu_seqlens, scale, chunk_size,
                                           do.contiguous(), dht.contiguous(), saved)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype), dh0


@_backward_op.register_fake
def _backward_fake(q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size, do, dht):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(dht, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _autograd_backward(ctx, do, dht):
    q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, dh0 = _backward_op(q, k, v, g, beta, initial_state, cu_seqlens, ctx.scale, ctx.chunk_size,
                                              do, dht)
    return (dq, dk, dv, dg, dbeta, dh0.to(initial_state.dtype) if initial_state is not None else None,
            None, None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def gated_delta_rule_triton(q, k, v, g, beta, initial_state=None, cu_seqlens=None, scale=None, use_qk_l2norm=False,
                            chunk_size=64):
    """The Triton path of ``gated_delta_rule`` (same arguments and returns; inputs already validated).

    Computes in float32 (float64 inputs are rounded to float32; outputs are cast back to the documented dtypes).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    state_dtype = compute_dtype(q)
    out_dtype = v.dtype
    if use_qk_l2norm:  # in float32, with autograd through the norm
        q, k = l2_normalize(q.float()), l2_normalize(k.float())
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=q.device, dtype=torch.int64) * T  # (B + 1,)
    kernel_dtype = (lambda x: x.float()) if q.dtype == torch.float64 else (lambda x: x)
    q, k, v = (kernel_dtype(x).reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v))  # (B·T, H, ·)
    g, beta = (x.float().reshape(B * T, H).contiguous() for x in (g, beta))  # (B·T, H)
    h0 = initial_state.float().contiguous() if initial_state is not None else None  # (N, H, K, V)
    o, final_state = _forward_op(q, k, v, g, beta, h0, cu_seqlens.contiguous(), scale, chunk_size)
    return o.reshape(B, T, H, V).to(out_dtype), final_state.to(state_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The one-token step (decoding), forward only
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _step_kernel(q, k, v, g, beta, state, o_out, state_out, scale, H: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One (batch·head, value tile): S' = e^g S + k uᵀ with u = β(v − e^g Sᵀk), o = scale·(e^g Sᵀq + (q·k) u)."""
    i_bh, i_v = tl.cast(tl.program_id(0), tl.int64), tl.cast(tl.program_id(1), tl.int64)
    rows, cols = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    row_ok, col_ok = rows < K, cols < V
    q_t = tl.cast(tl.load(q + i_bh * K + rows, mask=row_ok, other=0.0), tl.float32)  # (BK,)
    k_t = tl.cast(tl.load(k + i_bh * K + rows, mask=row_ok, other=0.0), tl.float32)
    v_t = tl.cast(tl.load(v + i_bh * V + cols, mask=col_ok, other=0.0), tl.float32)  # (BV,)
    decay = tl.exp(tl.cast(tl.load(g + i_bh), tl.float32))
    b = tl.cast(tl.load(beta + i_bh), tl.float32)
    offsets = i_bh * K * V + rows[:, None] * V + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    S = tl.cast(tl.load(state + offsets, mask=mask, other=0.0), tl.float32)  # (BK, BV)
    k_read = tl.sum(k_t[:, None] * S, axis=0)  # (BV,) Sᵀk
    q_read = tl.sum(q_t[:, None] * S, axis=0)  # (BV,) Sᵀq
    u = b * (v_t - decay * k_read)  # (BV,)
    tl.store(state_out + offsets, decay * S + k_t[:, None] * u[None, :], mask=mask)
    o = scale * (decay * q_read + tl.sum(q_t * k_t, axis=0) * u)
    tl.store(o_out + i_bh * V + cols, tl.cast(o, o_out.dtype.element_ty), mask=col_ok)


def gated_delta_step_triton(q, k, v, g, beta, state, scale=None, use_qk_l2norm=False):
    """The Triton one-token step of ``gated_delta_rule_step`` (inputs validated; no backward).

    q, k (B, H, K), v (B, H, V), g, beta (B, H), state (B, H, K, V). Computes in float32; returns o (B, H, V) in v's
    dtype and the new state (B, H, K, V) in the compute dtype (float64 inputs are rounded to float32 inside).
    """
    B, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    state_dtype, out_dtype = compute_dtype(q), v.dtype
    if use_qk_l2norm:
        q, k = l2_normalize(q.float()), l2_normalize(k.float())
    q, k, v, g, beta, h = (x.float().contiguous() for x in (q, k, v, g, beta, state))
    o = torch.empty(B, H, V, device=q.device, dtype=torch.float32)
    new_state = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    BK, BV = triton.next_power_of_2(K), min(64, triton.next_power_of_2(V))
    _step_kernel[(B * H, triton.cdiv(V, BV))](q, k, v, g, beta, h, o, new_state, scale, H, K, V, BK, BV,
                                              num_warps=WARPS)
    return o.to(out_dtype), new_state.to(state_dtype)

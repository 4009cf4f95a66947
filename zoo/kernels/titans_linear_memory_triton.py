"""Triton forward and backward kernels of ``titans_linear_memory`` (docs/titans.md#backends).

Imported lazily by ``zoo.kernels.titans_linear_memory`` when ``backend="triton"``; importing this module needs triton.

The gate-only coefficients of the dual form (Γ = G ⊙ 1θᵀ, β, f, the chunk-end rows c = G_{n,:}⊙θ, e = B_{n,:}⊙θ and the
scalars β_n, f_n, m_n) are computed in torch, where autograd differentiates them back to α, η, θ exactly. The kernels do
the O(T·K·V) work: each program owns one V-block of one (batch, head) and loops over the chunks, holding W and S
(K × BV) in registers; splitting V is exact because every column of W evolves on its own. The forward stores the
chunk-start states; the backward walks the chunks in reverse carrying (dW, dS) and writes per-V-block partial sums of
dQ, dK and of the coefficient adjoints, reduced afterwards in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels._common import nan_filled


@triton.jit
def _titans_fwd_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, beta_ptr, f_ptr, c_ptr, e_ptr, ends_ptr, m0_ptr, s0_ptr,
                       o_ptr, states_w_ptr, states_s_ptr, mT_ptr, sT_ptr,
                       NUM_CHUNKS, KD, VD,
                       CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pid_v = tl.cast(tl.program_id(0), tl.int64)
    pid_bh = tl.cast(tl.program_id(1), tl.int64)
    T = NUM_CHUNKS * CHUNK
    rows = tl.arange(0, CHUNK)
    cols_k = tl.arange(0, BK)
    cols_v = pid_v * BV + tl.arange(0, BV)
    mask_k = cols_k < KD
    mask_v = cols_v < VD
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_offsets = pid_bh * KD * VD + cols_k[:, None] * VD + cols_v[None, :]  # (BK, BV)
    W = tl.load(m0_ptr + state_offsets, mask=mask_kv, other=0.0)
    S = tl.load(s0_ptr + state_offsets, mask=mask_kv, other=0.0)
    for chunk in range(NUM_CHUNKS):
        n = tl.cast(chunk, tl.int64)
        chunk_state = (pid_bh * NUM_CHUNKS + n) * KD * VD + cols_k[:, None] * VD + cols_v[None, :]
        tl.store(states_w_ptr + chunk_state, W, mask=mask_kv)
        tl.store(states_s_ptr + chunk_state, S, mask=mask_kv)
        t = n * CHUNK + rows  # (b,)
        qk_offsets = (pid_bh * T + t[:, None]) * KD + cols_k[None, :]
        Q = tl.load(q_ptr + qk_offsets, mask=mask_k[None, :], other=0.0)  # (b, BK)
        K = tl.load(k_ptr + qk_offsets, mask=mask_k[None, :], other=0.0)  # (b, BK)
        v_offsets = (pid_bh * T + t[:, None]) * VD + cols_v[None, :]
        Vc = tl.load(v_ptr + v_offsets, mask=mask_v[None, :], other=0.0)  # (b, BV)
        coef = (pid_bh * NUM_CHUNKS + n) * CHUNK + rows
        gamma = tl.load(gamma_ptr + coef[:, None] * CHUNK + rows[None, :])  # (b, b)
        beta = tl.load(beta_ptr + coef)
        f = tl.load(f_ptr + coef)
        c = tl.load(c_ptr + coef)
        e = tl.load(e_ptr + coef)
        beta_end = tl.load(ends_ptr + (pid_bh * NUM_CHUNKS + n) * 3)
        f_end = tl.load(ends_ptr + (pid_bh * NUM_CHUNKS + n) * 3 + 1)
        m_end = tl.load(ends_ptr + (pid_bh * NUM_CHUNKS + n) * 3 + 2)
        delta = 2 * (tl.dot(K, W, input_precision="ieee") - Vc)  # (b, BV)
        P = tl.dot(Q, tl.trans(K), input_precision="ieee") * gamma  # (b, b)
        Y = (beta[:, None] * tl.dot(Q, W, input_precision="ieee") + f[:, None] * tl.dot(Q, S, input_precision="ieee")
             - tl.dot(P, delta, input_precision="ieee"))
        tl.store(o_ptr + v_offsets, Y, mask=mask_v[None, :])
        Kt = tl.trans(K)
        W_next = beta_end * W + f_end * S - tl.dot(Kt, c[:, None] * delta, input_precision="ieee")
        S = m_end * S - tl.dot(Kt, e[:, None] * delta, input_precision="ieee")
        W = W_next
    tl.store(mT_ptr + state_offsets, W, mask=mask_kv)
    tl.store(sT_ptr + state_offsets, S, mask=mask_kv)


@triton.jit
def _titans_bwd_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, beta_ptr, f_ptr, c_ptr, e_ptr, ends_ptr,
                       states_w_ptr, states_s_ptr, do_ptr, dmT_ptr, dsT_ptr,
                       dq_ptr, dk_ptr, dv_ptr, dgamma_ptr, dbeta_ptr, df_ptr, dc_ptr, de_ptr, dends_ptr,
                       dm0_ptr, ds0_ptr,
                       NUM_CHUNKS, BH, KD, VD,
                       CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pid_v = tl.cast(tl.program_id(0), tl.int64)
    pid_bh = tl.cast(tl.program_id(1), tl.int64)
    T = NUM_CHUNKS * CHUNK
    rows = tl.arange(0, CHUNK)
    cols_k = tl.arange(0, BK)
    cols_v = pid_v * BV + tl.arange(0, BV)
    mask_k = cols_k < KD
    mask_v = cols_v < VD
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_offsets = pid_bh * KD * VD + cols_k[:, None] * VD + cols_v[None, :]
    dW = tl.load(dmT_ptr + state_offsets, mask=mask_kv, other=0.0)  # (BK, BV)
    dS = tl.load(dsT_ptr + state_offsets, mask=mask_kv, other=0.0)
    part = pid_v * BH + pid_bh  # this program's slot in the per-V-block partial sums
    for step in range(NUM_CHUNKS):
        n = NUM_CHUNKS - 1 - tl.cast(step, tl.int64)
        chunk_state = (pid_bh * NUM_CHUNKS + n) * KD * VD + cols_k[:, None] * VD + cols_v[None, :]
        W = tl.load(states_w_ptr + chunk_state, mask=mask_kv, other=0.0)
        S = tl.load(states_s_ptr + chunk_state, mask=mask_kv, other=0.0)
        t = n * CHUNK + rows
        qk_offsets = (pid_bh * T + t[:, None]) * KD + cols_k[None, :]
        Q = tl.load(q_ptr + qk_offsets, mask=mask_k[None, :], other=0.0)  # (b, BK)
        K = tl.load(k_ptr + qk_offsets, mask=mask_k[None, :], other=0.0)
        v_offsets = (pid_bh * T + t[:, None]) * VD + cols_v[None, :]
        Vc = tl.load(v_ptr + v_offsets, mask=mask_v[None, :], other=0.0)  # (b, BV)
        dY = tl.load(do_ptr + v_offsets, mask=mask_v[None, :], other=0.0)
        coef = (pid_bh * NUM_CHUNKS + n) * CHUNK + rows
        tile = coef[:, None] * CHUNK + rows[None, :]
        gamma = tl.load(gamma_ptr + tile)  # (b, b)
        beta = tl.load(beta_ptr + coef)
        f = tl.load(f_ptr + coef)
        c = tl.load(c_ptr + coef)
        e = tl.load(e_ptr + coef)
        end = (pid_bh * NUM_CHUNKS + n) * 3
        beta_end = tl.load(ends_ptr + end)
        f_end = tl.load(ends_ptr + end + 1)
        m_end = tl.load(ends_ptr + end + 2)

        delta = 2 * (tl.dot(K, W, input_precision="ieee") - Vc)  # (b, BV)
        QK = tl.dot(Q, tl.trans(K), input_precision="ieee")  # (b, b)
        P = QK * gamma
        QW = tl.dot(Q, W, input_precision="ieee")
        QS = tl.dot(Q, S, input_precision="ieee")
        KdW = tl.dot(K, dW, input_precision="ieee")  # (b, BV)
        KdS = tl.dot(K, dS, input_precision="ieee")
        dP = -tl.dot(dY, tl.trans(delta), input_precision="ieee")  # (b, b), partial over V
        d_delta = -tl.dot(tl.trans(P), dY, input_precision="ieee") - c[:, None] * KdW - e[:, None] * KdS
        tl.store(dv_ptr + v_offsets, -2 * d_delta, mask=mask_v[None, :])
        dPG = dP * gamma
        Wt = tl.trans(W)
        dQ = (beta[:, None] * tl.dot(dY, Wt, input_precision="ieee")
              + f[:, None] * tl.dot(dY, tl.trans(S), input_precision="ieee")
              + tl.dot(dPG, K, input_precision="ieee"))
        dK = (tl.dot(tl.trans(dPG), Q, input_precision="ieee")
              - c[:, None] * tl.dot(delta, tl.trans(dW), input_precision="ieee")
              - e[:, None] * tl.dot(delta, tl.trans(dS), input_precision="ieee")
              + 2 * tl.dot(d_delta, Wt, input_precision="ieee"))
        part_qk = (part * T + t[:, None]) * KD + cols_k[None, :]
        tl.store(dq_ptr + part_qk, dQ, mask=mask_k[None, :])
        tl.store(dk_ptr + part_qk, dK, mask=mask_k[None, :])
        part_coef = (part * NUM_CHUNKS + n) * CHUNK + rows
        tl.store(dgamma_ptr + part_coef[:, None] * CHUNK + rows[None, :], dP * QK)
        tl.store(dbeta_ptr + part_coef, tl.sum(QW * dY, axis=1))
        tl.store(df_ptr + part_coef, tl.sum(QS * dY, axis=1))
        tl.store(dc_ptr + part_coef, -tl.sum(KdW * delta, axis=1))
        tl.store(de_ptr + part_coef, -tl.sum(KdS * delta, axis=1))
        part_end = (part * NUM_CHUNKS + n) * 3
        tl.store(dends_ptr + part_end, tl.sum(tl.sum(W * dW, axis=1), axis=0))
        tl.store(dends_ptr + part_end + 1, tl.sum(tl.sum(S * dW, axis=1), axis=0))
        tl.store(dends_ptr + part_end + 2, tl.sum(tl.sum(S * dS, axis=1), axis=0))
        dW_prev = (tl.dot(tl.trans(Q), beta[:, None] * dY, input_precision="ieee") + beta_end * dW
                   + 2 * tl.dot(tl.trans(K), d_delta, input_precision="ieee"))
        dS = tl.dot(tl.trans(Q), f[:, None] * dY, input_precision="ieee") + f_end * dW + m_end * dS
        dW = dW_prev
    tl.store(dm0_ptr + state_offsets, dW, mask=mask_kv)
    tl.store(ds0_ptr + state_offsets, dS, mask=mask_kv)


def _block_sizes(key_dim: int, value_dim: int) -> tuple[int, int]:
    """One fixed config per shape (no autotuning, so the interpreter runs it too): BK covers K, BV ≤ 64 tiles V."""
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = max(16, min(64, triton.next_power_of_2(value_dim)))
    return block_k, block_v


# The forward and backward are registered ops (docs/training.md#compiling-a-model): torch.compile traces through them
# with their fake implementations instead of breaking the graph at an opaque autograd.Function. The backward is the
# chunk backward of docs/titans.md#backward-of-one-chunk.


@torch.library.custom_op("zoo::titans_linear_memory_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, f: Tensor, c: Tensor, e: Tensor,
                ends: Tensor, m0: Tensor, s0: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """o (B, H, N·b, V), the final (M, S) (B, H, K, V), and the chunk-start states (B, H, N, K, V) of W and S."""
    q, k, v, gamma, beta, f, c, e, ends, m0, s0 = (x.contiguous() for x in (q, k, v, gamma, beta, f, c, e, ends,
                                                                         m0, s0))
    B, H, length, KD = q.shape
    VD = v.shape[-1]
    num_chunks = length // chunk_size
    block_k, block_v = _block_sizes(KD, VD)
    o = nan_filled((B, H, length, VD), v.dtype, v.device)
    states_w = nan_filled((B, H, num_chunks, KD, VD), m0.dtype, m0.device)
    states_s = nan_filled((B, H, num_chunks, KD, VD), m0.dtype, m0.device)
    m_final = nan_filled((B, H, KD, VD), m0.dtype, m0.device)
    s_final = nan_filled((B, H, KD, VD), m0.dtype, m0.device)
    grid = (triton.cdiv(VD, block_v), B * H)
    _titans_fwd_kernel[grid](q, k, v, gamma, beta, f, c, e, ends, m0, s0, o, states_w, states_s, m_final, s_final,
                             num_chunks, KD, VD, CHUNK=chunk_size, BK=block_k, BV=block_v)
    return o, m_final, s_final, states_w, states_s


@_forward_op.register_fake
def _forward_fake(q, k, v, gamma, beta, f, c, e, ends, m0, s0, chunk_size):
    B, H, length, KD = q.shape
    VD = v.shape[-1]
    states = m0.new_empty(B, H, length // chunk_size, KD, VD)
    return (v.new_empty(B, H, length, VD), torch.empty_like(m0), torch.empty_like(m0), states,
            torch.empty_like(states))


@torch.library.custom_op("zoo::titans_linear_memory_backward", mutates_args=())
def _backward_op(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, f: Tensor, c: Tensor, e: Tensor,
                 ends: Tensor, states_w: Tensor, states_s: Tensor, d_o: Tensor, d_m: Tensor, d_s: Tensor,
                 chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                           Tensor, Tensor]:
    """The gradients of q, k, v, gamma, beta, f, c, e, ends, m0 and s0."""
    q, k, v, gamma, beta, f, c, e, ends, states_w, states_s, d_o, d_m, d_s = (
        x.contiguous() for x in (q, k, v, gamma, beta, f, c, e, ends, states_w, states_s, d_o, d_m, d_s))
    B, H, length, KD = q.shape
    VD = v.shape[-1]
    num_chunks = length // chunk_size
    block_k, block_v = _block_sizes(KD, VD)
    num_v_blocks = triton.cdiv(VD, block_v)
    dq = nan_filled((num_v_blocks, B, H, length, KD), q.dtype, q.device)
    dk = nan_filled((num_v_blocks, B, H, length, KD), q.dtype, q.device)
    dv = nan_filled((B, H, length, VD), v.dtype, v.device)
    dgamma = nan_filled((num_v_blocks, *gamma.shape), gamma.dtype, gamma.device)
    dbeta, df, dc, de = (nan_filled((num_v_blocks, *beta.shape), beta.dtype, beta.device) for _ in range(4))
    dends = nan_filled((num_v_blocks, *ends.shape), ends.dtype, ends.device)
    dm0 = nan_filled((B, H, KD, VD), states_w.dtype, states_w.device)
    ds0 = nan_filled((B, H, KD, VD), states_w.dtype, states_w.device)
    grid = (num_v_blocks, B * H)
    _titans_bwd_kernel[grid](q, k, v, gamma, beta, f, c, e, ends, states_w, states_s, d_o, d_m, d_s,
                             dq, dk, dv, dgamma, dbeta, df, dc, de, dends, dm0, ds0,
                             num_chunks, B * H, KD, VD, CHUNK=chunk_size, BK=block_k, BV=block_v)
    return (dq.sum(0), dk.sum(0), dv, dgamma.sum(0), dbeta.sum(0), df.sum(0), dc.sum(0), de.sum(0), dends.sum(0),
            dm0, ds0)


@_backward_op.register_fake
def _backward_fake(q, k, v, gamma, beta, f, c, e, ends, states_w, states_s, d_o, d_m, d_s, chunk_size):
    return tuple(torch.empty_like(x) for x in (q, k, v, gamma, beta, f, c, e, ends, d_m, d_s))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], *output[3:])
    ctx.chunk_size = inputs[-1]


def _autograd_backward(ctx, d_o, d_m, d_s, *_):
    return (*_backward_op(*ctx.saved_tensors, d_o, d_m, d_s, ctx.chunk_size), None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def titans_linear_memory_triton(q, k, v, gamma, beta, f, c, e, ends, m0, s0, chunk_size):
    """Run the Triton dual form on chunk-padded inputs.

    q, k: (B, H, N·b, K); v: (B, H, N·b, V); gamma: (B, H, N, b, b) = G ⊙ 1θᵀ; beta, f, c, e: (B, H, N, b);
    ends: (B, H, N, 3) = (β_n, f_n, m_n); m0, s0: (B, H, K, V). All in one float dtype. Returns (o, M, S) with
    o (B, H, N·b, V). Differentiable in every tensor argument.
    """
    o, m_final, s_final, _, _ = _forward_op(q, k, v, gamma, beta, f, c, e, ends, m0, s0, chunk_size)
    return o, m_final, s_final

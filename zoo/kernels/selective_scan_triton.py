"""Part 3 of ``selective_scan``: Triton forward/backward kernels and the registered ops (the GPU path).

Forward: grid (B, Dm / BLOCK_D); a (BLOCK_D, N) state tile stays in registers across the time loop and an fp32 state
checkpoint is written every K steps. Backward: the same grid walks the segments in reverse, recomputes each
segment's K states from its checkpoint into per-program scratch, then runs the adjoint (docs/mamba.md#triton-kernels)::

    ĝ_t = C_t·gy'_t + a_{t+1}·ĝ_{t+1},  ĝ_T seeded by g_final;  g_initial = a_1·ĝ_1

The same kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (loop offsets use ``tl.cast``; one fixed config).
Importing this module without Triton succeeds; calling ``selective_scan_triton`` then raises.
"""
from __future__ import annotations

import torch

from zoo.kernels._common import compute_dtype, nan_filled, triton_available

CHECKPOINT_STEPS = 64  # K: steps between stored states
MAX_BLOCK_D = 16

if triton_available():
    import triton
    import triton.language as tl

    from zoo.kernels._triton_math import softplus as _softplus

    @triton.jit
    def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                         y_ptr, hT_ptr, ckpt_ptr,
                         T, Dm, G, N, n_ckpt,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, K: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        pid_b = tl.cast(tl.program_id(0), tl.int64)
        pid_d = tl.program_id(1)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_d = d < Dm
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g = (pid_d * BLOCK_D) // (Dm // G)  # the block lies in one group
        dn = d[:, None] * N + n[None, :]  # (BLOCK_D, BLOCK_N)
        A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(COMPUTE)
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(COMPUTE) if HAS_D else tl.zeros([BLOCK_D], COMPUTE)
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(COMPUTE) if HAS_BIAS else \
            tl.zeros([BLOCK_D], COMPUTE)
        state_off = pid_b * Dm * N + dn
        if HAS_H0:
            h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(COMPUTE)
        else:
            h = tl.zeros([BLOCK_D, BLOCK_N], COMPUTE)
        for s in range(0, n_ckpt):
            s64 = tl.cast(s, tl.int64)
            tl.store(ckpt_ptr + (pid_b * n_ckpt + s64) * Dm * N + dn, h, mask=mask_dn)
            for k in range(0, K):
                t = s64 * K + tl.cast(k, tl.int64)
                valid_d = (d * 0 + t) < T  # vector masks: the interpreter turns scalar & vector into int32
                valid_n = (n * 0 + t) < T
                row = pid_b * T + t
                u = tl.load(u_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                dlt = tl.load(delta_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE) + bias
                if SOFTPLUS:
                    dlt = _softplus(dlt)
                dlt = tl.where(valid_d, dlt, 0.0)
                Bt = tl.load(B_ptr + (row * G + g) * N + n, mask=mask_n & valid_n, other=0.0).to(COMPUTE)
                Ct = tl.load(C_ptr + (row * G + g) * N + n, mask=mask_n & valid_n, other=0.0).to(COMPUTE)
                a = tl.exp(dlt[:, None] * A)
                h = a * h + (dlt * u)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], 1) + Dv * u
                if HAS_Z:
                    zt = tl.load(z_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                    y = y * zt * tl.sigmoid(zt)
                tl.store(y_ptr + row * Dm + d, y.to(y_ptr.dtype.element_ty), mask=mask_d & valid_d)
        tl.store(hT_ptr + state_off, h, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
                         gout_ptr, ghT_ptr, scratch_ptr,
                         gu_ptr, gdelta_ptr, gz_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr, gbias_ptr, gh0_ptr,
                         T, Dm, G, N, n_ckpt, n_dblocks,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, K: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        pid_b = tl.cast(tl.program_id(0), tl.int64)
        pid_d = tl.program_id(1)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        mask_d = d < Dm
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g = (pid_d * BLOCK_D) // (Dm // G)
        dn = d[:, None] * N + n[None, :]
        tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]  # offsets inside a scratch slot
        scratch = scratch_ptr + (pid_b * n_dblocks + pid_d) * (K + 1) * BLOCK_D * BLOCK_N
        A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(COMPUTE)
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(COMPUTE) if HAS_D else tl.zeros([BLOCK_D], COMPUTE)
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(COMPUTE) if HAS_BIAS else \
            tl.zeros([BLOCK_D], COMPUTE)
        state_off = pid_b * Dm * N + dn
        g_carry = tl.load(ghT_ptr + state_off, mask=mask_dn, other=0.0).to(COMPUTE)  # ∂L/∂h_t from the future
        gA_acc = tl.zeros([BLOCK_D, BLOCK_N], COMPUTE)
        gD_acc = tl.zeros([BLOCK_D], COMPUTE)
        gbias_acc = tl.zeros([BLOCK_D], COMPUTE)
        for s_rev in range(0, n_ckpt):
            s64 = tl.cast(n_ckpt - 1 - s_rev, tl.int64)
            # recompute the segment's states: slot 0 = checkpoint, slot k + 1 = state after step k
            h = tl.load(ckpt_ptr + (pid_b * n_ckpt + s64) * Dm * N + dn, mask=mask_dn, other=0.0)
            tl.store(scratch + tile, h)
            for k in range(0, K):
                t = s64 * K + tl.cast(k, tl.int64)
                valid_d = (d * 0 + t) < T  # vector masks: the interpreter turns scalar & vector into int32
                valid_n = (n * 0 + t) < T
                row = pid_b * T + t
                u = tl.load(u_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                dlt = tl.load(delta_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE) + bias
                if SOFTPLUS:
                    dlt = _softplus(dlt)
                dlt = tl.where(valid_d, dlt, 0.0)
                Bt = tl.load(B_ptr + (row * G + g) * N + n, mask=mask_n & valid_n, other=0.0).to(COMPUTE)
                h = tl.exp(dlt[:, None] * A) * h + (dlt * u)[:, None] * Bt[None, :]
                tl.store(scratch + (tl.cast(k, tl.int64) + 1) * BLOCK_D * BLOCK_N + tile, h)
            tl.debug_barrier()
            # adjoint, newest step first
            for k_rev in range(0, K):
                k64 = tl.cast(K - 1 - k_rev, tl.int64)
                t = s64 * K + k64
                valid_d = (d * 0 + t) < T  # vector masks: the interpreter turns scalar & vector into int32
                valid_n = (n * 0 + t) < T
                row = pid_b * T + t
                h_t = tl.load(scratch + (k64 + 1) * BLOCK_D * BLOCK_N + tile)
                h_prev = tl.load(scratch + k64 * BLOCK_D * BLOCK_N + tile)
                u = tl.load(u_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                raw = tl.load(delta_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE) + bias
                dlt = _softplus(raw) if SOFTPLUS else raw
                dlt = tl.where(valid_d, dlt, 0.0)
                Bt = tl.load(B_ptr + (row * G + g) * N + n, mask=mask_n & valid_n, other=0.0).to(COMPUTE)
                Ct = tl.load(C_ptr + (row * G + g) * N + n, mask=mask_n & valid_n, other=0.0).to(COMPUTE)
                gout = tl.load(gout_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                if HAS_Z:
                    zt = tl.load(z_ptr + row * Dm + d, mask=mask_d & valid_d, other=0.0).to(COMPUTE)
                    sz = tl.sigmoid(zt)
                    y_pre = tl.sum(h_t * Ct[None, :], 1) + Dv * u
                    gy = gout * zt * sz
                    gz = gout * y_pre * sz * (1.0 + zt * (1.0 - sz))
                    tl.store(gz_ptr + row * Dm + d, gz, mask=mask_d & valid_d)
                else:
                    gy = gout
                a = tl.exp(dlt[:, None] * A)
                g_hat = g_carry + gy[:, None] * Ct[None, :]  # (BLOCK_D, BLOCK_N)
                part = (row * n_dblocks + pid_d) * N + n
                tl.store(gC_ptr + part, tl.sum(gy[:, None] * h_t, 0), mask=mask_n & valid_n)
                tl.store(gB_ptr + part, tl.sum(g_hat * (dlt * u)[:, None], 0), mask=mask_n & valid_n)
                gu = Dv * gy + tl.sum(g_hat * Bt[None, :], 1) * dlt
                gdlt = tl.sum(g_hat * (h_prev * a * A + Bt[None, :] * u[:, None]), 1)
                if SOFTPLUS:
                    gdlt = gdlt * tl.sigmoid(raw)
                gdlt = tl.where(valid_d, gdlt, 0.0)
                gA_acc += g_hat * h_prev * a * dlt[:, None]
                gD_acc += gy * u
                gbias_acc += gdlt
                tl.store(gu_ptr + row * Dm + d, gu, mask=mask_d & valid_d)
                tl.store(gdelta_ptr + row * Dm + d, gdlt, mask=mask_d & valid_d)
                g_carry = a * g_hat
            tl.debug_barrier()
        tl.store(gh0_ptr + state_off, g_carry, mask=mask_dn)
        tl.store(gA_ptr + state_off, gA_acc, mask=mask_dn)
        tl.store(gD_ptr + pid_b * Dm + d, gD_acc, mask=mask_d)
        tl.store(gbias_ptr + pid_b * Dm + d, gbias_acc, mask=mask_d)


def _block_d(group_width: int) -> int:
    """Largest power of two ≤ MAX_BLOCK_D dividing the group width, so a block stays inside one group."""
    block = 1
    while block * 2 <= MAX_BLOCK_D and group_width % (block * 2) == 0:
        block *= 2
    return block


def _segment_steps(checkpoint_steps: int, T: int) -> int:
    """K, the steps between stored states (short sequences: one short segment)."""
    return min(checkpoint_steps, max(8, 1 << max(0, (T - 1).bit_length())))


# The forward and backward are registered ops (docs/training.md#compiling-a-model): torch.compile traces through them
# with their fake implementations instead of breaking the graph at an opaque autograd.Function.

@torch.library.custom_op("zoo::selective_scan_forward", mutates_args=())
def _forward_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                initial_state: torch.Tensor | None, delta_softplus: bool,
                checkpoint_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, T, Dm), the final state (B, Dm, N) and the state checkpoints (B, T / K, Dm, N) kept for the backward."""
    compute = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    K = _segment_steps(checkpoint_steps, T)
    n_ckpt = -(-T // K)
    block_d = _block_d(Dm // G)
    block_n = triton.next_power_of_2(N)
    dummy = u.new_empty(1)
    y = nan_filled((batch, T, Dm), u.dtype, u.device)
    final = nan_filled((batch, Dm, N), compute, u.device)
    ckpt = nan_filled((batch, n_ckpt, Dm, N), compute, u.device)
    grid = (batch, Dm // block_d)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        initial_state if initial_state is not None else dummy,
        y, final, ckpt, T, Dm, G, N, n_ckpt,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None, K=K, BLOCK_D=block_d, BLOCK_N=block_n,
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, num_warps=4)
    return y, final, ckpt


@_forward_op.register_fake
def _forward_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint_steps):
    compute = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, T, Dm = u.shape
    N = B.shape[3]
    n_ckpt = -(-T // _segment_steps(checkpoint_steps, T))
    return (u.new_empty(batch, T, Dm), u.new_empty(batch, Dm, N, dtype=compute),
            u.new_empty(batch, n_ckpt, Dm, N, dtype=compute))


@torch.library.custom_op("zoo::selective_scan_backward", mutates_args=())
def _backward_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, ckpt: torch.Tensor,
                 gout: torch.Tensor, gfinal: torch.Tensor, delta_softplus: bool,
                 checkpoint_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gu, gdelta, gA, gB, gC, gD, gz, gdelta_bias, g_initial (the gradients of absent inputs come back as (1,)
    placeholders, dropped by the autograd wrapper)."""
    compute = ckpt.dtype
    batch, T, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    K = _segment_steps(checkpoint_steps, T)
    block_d, block_n = _block_d(Dm // G), triton.next_power_of_2(N)
    n_ckpt = ckpt.shape[1]
    n_dblocks = Dm // block_d
    dev = u.device
    gout = gout.contiguous()
    gfinal = gfinal.to(compute).contiguous()
    scratch = nan_filled((batch, n_dblocks, K + 1, block_d, block_n), compute, dev)
    gu, gdelta = nan_filled((batch, T, Dm), compute, dev), nan_filled((batch, T, Dm), compute, dev)
    gz = nan_filled((batch, T, Dm), compute, dev) if z is not None else u.new_zeros(1)
    gB_part = nan_filled((batch, T, n_dblocks, N), compute, dev)
    gC_part = nan_filled((batch, T, n_dblocks, N), compute, dev)
    gA_part = nan_filled((batch, Dm, N), compute, dev)
    gD_part, gbias_part = nan_filled((batch, Dm), compute, dev), nan_filled((batch, Dm), compute, dev)
    gh0 = nan_filled((batch, Dm, N), compute, dev)
    dummy = u.new_empty(1)
    _scan_bwd_kernel[(batch, n_dblocks)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, ckpt, gout, gfinal, scratch,
        gu, gdelta, gz, gB_part, gC_part, gA_part, gD_part, gbias_part, gh0,
        T, Dm, G, N, n_ckpt, n_dblocks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        K=K, BLOCK_D=block_d, BLOCK_N=block_n,
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, num_warps=4)
    # per-block partials of gB, gC summed over each group's blocks (deterministic, no atomics)
    gB = gB_part.view(batch, T, G, n_dblocks // G, N).sum(3)  # (B, T, G, N)
    gC = gC_part.view(batch, T, G, n_dblocks // G, N).sum(3)
    return (gu.to(u.dtype), gdelta.to(delta.dtype), gA_part.sum(0).to(A.dtype), gB.to(B.dtype), gC.to(C.dtype),
            gD_part.sum(0).to(D.dtype) if D is not None else u.new_zeros(1),
            gz.to(z.dtype) if z is not None else gz,
            gbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_zeros(1), gh0)


@_backward_op.register_fake
def _backward_fake(u, delta, A, B, C, D, z, delta_bias, ckpt, gout, gfinal, delta_softplus, checkpoint_steps):
    def like(x):
        return torch.empty_like(x) if x is not None else u.new_empty(1)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias), torch.empty_like(gfinal, dtype=ckpt.dtype))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint_steps = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.config = (delta_softplus, checkpoint_steps, initial_state is not None)


def _autograd_backward(ctx, gout, gfinal, _):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    delta_softplus, checkpoint_steps, has_h0 = ctx.config
    gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0 = _backward_op(u, delta, A, B, C, D, z, delta_bias, ckpt, gout, gfinal,
                                                             delta_softplus, checkpoint_steps)
    return (gu, gdelta, gA, gB, gC, gD if D is not None else None, gz if z is not None else None,
            gbias if delta_bias is not None else None, gh0 if has_h0 else None, None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, checkpoint_steps=CHECKPOINT_STEPS):
    """Triton selective scan (arguments as ``selective_scan``; inputs already validated). Needs CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        raise RuntimeError("selective_scan: backend='triton' needs the triton package")
    squeeze = B.dim() == 3
    B4 = (B.unsqueeze(2) if squeeze else B).contiguous()  # (B, T, G, N)
    C4 = (C.unsqueeze(2) if squeeze else C).contiguous()
    contiguous = [t.contiguous() if t is not None else None for t in (u, delta, A, D, z, delta_bias, initial_state)]
    u, delta, A, D, z, delta_bias, initial_state = contiguous
    y, final, _ = _forward_op(u, delta, A, B4, C4, D, z, delta_bias, initial_state, bool(delta_softplus),
                              int(checkpoint_steps))
    return y, final


# ---------------------------------------------------------------------------------------------------------------------
# The one-token step (decoding), forward only
# ---------------------------------------------------------------------------------------------------------------------
if triton_available():
    @triton.jit
    def _step_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h_ptr, y_ptr, h_out_ptr,
                     Dm, G, N, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
        """One (batch, channel block): h' = exp(Δ·A)·h + Δ·u·B, y = (Σ_n C·h' + D·u)·silu(z)."""
        pid_b = tl.cast(tl.program_id(0), tl.int64)
        pid_d = tl.program_id(1)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_d, mask_n = d < Dm, n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        g = (pid_d * BLOCK_D) // (Dm // G)  # the block lies in one group
        dn = d[:, None] * N + n[None, :]  # (BLOCK_D, BLOCK_N)
        A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(COMPUTE)
        u = tl.load(u_ptr + pid_b * Dm + d, mask=mask_d, other=0.0).to(COMPUTE)
        dlt = tl.load(delta_ptr + pid_b * Dm + d, mask=mask_d, other=0.0).to(COMPUTE)
        if HAS_BIAS:
            dlt += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(COMPUTE)
        if SOFTPLUS:
            dlt = _softplus(dlt)
        Bt = tl.load(B_ptr + (pid_b * G + g) * N + n, mask=mask_n, other=0.0).to(COMPUTE)
        Ct = tl.load(C_ptr + (pid_b * G + g) * N + n, mask=mask_n, other=0.0).to(COMPUTE)
        state_off = pid_b * Dm * N + dn
        h = tl.load(h_ptr + state_off, mask=mask_dn, other=0.0).to(COMPUTE)
        h = tl.exp(dlt[:, None] * A) * h + (dlt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], 1)
        if HAS_D:
            y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(COMPUTE) * u
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * Dm + d, mask=mask_d, other=0.0).to(COMPUTE)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_ptr + pid_b * Dm + d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        tl.store(h_out_ptr + state_off, h, mask=mask_dn)


def selective_scan_step_triton(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Triton one-token step of ``selective_scan_step`` (inputs validated; no backward): one program per (batch,
    channel block). Returns (out (B, Dm) in u's dtype, new state (B, Dm, N) in the compute dtype)."""
    if not triton_available():
        raise RuntimeError("selective_scan_step: backend='triton' needs the triton package")
    compute = compute_dtype(u, delta, A, B, C, D, z, delta_bias, state)
    batch, Dm = u.shape
    B3 = (B.unsqueeze(1) if B.dim() == 2 else B).contiguous()  # (B, G, N)
    C3 = (C.unsqueeze(1) if C.dim() == 2 else C).contiguous()
    G, N = B3.shape[1], B3.shape[2]
    u, delta, A, D, z, delta_bias = (t.contiguous() if t is not None else None for t in (u, delta, A, D, z, delta_bias))
    state = state.to(compute).contiguous()
    block_d = _block_d(Dm // G)
    y = nan_filled((batch, Dm), u.dtype, u.device)
    new_state = nan_filled((batch, Dm, N), compute, u.device)
    dummy = u.new_empty(1)
    _step_kernel[(batch, Dm // block_d)](
        u, delta, A, B3, C3, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, state, y, new_state, Dm, G, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N),
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, num_warps=4)
    return y, new_state

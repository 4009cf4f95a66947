"""Triton kernels for MemoryFormer's hash lookup, forward and hand-written backward (docs/memoryformer.md#backends).

Part 3 of the op in ``hash_lookup.py``; imported only when ``backend="triton"`` is asked for, so ``import zoo`` never
needs Triton. Every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``): one fixed config, no
autotune, ``tl.cast`` on loop variables and program ids.

Layout: x is flattened to (N, K·τ), the tables to (K·2^τ, d_out) so that chunk k's bucket c is row k·2^τ + c.

1. ``_hash_kernel``      grid (token blocks, K): code (N, K) int32 and s (N, K) float32; τ is padded to a power of
                         two and the padded lanes give neither bits nor log-terms.
2. ``_gather_kernel``    grid (token blocks, d_out blocks): y = Σ_k s·tables[k·2^τ + code] + bias, fp32 accumulator.
3. ``_dx_kernel``        grid (token blocks, K): G = ⟨g_y, tables[row]⟩ over d_out blocks, dx = G · ∂s/∂z. Each
                         (token, k) has one owner: no atomics, deterministic.
4. ``_dtables_atomic_kernel``  grid (token blocks, d_out blocks): ``tl.atomic_add`` of s·g_y into a float32 buffer.
   ``_dtables_sorted_kernel``  (when ``torch.are_deterministic_algorithms_enabled()``): row ids sorted stably, one
                         program per (run start, d_out block) sums its run in sorted order: bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 16  # tokens per program (the single fixed config: the interpreter needs one)
BLOCK_D = 64  # d_out columns per program
WARPS = 4


@triton.jit
def _score(z, valid, inv_t, SCORE_L1: tl.constexpr):
    """s, p, ‖z‖₁ and σ(−2|z|/t) of each row of z (BN, TAU_P) float32 (inv_t = 1/t); masked lanes contribute nothing."""
    a = tl.where(valid, tl.abs(z), 0.0)  # (BN, TAU_P)
    softplus = tl.where(valid, tl.log(1.0 + tl.exp(-2.0 * inv_t * a)), 0.0)  # softplus(−2|z|/t)
    p = tl.exp(-tl.sum(softplus, axis=1))  # (BN,) Π σ(2|z|/t)
    l1 = tl.sum(a, axis=1)  # (BN,)
    if SCORE_L1:
        s = l1 * p
    else:
        s = p
    sig = 1.0 / (1.0 + tl.exp(2.0 * inv_t * a))  # (BN, TAU_P) σ(−2|z|/t)
    return s, p, l1, sig


@triton.jit
def _hash_kernel(x, code_out, s_out, N, K, inv_t, TAU: tl.constexpr, TAU_P: tl.constexpr, SCORE_L1: tl.constexpr,
                 SIGN_IN_F64: tl.constexpr, BN: tl.constexpr):
    """code[n, k] = Σ_i [z_i >= 0] 2^{τ−1−i} and s[n, k] for one block of tokens and one chunk k."""
    i_n = tl.cast(tl.program_id(0), tl.int64)
    k = tl.cast(tl.program_id(1), tl.int64)
    rows = i_n * BN + tl.arange(0, BN)  # (BN,)
    lanes = tl.arange(0, TAU_P)  # (TAU_P,)
    valid = (rows[:, None] < N) & (lanes[None, :] < TAU)  # (BN, TAU_P)
    raw = tl.load(x + rows[:, None] * (K * TAU) + k * TAU + lanes[None, :], mask=valid, other=0.0)
    z = tl.cast(raw, tl.float32)  # (BN, TAU_P)
    if SIGN_IN_F64:  # float64 x: compare in float64 (a float32 cast could round a tiny negative to −0.0)
        bits = tl.where(valid & (raw >= 0), 1, 0)
    else:  # fp32/fp16/bf16: the float32 upcast is exact, so it never changes a sign; NaN gives 0
        bits = tl.where(valid & (z >= 0), 1, 0)
    shift = tl.where(lanes < TAU, TAU - 1 - lanes, 0)  # (TAU_P,) MSB first
    code = tl.sum(bits * (1 << shift)[None, :], axis=1)  # (BN,)
    s, _, _, _ = _score(z, valid, inv_t, SCORE_L1)
    live = rows < N
    tl.store(code_out + rows * K + k, tl.cast(code, tl.int32), mask=live)
    tl.store(s_out + rows * K + k, s, mask=live)


@triton.jit
def _gather_kernel(code, s, tables, bias, y_out, N, K, ROWS, D, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr):
    """y[n, d] = Σ_k s[n, k] · tables[k·2^τ + code[n, k], d] (+ bias[d]), accumulated in float32."""
    i_n = tl.cast(tl.program_id(0), tl.int64)
    i_d = tl.cast(tl.program_id(1), tl.int64)
    rows = i_n * BN + tl.arange(0, BN)  # (BN,)
    cols = i_d * BD + tl.arange(0, BD)  # (BD,)
    live, cmask = rows < N, cols < D
    mask = live[:, None] & cmask[None, :]
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for k_loop in range(0, K):
        k = tl.cast(k_loop, tl.int64)
        c = tl.cast(tl.load(code + rows * K + k, mask=live, other=0), tl.int64)  # (BN,)
        weight = tl.load(s + rows * K + k, mask=live, other=0.0)  # (BN,)
        table_row = k * ROWS + c  # (BN,)
        t = tl.load(tables + table_row[:, None] * D + cols[None, :], mask=mask, other=0.0)  # (BN, BD)
        acc += weight[:, None] * tl.cast(t, tl.float32)
    if HAS_BIAS:
        acc += tl.cast(tl.load(bias + cols, mask=cmask, other=0.0), tl.float32)[None, :]
    tl.store(y_out + rows[:, None] * D + cols[None, :], tl.cast(acc, y_out.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(x, code, tables, dy, dx_out, N, K, ROWS, D, inv_t, TAU: tl.constexpr, TAU_P: tl.constexpr,
               SCORE_L1: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """dx[n, chunk k] = G[n, k] · ∂s/∂z with G = ⟨dy[n], tables[k·2^τ + code[n, k]]⟩ (s recomputed from x)."""
    i_n = tl.cast(tl.program_id(0), tl.int64)
    k = tl.cast(tl.program_id(1), tl.int64)
    rows = i_n * BN + tl.arange(0, BN)  # (BN,)
    live = rows < N
    table_row = k * ROWS + tl.cast(tl.load(code + rows * K + k, mask=live, other=0), tl.int64)  # (BN,)
    G = tl.zeros((BN,), dtype=tl.float32)
    for d_loop in range(0, D, BD):
        cols = tl.cast(d_loop, tl.int64) + tl.arange(0, BD)  # (BD,)
        mask = live[:, None] & (cols[None, :] < D)
        g = tl.load(dy + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)  # (BN, BD)
        t = tl.load(tables + table_row[:, None] * D + cols[None, :], mask=mask, other=0.0)  # (BN, BD)
        G += tl.sum(tl.cast(g, tl.float32) * tl.cast(t, tl.float32), axis=1)
    lanes = tl.arange(0, TAU_P)
    valid = live[:, None] & (lanes[None, :] < TAU)  # (BN, TAU_P)
    offsets = rows[:, None] * (K * TAU) + k * TAU + lanes[None, :]
    z = tl.cast(tl.load(x + offsets, mask=valid, other=0.0), tl.float32)  # (BN, TAU_P)
    s, p, l1, sig = _score(z, valid, inv_t, SCORE_L1)
    sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))  # sgn(0) = 0, the torch ``abs`` convention
    if SCORE_L1:
        ds = sign * p[:, None] * (1.0 + 2.0 * inv_t * l1[:, None] * sig)  # ∂(‖z‖₁ p)/∂z_i
    else:
        ds = s[:, None] * 2.0 * inv_t * sign * sig  # ∂p/∂z_i
    tl.store(dx_out + offsets, G[:, None] * ds, mask=valid)


@triton.jit
def _dtables_atomic_kernel(code, s, dy, dtables, N, K, ROWS, D, BN: tl.constexpr, BD: tl.constexpr):
    """dtables[k·2^τ + code[n, k], d] += s[n, k] · dy[n, d] by float32 atomics (order varies between runs)."""
    i_n = tl.cast(tl.program_id(0), tl.int64)
    i_d = tl.cast(tl.program_id(1), tl.int64)
    rows = i_n * BN + tl.arange(0, BN)
    cols = i_d * BD + tl.arange(0, BD)
    live = rows < N
    mask = live[:, None] & (cols[None, :] < D)
    g = tl.cast(tl.load(dy + rows[:, None] * D + cols[None, :], mask=mask, other=0.0), tl.float32)  # (BN, BD)
    for k_loop in range(0, K):
        k = tl.cast(k_loop, tl.int64)
        table_row = k * ROWS + tl.cast(tl.load(code + rows * K + k, mask=live, other=0), tl.int64)  # (BN,)
        weight = tl.load(s + rows * K + k, mask=live, other=0.0)  # (BN,)
        tl.atomic_add(dtables + table_row[:, None] * D + cols[None, :], weight[:, None] * g, mask=mask)


@triton.jit
def _dtables_sorted_kernel(order, sorted_rows, run_length, s, dy, dtables, K, D, BD: tl.constexpr):
    """One program per sorted entry i and d_out block: if i starts a run of equal row ids, sum s·dy over the run in
    sorted order and store it (no atomics: bitwise reproducible). Entries inside a run return at once."""
    i = tl.cast(tl.program_id(0), tl.int64)
    i_d = tl.cast(tl.program_id(1), tl.int64)
    length = tl.load(run_length + i)  # 0 unless entry i starts a run
    if length == 0:
        return
    cols = i_d * BD + tl.arange(0, BD)
    cmask = cols < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for j_loop in range(0, length):
        entry = tl.load(order + i + tl.cast(j_loop, tl.int64))  # flat (token, chunk) index n·K + k
        token = entry // K
        weight = tl.load(s + entry)
        acc += weight * tl.cast(tl.load(dy + token * D + cols, mask=cmask, other=0.0), tl.float32)
    row = tl.load(sorted_rows + i)
    tl.store(dtables + row * D + cols, acc, mask=cmask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers and the registered ops (forward, backward, fake implementations and autograd)
# ---------------------------------------------------------------------------------------------------------------------

def _hash(x: torch.Tensor, K: int, tau: int, score_l1: bool, inv_t: float):
    """code (N, K) int32 and s (N, K) float32 of x (N, K·τ) at temperature 1/inv_t."""
    N = x.shape[0]
    code = torch.empty(N, K, dtype=torch.int32, device=x.device)
    s = torch.full((N, K), float("nan"), dtype=torch.float32, device=x.device)
    if N:
        _hash_kernel[(triton.cdiv(N, BLOCK_N), K)](x, code, s, N, K, inv_t, TAU=tau, TAU_P=triton.next_power_of_2(tau),
                                                   SCORE_L1=score_l1, SIGN_IN_F64=x.dtype == torch.float64, BN=BLOCK_N,
                                                   num_warps=WARPS)
    return code, s


def _run_lengths(row_ids: torch.Tensor):
    """Stable sort of the flat row ids (N·K,): order, sorted ids, and at each run start its length (0 elsewhere).
    Computed on the device without host reads."""
    M = row_ids.numel()
    order = torch.argsort(row_ids, stable=True)  # (M,)
    sorted_rows = row_ids[order]
    position = torch.arange(M, device=row_ids.device)
    is_start = torch.ones(M, dtype=torch.bool, device=row_ids.device)
    is_start[1:] = sorted_rows[1:] != sorted_rows[:-1]
    start_position = torch.where(is_start, position, M)  # (M,)
    # next run start after position i: suffix minimum of start_position[i+1:], M past the end
    shifted = torch.cat([start_position[1:], start_position.new_full((1,), M)])
    next_start = shifted.flip(0).cummin(0).values.flip(0)  # (M,)
    run_length = torch.where(is_start, next_start - position, 0)  # (M,)
    return order, sorted_rows, run_length


def _table_gradient(code, s, dy, K, rows, D):
    """Float32 (K·2^τ, D) gradient of the flattened tables: atomics, or sorted runs when determinism is asked."""
    N = code.shape[0]
    dtables = torch.zeros(K * rows, D, dtype=torch.float32, device=dy.device)
    if N == 0:
        return dtables
    if not torch.are_deterministic_algorithms_enabled():
        _dtables_atomic_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))](
            code, s, dy, dtables, N, K, rows, D, BN=BLOCK_N, BD=BLOCK_D, num_warps=WARPS)
        return dtables
    row_ids = (code.long() + torch.arange(K, device=code.device) * rows).reshape(-1)  # (N·K,) k·2^τ + code
    order, sorted_rows, run_length = _run_lengths(row_ids)
    _dtables_sorted_kernel[(N * K, triton.cdiv(D, BLOCK_D))](
        order, sorted_rows, run_length, s.reshape(-1), dy, dtables, K, D, BD=BLOCK_D, num_warps=WARPS)
    return dtables


# The forward and backward are registered ops (docs/training.md#compiling-a-model): torch.compile traces through them
# with their fake implementations instead of breaking the graph at an opaque autograd.Function.

@torch.library.custom_op("zoo::hash_lookup_forward", mutates_args=())
def _forward_op(x: torch.Tensor, tables: torch.Tensor, bias: torch.Tensor | None, tau: int,
                score_l1: bool, inv_t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = Σ_k s_k tables[k, code_k] + bias (N, d_out) at temperature 1/inv_t, and code (N, K) int32 and s (N, K)
    float32 for the backward.

    Inputs: x (N, K·τ) contiguous, tables (K, 2^τ, d_out) contiguous, bias (d_out,) or None.
    """
    N = x.shape[0]
    K, rows, D = tables.shape
    code, s = _hash(x, K, tau, score_l1, inv_t)
    y = torch.full((N, D), float("nan"), dtype=tables.dtype, device=x.device)  # poisoned before the kernel
    if N:
        _gather_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))](
            code, s, tables, bias if bias is not None else tables, y, N, K, rows, D,
            HAS_BIAS=bias is not None, BN=BLOCK_N, BD=BLOCK_D, num_warps=WARPS)
    return y, code, s


@_forward_op.register_fake
def _forward_fake(x, tables, bias, tau, score_l1, inv_t):
    N, (K, _, D) = x.shape[0], tables.shape
    return (tables.new_empty(N, D), x.new_empty(N, K, dtype=torch.int32), x.new_empty(N, K, dtype=torch.float32))


@torch.library.custom_op("zoo::hash_lookup_backward", mutates_args=())
def _backward_op(x: torch.Tensor, tables: torch.Tensor, code: torch.Tensor, s: torch.Tensor, dy: torch.Tensor,
                 tau: int, score_l1: bool, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (N, K·τ) and dtables (K, 2^τ, d_out); the dx kernel recomputes s and ∂s/∂z from x."""
    dy = dy.contiguous()
    N = x.shape[0]
    K, rows, D = tables.shape
    dx = torch.full(x.shape, float("nan"), dtype=torch.float32, device=x.device)  # (N, K·τ)
    if N:
        _dx_kernel[(triton.cdiv(N, BLOCK_N), K)](
            x, code, tables, dy, dx, N, K, rows, D, inv_t, TAU=tau, TAU_P=triton.next_power_of_2(tau),
            SCORE_L1=score_l1, BN=BLOCK_N, BD=BLOCK_D, num_warps=WARPS)
    dtables = _table_gradient(code, s, dy, K, rows, D).reshape(K, rows, D).to(tables.dtype)
    return dx.to(x.dtype), dtables


@_backward_op.register_fake
def _backward_fake(x, tables, code, s, dy, tau, score_l1, inv_t):
    return torch.empty_like(x), torch.empty_like(tables)


def _setup_context(ctx, inputs, output):
    x, tables, bias, tau, score_l1, inv_t = inputs
    _, code, s = output
    ctx.save_for_backward(x, tables, code, s)
    ctx.tau, ctx.score_l1, ctx.inv_t = tau, score_l1, inv_t
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _autograd_backward(ctx, dy, *_):
    x, tables, code, s = ctx.saved_tensors
    dx, dtables = _backward_op(x, tables, code, s, dy, ctx.tau, ctx.score_l1, ctx.inv_t)
    dbias = dy.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dtables, dbias, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def hash_lookup_triton(x, tables, tau=8, bias=None, *, score="l1prob", temperature=1.0):
    """The Triton path of ``hash_lookup`` (same arguments and return; inputs already validated).

    Codes, scores and sums are float32 (float64 inputs are hashed and summed in float32, then cast back).
    """
    lead = x.shape[:-1]
    D = tables.shape[-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (N, K·τ)
    y, _, _ = _forward_op(x2d, tables.contiguous(), bias.contiguous() if bias is not None else None, tau,
                          score == "l1prob", 1.0 / temperature)
    return y.reshape(*lead, D)

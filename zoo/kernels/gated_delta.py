"""The gated delta rule (Gated DeltaNet, arXiv 2412.06464), the recurrence inside each MoM memory (arXiv 2502.13685).

Per head, with a K×V state S (keys first) and row vectors:

    S_t = e^{g_t} S_{t-1} + β_t k_t (v_t − e^{g_t} S_{t-1}ᵀ k_t)ᵀ,      o_t = scale · S_tᵀ q_t

The file holds the four numbered parts of the kernel contract: 1 the sequential reference (the oracle), 2 the chunked
PyTorch form (WY representation through the UT transform, linear in T, the CPU path), 3 the entry to the Triton kernels
and their registered ops in ``gated_delta_triton.py`` (imported only when the Triton backend is asked for), and
4 the public op with validation (``_validate``) and dispatch; then 5, the one-token step ``gated_delta_rule_step``
(decoding), which the op runs by itself for T = 1.
See docs/mom.md#chunk-parallel-form for the derivation.
"""
from __future__ import annotations

import torch
from einops import rearrange

from zoo.kernels._common import (check_chunk_size, check_cu_seqlens, check_floating, check_range, check_shape,
                                 compute_dtype, ever_bad, l2_normalize, nan_from, non_finite_tokens, pick_step,
                                 resolve_backend, sequence_bounds, step_exp, zero_where)

__all__ = ["gated_delta_rule", "gated_delta_rule_reference", "gated_delta_rule_step", "CHUNK_SIZE"]

OP = "gated_delta_rule"
CHUNK_SIZE = 64  # C: the default tokens per chunk of the chunked forms
TRITON_CHUNK_SIZES = (16, 32, 64, 128)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """The inputs in the compute dtype (q and k l2-normalised when asked), that dtype, and the output scale."""
    dtype = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return (q, k, v, g, beta), dtype, scale


# ----------------------------------------------------------------------------------------------------------------------
# 1. Reference: one token at a time, written from the recurrence.
# ----------------------------------------------------------------------------------------------------------------------

def _recurrent(q, k, v, g, beta, state, scale):
    """Run the recurrence over (B, T) with state (B, H, K, V); returns o (B, T, H, V) and the last state."""
    outputs = []
    for t in range(q.shape[1]):
        state = g[:, t].exp()[..., None, None] * state  # (B, H, K, V): S ← e^{g_t} S
        k_t = k[:, t]  # (B, H, K)
        u_t = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k_t))  # (B, H, V)
        state = state + k_t[..., :, None] * u_t[..., None, :]  # (B, H, K, V): S ← S + k uᵀ
        outputs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))  # (B, H, V)
    if not outputs:
        return v.new_zeros(v.shape, dtype=state.dtype), state
    return torch.stack(outputs, dim=1), state  # (B, T, H, V)


def gated_delta_rule_reference(q, k, v, g, beta, initial_state=None, cu_seqlens=None, scale=None,
                               use_qk_l2norm=False):
    """The plainest correct gated delta rule: a loop over sequences and tokens (the oracle; any dtype, float64 too).

    Same arguments and returns as :func:`gated_delta_rule` (without ``backend``); no input validation.
    Differentiable by autograd.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    (q, k, v, g, beta), dtype, scale = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    if cu_seqlens is None:
        state = (q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype))  # (B, H, K, V)
        o, final = _recurrent(q, k, v, g, beta, state, scale)
        return o.to(out_dtype), final
    bounds = sequence_bounds(cu_seqlens)
    N = len(bounds)
    h0 = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dtype)  # (N, H, K, V)
    pieces, finals = [], []
    for n, (start, end) in enumerate(bounds):
        span = slice(start, end)
        o_n, s_n = _recurrent(q[:, span], k[:, span], v[:, span], g[:, span], beta[:, span], h0[n:n + 1], scale)
        pieces.append(o_n)
        finals.append(s_n)
    o = torch.cat(pieces, dim=1) if pieces else q.new_zeros(1, T, H, V)  # (1, T, H, V)
    return o.to(out_dtype), torch.cat(finals, dim=0) if finals else h0


# ----------------------------------------------------------------------------------------------------------------------
# 2. Chunked PyTorch form, WY via the UT transform (docs/mom.md#chunk-parallel-form). Linear in T, autograd backward.
# ----------------------------------------------------------------------------------------------------------------------

def _chunk_dense(q, k, v, g, beta, state, scale, chunk_size):
    """Chunked gated delta rule on equal-length sequences whose length is a multiple of ``chunk_size``.

    q, k: (N, Tp, H, K); v: (N, Tp, H, V); g, beta: (N, Tp, H); state: (N, H, K, V). Returns o (N, Tp, H, V), state.
    """
    C = chunk_size
    K, V = k.shape[-1], v.shape[-1]
    q, k = (rearrange(x, "n (c l) h d -> n h c l d", l=C) for x in (q, k))  # (N, H, NT, C, K)
    v = rearrange(v, "n (c l) h d -> n h c l d", l=C)  # (N, H, NT, C, V)
    g, beta = (rearrange(x, "n (c l) h -> n h c l", l=C) for x in (g, beta))  # (N, H, NT, C)
    position = torch.arange(C, device=q.device)
    inclusive = position[:, None] >= position[None, :]  # (C, C) lower triangle with the diagonal
    strict = position[:, None] > position[None, :]  # (C, C) strictly lower triangle

    G = g.cumsum(-1)  # (N, H, NT, C) chunk-local cumulative log decay
    Lam = (G[..., :, None] - G[..., None, :]).masked_fill(~inclusive, float("-inf")).exp()  # (N, H, NT, C, C)
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * Lam).masked_fill(~strict, 0.0)  # (N, H, NT, C, C)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([(beta * G.exp())[..., None] * k, beta[..., None] * v], dim=-1)  # (N, H, NT, C, K + V)
    WU = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)  # T·rhs, T = (I + A)^-1
    W, U_tilde = WU.split([K, V], dim=-1)  # (N, H, NT, C, K), (N, H, NT, C, V)

    QKL = ((q @ k.transpose(-1, -2)) * Lam).masked_fill(~inclusive, 0.0)  # (N, H, NT, C, C), zero above the diagonal
    q_decayed = q * G.exp()[..., None]  # (N, H, NT, C, K): diag(e^G) Q
    G_last = G[..., -1]  # (N, H, NT)
    k_decayed = k * (G_last[..., None] - G).exp()[..., None]  # (N, H, NT, C, K): diag(e^{G_n − G}) K

    outputs = []
    # Unbind once: indexing [:, :, c] inside the loop makes each chunk's backward allocate a full-size gradient,
    # which turns the backward quadratic in the number of chunks.
    per_chunk = zip(U_tilde.unbind(2), W.unbind(2), q_decayed.unbind(2), QKL.unbind(2),
                    G_last.exp().unbind(2), k_decayed.unbind(2))
    for u_tilde_c, w_c, q_c, qkl_c, decay_c, k_c in per_chunk:
        U = u_tilde_c - w_c @ state  # (N, H, C, V): the true pseudo-values u_i
        # QKL's zeros above the diagonal would still multiply a later non-finite u (0 · NaN): it enters as 0 and the
        # outputs from it on get NaN, so it reaches no earlier output (the state keeps the true U)
        finite = torch.isfinite(U).all(-1, keepdim=True)  # (N, H, C, 1)
        o_c = scale * (q_c @ state + qkl_c @ U.masked_fill(~finite, 0.0))  # (N, H, C, V)
        outputs.append(o_c.masked_fill((~finite).cumsum(-2) > 0, float("nan")))
        state = decay_c[..., None, None] * state + k_c.transpose(-1, -2) @ U  # (N, H, K, V)
    o = torch.stack(outputs, dim=2)  # (N, H, NT, C, V)
    return rearrange(o, "n h c l d -> n (c l) h d"), state


def _pad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 to ``length`` (padding is q = k = v = 0, β = 0, g = 0: no write and no decay)."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)


def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, cu_seqlens=None, scale=None,
                             use_qk_l2norm=False, chunk_size=CHUNK_SIZE):
    """The chunked PyTorch gated delta rule (``backend="torch"``); same arguments and returns as the public op."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = v.dtype
    (q, k, v, g, beta), dtype, scale = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    if cu_seqlens is None:
        padded = -(-T // C) * C
        state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)  # (B, H, K, V)
        if T == 0:
            return v.new_zeros(B, 0, H, V, dtype=out_dtype), state * 1.0
        o, final = _chunk_dense(*(_pad_time(x, padded) for x in (q, k, v, g, beta)), state, scale, C)
        return o[:, :T].to(out_dtype), final

    # Varlen: gather each sequence into its own row, padded at its end to a common multiple of C, then unpad.
    bounds = sequence_bounds(cu_seqlens)
    N = len(bounds)
    lengths = [end - start for start, end in bounds]
    padded = max(1, -(-max(lengths, default=0) // C)) * C
    state = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.to(dtype)  # (N, H, K, V)
    offsets = torch.arange(padded, device=q.device)  # (P,)
    starts = torch.tensor([start for start, _ in bounds], device=q.device)  # (N,)
    ends = torch.tensor([end for _, end in bounds], device=q.device)  # (N,)
    source = starts[:, None] + offsets[None, :]  # (N, P) token index of each padded slot
    source = torch.where(source < ends[:, None], source, T)  # index T is an appended zero row
    gathered = [torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])[source] for x in (q, k, v, g, beta)]  # (N, P, ...)
    o, final = _chunk_dense(*gathered, state, scale, C)  # (N, P, H, V)
    slot = torch.cat([n * padded + torch.arange(lengths[n], device=q.device) for n in range(N)])  # (T,)
    o = o.reshape(N * padded, H, V)[slot]  # (T, H, V)
    return o[None].to(out_dtype), final


# ----------------------------------------------------------------------------------------------------------------------
# 3. Triton path: the kernels and their registered ops live in gated_delta_triton.py (imported only when used).
# ----------------------------------------------------------------------------------------------------------------------

def _gated_delta_rule_triton(q, k, v, g, beta, **arguments):
    from zoo.kernels.gated_delta_triton import gated_delta_rule_triton

    # the kernels' masked in-chunk products multiply by 0 (0 · NaN = NaN): non-finite keys, values and gates enter as
    # 0, and the outputs from them on and the final states after them are NaN (a query reaches only its own output)
    bad = non_finite_tokens(k, v, g, beta)  # (B, T, H)
    o, final = gated_delta_rule_triton(q, *(zero_where(bad, x) for x in (k, v, g, beta)), **arguments)
    cu_seqlens = arguments["cu_seqlens"]
    bounds = None if cu_seqlens is None else sequence_bounds(cu_seqlens)
    return nan_from(bad, o, bounds), final.masked_fill(ever_bad(bad, bounds)[..., None, None], float("nan"))


# ----------------------------------------------------------------------------------------------------------------------
# 4. The public op.
# ----------------------------------------------------------------------------------------------------------------------

def _validate(q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{OP}: q must have shape (B, T, H, K), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, T, H, K = q.shape
    check_shape(OP, "k", k, (B, T, H, K), " (the shape of q)")
    check_shape(OP, "v", v, (B, T, H, None), " (B, T, H of q)")
    check_shape(OP, "g", g, (B, T, H), " (B, T, H of q)")
    check_shape(OP, "beta", beta, (B, T, H), " (B, T, H of q)")
    V = v.shape[-1]
    for name, tensor in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_floating(OP, name, tensor)
        if tensor.device != q.device:
            raise ValueError(f"{OP}: {name} is on {tensor.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if K == 0 or V == 0:
        raise ValueError(f"{OP}: key and value dimensions must be positive, got K={K}, V={V}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{OP}: scale must be a Python number or None, got {type(scale).__name__}")
    check_chunk_size(OP, chunk_size)
    N = B if cu_seqlens is None else check_cu_seqlens(OP, cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_shape(OP, "initial_state", initial_state, (N, H, K, V), " (N sequences, H, K, V)")
        check_floating(OP, "initial_state", initial_state)
        if initial_state.device != q.device:
            raise ValueError(f"{OP}: initial_state is on {initial_state.device} but q is on {q.device}")
    check_range(OP, "g (log decay)", g, None, 0.0)
    resolved = resolve_backend(backend, q, OP)
    if resolved == "triton" and chunk_size not in TRITON_CHUNK_SIZES:
        raise ValueError(f"{OP}: the Triton kernels need chunk_size in {TRITON_CHUNK_SIZES}, got {chunk_size}; "
                         f"pick one of those or use backend='torch'")
    return resolved


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                     scale: float | None = None, use_qk_l2norm: bool = False, chunk_size: int = CHUNK_SIZE, *,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule of Gated DeltaNet (Yang et al., arXiv 2412.06464), as used by MoM (arXiv 2502.13685).

    Per sequence and head, with state S (K×V, keys first):
    ``S_t = e^{g_t} S_{t−1} + β_t k_t (v_t − e^{g_t} S_{t−1}ᵀ k_t)ᵀ`` and ``o_t = scale · S_tᵀ q_t``.

    Args:
        q, k: (B, T, H, K) queries and keys. v: (B, T, H, V) values (q, k, v share a dtype).
        g: (B, T, H) log decay, ≤ 0 (the gate is e^g). beta: (B, T, H) write strength β (stable for β ∈ [0, 2]
            and ‖k‖ = 1).
        initial_state: (N, H, K, V) state before the first token of each sequence; None means zeros.
        cu_seqlens: int64 (N + 1,) boundaries [0, ..., T] of N sequences packed along time; needs B == 1.
            Without it N = B. Zero-length sequences are allowed (their final state is their initial state).
        scale: output scale; None means K^-½.
        use_qk_l2norm: normalise q and k over K inside the op, z·(Σz² + 1e-6)^-½, with gradients through it.
        chunk_size: C, tokens per chunk of the chunked forms (results depend on it only by rounding); the Triton
            kernels take 16, 32, 64 or 128.
        backend: "auto" (Triton for CUDA tensors, the chunked torch form otherwise), "reference" (the token loop),
            "torch" (chunked WY/UT form, autograd) or "triton" (kernels with a hand-written backward).

    Returns:
        o: (B, T, H, V) in v's dtype, and final_state: (N, H, K, V) in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from zoo.kernels import gated_delta_rule
        >>> B, T, H, K, V = 2, 100, 4, 16, 32
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> g = -torch.rand(B, T, H)                # log decay <= 0
        >>> beta = torch.rand(B, T, H)
        >>> o, state = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
        >>> o.shape, state.shape
        (torch.Size([2, 100, 4, 32]), torch.Size([2, 4, 16, 32]))
        >>> o2, _ = gated_delta_rule(q[:, 60:], k[:, 60:], v[:, 60:], g[:, 60:], beta[:, 60:],
        ...                          initial_state=gated_delta_rule(q[:, :60], k[:, :60], v[:, :60], g[:, :60],
        ...                                                         beta[:, :60], use_qk_l2norm=True)[1],
        ...                          use_qk_l2norm=True)
        >>> torch.allclose(o2, o[:, 60:], atol=1e-4)
        True
    """
    backend = _validate(q, k, v, g, beta, initial_state, cu_seqlens, scale, chunk_size, backend)
    if q.shape[1] == 1 and cu_seqlens is None and backend != "reference":  # decoding: the one-token step
        state = initial_state if initial_state is not None else q.new_zeros(
            q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=compute_dtype(q))
        step = step_function(backend, q, k, v, g, beta, state)
        o, state = step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, scale, use_qk_l2norm)
        return o[:, None], state
    arguments = dict(initial_state=initial_state, cu_seqlens=cu_seqlens, scale=scale, use_qk_l2norm=use_qk_l2norm)
    if backend == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **arguments)
    if backend == "torch":
        return gated_delta_rule_chunked(q, k, v, g, beta, **arguments, chunk_size=chunk_size)
    return _gated_delta_rule_triton(q, k, v, g, beta, **arguments, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------------------------------
# 5. The one-token step (decoding): a few matrix-vector products per head, no chunk padding.
# ----------------------------------------------------------------------------------------------------------------------

def gated_delta_step_torch(q, k, v, g, beta, state, scale, use_qk_l2norm):
    """One token of the recurrence in torch (autograd through it); no validation (``gated_delta_rule_step`` checks).

    q, k: (B, H, K); v: (B, H, V); g, beta: (B, H); state: (B, H, K, V). With S' = e^g S + k uᵀ,
    u = β (v − e^g Sᵀk) and o = scale·S'ᵀq = scale·(e^g Sᵀq + (q·k) u), so both reads of S are one matmul.
    Returns o (B, H, V) in v's dtype and S' (B, H, K, V) in the compute dtype.
    """
    (q, k, v, g, beta), dtype, scale = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    state = state.to(dtype)
    decay = step_exp(g)[..., None]  # (B, H, 1)
    q_read, k_read = (torch.stack([q, k], dim=-2) @ state).unbind(-2)  # (B, H, V) each: Sᵀq, Sᵀk
    u = beta[..., None] * (v - decay * k_read)  # (B, H, V)
    new_state = torch.addcmul(decay[..., None] * state, k[..., :, None], u[..., None, :])  # (B, H, K, V)
    o = scale * (decay * q_read + (q * k).sum(-1, keepdim=True) * u)  # (B, H, V)
    return o.to(v.dtype), new_state


def _gated_delta_step_triton(q, k, v, g, beta, state, scale, use_qk_l2norm):
    from zoo.kernels.gated_delta_triton import gated_delta_step_triton

    return gated_delta_step_triton(q, k, v, g, beta, state, scale, use_qk_l2norm)


def step_function(backend: str, *tensors):
    """The step for a resolved backend: the Triton kernel (forward only) when none of ``tensors`` (None allowed)
    needs a gradient, else torch."""
    return pick_step(backend, _gated_delta_step_triton, gated_delta_step_torch, tensors)


def gated_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor, scale: float | None = None, use_qk_l2norm: bool = False, *,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`gated_delta_rule` from the state it returned: ``(o, new_state)`` (decoding).

    Args:
        q, k: (B, H, K) the token's query and key; v: (B, H, V); g: (B, H) log decay ≤ 0; beta: (B, H).
        state: (B, H, K, V), e.g. the ``final_state`` of a :func:`gated_delta_rule` call (it is not modified).
        scale, use_qk_l2norm: as in :func:`gated_delta_rule`.
        backend: "auto" (the Triton kernel for CUDA tensors, torch otherwise), "torch", or "triton". The Triton step
            has no backward: when a gradient is needed (grad mode on and an input requiring grad) the torch step runs.

    Returns:
        o: (B, H, V) in v's dtype; new_state: (B, H, K, V) in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> from zoo.kernels.gated_delta import gated_delta_rule, gated_delta_rule_step
        >>> B, T, H, K, V = 2, 10, 4, 16, 32
        >>> q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        >>> g, beta = -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, state = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
        >>> o_prefix, state = gated_delta_rule(q[:, :9], k[:, :9], v[:, :9], g[:, :9], beta[:, :9], use_qk_l2norm=True)
        >>> o_last, state = gated_delta_rule_step(q[:, 9], k[:, 9], v[:, 9], g[:, 9], beta[:, 9], state,
        ...                                       use_qk_l2norm=True)
        >>> o_last.shape, torch.allclose(o_last, o[:, 9], atol=1e-5)
        (torch.Size([2, 4, 32]), True)
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{OP}_step: q must have shape (B, H, K) (one token, no time axis), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, H, K = q.shape
    check_shape(f"{OP}_step", "k", k, (B, H, K), " (the shape of q)")
    check_shape(f"{OP}_step", "v", v, (B, H, None), " (B, H of q)")
    check_shape(f"{OP}_step", "g", g, (B, H), " (B, H of q)")
    check_shape(f"{OP}_step", "beta", beta, (B, H), " (B, H of q)")
    check_shape(f"{OP}_step", "state", state, (B, H, K, v.shape[-1]), " (B, H, K, V)")
    for name, tensor in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state)):
        check_floating(f"{OP}_step", name, tensor)
        if tensor.device != q.device:
            raise ValueError(f"{OP}_step: {name} is on {tensor.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}_step: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{OP}_step: scale must be a Python number or None, got {type(scale).__name__}")
    if backend == "reference":
        raise ValueError(f"{OP}_step: backend must be 'auto', 'torch' or 'triton', got 'reference' (the step is "
                         f"already the plain recurrence)")
    check_range(f"{OP}_step", "g (log decay)", g, None, 0.0)
    resolved = resolve_backend(backend, q, f"{OP}_step")
    return step_function(resolved, q, k, v, g, beta, state)(q, k, v, g, beta, state, scale, use_qk_l2norm)

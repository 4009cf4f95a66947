"""``titans_linear_memory``: the Titans long-term memory as a matrix (docs/titans.md#the-linear-memory-op).

Per (batch, head), with row vectors, chunk size b and chunks aligned to the start of the call, token t reads and writes

    R = M at the start of t's chunk;  U_t = 2 k_tᵀ(k_t R − v_t)          (gradient of ‖k_t R − v_t‖² at R)
    S_t = η_t S_{t−1} − θ_t U_t;  M_t = (1 − α_t) M_{t−1} + S_t;  o_t = q_t M_t

(Behrouz et al., "Titans: Learning to Memorize at Test Time", arXiv 2501.00663, eqs. 13–18). The file holds the four
parts of the kernel contract: the token loop (oracle), the chunked dual form in torch, the Triton path (kernels in
``titans_linear_memory_triton.py``, imported lazily) and the public function.

Parts 1–3 run on a chunk grid aligned to the start of their call, from (M, S) at a chunk boundary. The public function
carries the stream across calls as ``titans_mlp_memory`` does: its state holds (M, S) at the last completed chunk
boundary plus the keys, values and gates of the p < b tokens after it, and a call prepends those pending tokens (zero
queries, outputs dropped), so chunks stay aligned to the original sequence and any split equals one call.
``titans_linear_memory_step`` reads and writes one token from that state (decoding); the op runs it by itself for
T = 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange

from zoo.kernels._common import (check_chunk_size, check_finite, check_floating, check_range, check_shape,
                                 compute_dtype, nan_from, non_finite_tokens, resolve_backend, zero_where)

_OP = "titans_linear_memory"


class LinearMemoryState(NamedTuple):
    """Recurrent state of :func:`titans_linear_memory`, batch-first.

    memory, momentum: (B, H, K, V) M and S at the last completed chunk boundary, fp32 (fp64 for fp64 inputs).
    pending_k: (B, p, H, K) and pending_v: (B, p, H, V), the p < chunk_size tokens since that boundary.
    pending_gates: (B, p, H, 3) = (α, η, θ) of those tokens.
    """

    memory: torch.Tensor
    momentum: torch.Tensor
    pending_k: torch.Tensor
    pending_v: torch.Tensor
    pending_gates: torch.Tensor


def _zero_state(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, heads, key_dim = q.shape
    zeros = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype, device=q.device)  # (B, H, K, V)
    return zeros, zeros.clone()


# ---------------------------------------------------------------------------------------------------------------------
# 1. Reference: the token loop of docs/titans.md#the-linear-memory-op
# ---------------------------------------------------------------------------------------------------------------------

def titans_linear_memory_reference(q, k, v, alpha, eta, theta, chunk_size=16, initial_state=None):
    """The token loop of Titans v1 eqs. 13–15, the oracle for every other backend (works in float64).

    Shapes as in :func:`titans_linear_memory`; returns ``(o, (M, S))`` with M, S the state after the last token.
    """
    dtype = compute_dtype(q, k, v)
    M, S = _zero_state(q, v, dtype) if initial_state is None else (t.to(dtype) for t in initial_state)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    a, e, th = alpha.to(dtype), eta.to(dtype), theta.to(dtype)
    outputs = []
    R = M
    for t in range(q.shape[1]):
        if t % chunk_size == 0:
            R = M  # chunk-start weights: every gradient of this chunk is taken here
        k_t = kc[:, t]  # (B, H, K)
        error = torch.einsum("bhk,bhkv->bhv", k_t, R) - vc[:, t]  # (B, H, V)
        U = 2 * k_t[..., :, None] * error[..., None, :]  # (B, H, K, V)
        S = e[:, t, :, None, None] * S - th[:, t, :, None, None] * U
        M = (1 - a[:, t, :, None, None]) * M + S
        outputs.append(torch.einsum("bhk,bhkv->bhv", qc[:, t], M))  # (B, H, V)
    if outputs:
        o = torch.stack(outputs, dim=1)  # (B, T, H, V)
    else:
        o = v.new_zeros(v.shape, dtype=dtype)
    return o.to(v.dtype), (M, S)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunked dual form in torch; the gate coefficients are shared with the Triton path and the deep memory
# ---------------------------------------------------------------------------------------------------------------------

def _segment_products(factors: torch.Tensor) -> torch.Tensor:
    """``out[..., i, r] = Π_{r<j≤i} factors[..., j]`` for r ≤ i (1 on the diagonal), 0 above it.

    The masked cumulative product over the b×b tile equals exp of the Mamba-2 segment sum of the log-factors, but it
    stays exact when a factor is 0 (α = 1 or η = 0), so the gate gradients there match the token loop exactly.
    """
    size = factors.shape[-1]
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=factors.device).tril(-1)
    tile = torch.where(strictly_lower, factors[..., :, None], torch.ones((), dtype=factors.dtype,
                                                                            device=factors.device))  # (..., b, b)
    products = torch.cumprod(tile, dim=-2)  # (..., b, b)
    return torch.where(strictly_lower | torch.eye(size, dtype=torch.bool, device=factors.device), products,
                       torch.zeros((), dtype=factors.dtype, device=factors.device))


def _chunk_gate_coefficients(alpha, eta, chunk_size: int, dtype: torch.dtype) -> dict:
    """Gate-only coefficients of the dual form for every chunk at once (docs/titans.md#chunk-parallel-form).

    alpha, eta: (B, T, H). Returns, in layout (B, H, N, b, ...) with N = ceil(T / b) chunks (the last one zero-padded):
    ``G`` = A·B (b×b), ``B`` (b×b), ``beta`` (b), ``f`` (b), and the chunk-end rows ``G_end``, ``B_end`` (b) and scalars
    ``beta_end``, ``f_end``, ``m_end`` taken at the last real token of each chunk.
    """
    T = alpha.shape[1]
    num_chunks = -(-T // chunk_size)
    pad = num_chunks * chunk_size - T
    decay = rearrange(torch.nn.functional.pad(1 - alpha.to(dtype), (0, 0, 0, pad), value=1.0),
                      "b (n c) h -> b h n c", c=chunk_size)  # (B, H, N, b)
    momentum = rearrange(torch.nn.functional.pad(eta.to(dtype), (0, 0, 0, pad), value=1.0),
                         "b (n c) h -> b h n c", c=chunk_size)  # (B, H, N, b)
    A = _segment_products(decay)  # (B, H, N, b, b)
    Bm = _segment_products(momentum)  # (B, H, N, b, b)
    beta = torch.cumprod(decay, dim=-1)  # (B, H, N, b)
    m = torch.cumprod(momentum, dim=-1)  # (B, H, N, b)
    G = A @ Bm  # (B, H, N, b, b)
    f = (A @ m[..., None])[..., 0]  # (B, H, N, b)
    last = torch.full((num_chunks,), chunk_size - 1, dtype=torch.long, device=alpha.device)
    last[-1] = T - 1 - (num_chunks - 1) * chunk_size
    chunk = torch.arange(num_chunks, device=alpha.device)
    return dict(G=G, B=Bm, beta=beta, f=f, G_end=G[:, :, chunk, last], B_end=Bm[:, :, chunk, last],
                beta_end=beta[:, :, chunk, last], f_end=f[:, :, chunk, last], m_end=m[:, :, chunk, last],
                num_chunks=num_chunks, pad=pad)


def _to_chunks(x: torch.Tensor, chunk_size: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H, D) -> (B, H, N, b, D), zero-padded in time, in ``dtype``."""
    x = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
    return rearrange(x, "b (n c) h d -> b h n c d", c=chunk_size)


def _titans_linear_memory_torch(q, k, v, alpha, eta, theta, chunk_size, initial_state):
    """Chunk-parallel dual form: gate/q/k work for all chunks at once, a loop over the T/b chunks carries (W, S)."""
    dtype = compute_dtype(q, k, v)
    T = q.shape[1]
    W, S = _zero_state(q, v, dtype) if initial_state is None else (t.to(dtype) for t in initial_state)
    with torch.autocast(q.device.type, enabled=False):
        coef = _chunk_gate_coefficients(alpha, eta, chunk_size, dtype)
        pad = coef["pad"]
        th = rearrange(torch.nn.functional.pad(theta.to(dtype), (0, 0, 0, pad)), "b (n c) h -> b h n c",
                       c=chunk_size)  # (B, H, N, b)
        Q, K, V = (_to_chunks(x, chunk_size, pad, dtype) for x in (q, k, v))  # (B, H, N, b, K|V)
        P = (Q @ K.transpose(-1, -2)) * coef["G"] * th[..., None, :]  # (B, H, N, b, b)
        c = coef["G_end"] * th  # (B, H, N, b)
        e = coef["B_end"] * th  # (B, H, N, b)
        beta, f = coef["beta"][..., None], coef["f"][..., None]  # (B, H, N, b, 1)
        beta_end, f_end, m_end = (coef[name][..., None, None] for name in ("beta_end", "f_end", "m_end"))
        outputs = []
        for n in range(coef["num_chunks"]):
            Qn, Kn = Q[:, :, n], K[:, :, n]  # (B, H, b, K)
            delta = 2 * (Kn @ W - V[:, :, n])  # (B, H, b, V)
            outputs.append(beta[:, :, n] * (Qn @ W) + f[:, :, n] * (Qn @ S) - P[:, :, n] @ delta)  # (B, H, b, V)
            Kt = Kn.transpose(-1, -2)  # (B, H, K, b)
            W, S = (beta_end[:, :, n] * W + f_end[:, :, n] * S - Kt @ (c[:, :, n, :, None] * delta),
                    m_end[:, :, n] * S - Kt @ (e[:, :, n, :, None] * delta))
        o = rearrange(torch.stack(outputs, dim=2), "b h n c d -> b (n c) h d")[:, :T]  # (B, T, H, V)
    return o.to(v.dtype), (W, S)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Triton path: kernels and the registered ops live in titans_linear_memory_triton.py (imported only when used)
# ---------------------------------------------------------------------------------------------------------------------

def _triton_supports(chunk_size: int, key_dim: int) -> str | None:
    """Why the Triton kernels cannot take this shape, or None when they can."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        return f"chunk_size must be a power of two >= 16 for backend='triton', got {chunk_size}"
    if key_dim > 256:
        return f"q/k head dim K must be <= 256 for backend='triton', got {key_dim}"
    return None


def _titans_linear_memory_triton(q, k, v, alpha, eta, theta, chunk_size, initial_state):
    from zoo.kernels.titans_linear_memory_triton import titans_linear_memory_triton

    dtype = compute_dtype(q, k, v)
    M0, S0 = _zero_state(q, v, dtype) if initial_state is None else (t.to(dtype) for t in initial_state)
    T = q.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        coef = _chunk_gate_coefficients(alpha, eta, chunk_size, dtype)
        pad = coef["pad"]
        th = rearrange(torch.nn.functional.pad(theta.to(dtype), (0, 0, 0, pad)), "b (n c) h -> b h n c",
                       c=chunk_size)  # (B, H, N, b)
        gamma = coef["G"] * th[..., None, :]  # (B, H, N, b, b)
        ends = torch.stack([coef["beta_end"], coef["f_end"], coef["m_end"]], dim=-1)  # (B, H, N, 3)
        Q, K, V = (rearrange(_to_chunks(x, chunk_size, pad, dtype), "b h n c d -> b h (n c) d")
                   for x in (q, k, v))  # (B, H, N·b, K|V)
        o, M, S = titans_linear_memory_triton(Q, K, V, gamma, coef["beta"], coef["f"], coef["G_end"] * th,
                                              coef["B_end"] * th, ends, M0, S0, chunk_size)
        o = rearrange(o, "b h t d -> b t h d")[:, :T]  # (B, T, H, V)
    return o.to(v.dtype), (M, S)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op: validation, the pending-token stream protocol, dispatch
# ---------------------------------------------------------------------------------------------------------------------

_RUNS = {"reference": titans_linear_memory_reference, "torch": _titans_linear_memory_torch,
         "triton": _titans_linear_memory_triton}


def check_values(op: str, named: dict, alpha, eta, theta) -> None:
    """Every named tensor floating-point and finite, α and η in [0, 1], θ ≥ 0 (the checks both Titans ops share)."""
    for name, tensor in named.items():
        check_floating(op, name, tensor)
        check_finite(op, name, tensor)
    check_range(op, "alpha", alpha, 0.0, 1.0)
    check_range(op, "eta", eta, 0.0, 1.0)
    check_range(op, "theta", theta, 0.0, None)


def _validate(q, k, v, alpha, eta, theta, chunk_size, initial_state, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend."""
    check_shape(_OP, "q", q, (None, None, None, None), " (B, T, H, K)")
    B, T, H, K = q.shape
    check_shape(_OP, "k", k, (B, T, H, K), " (the shape of q)")
    check_shape(_OP, "v", v, (B, T, H, None), " (B, T, H, V)")
    for name, gate in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        check_shape(_OP, name, gate, (B, T, H), " (B, T, H)")
    check_chunk_size(_OP, chunk_size)
    Vdim = v.shape[-1]
    named = dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta)
    if isinstance(initial_state, LinearMemoryState):
        for name in ("memory", "momentum"):
            check_shape(_OP, f"initial_state.{name}", getattr(initial_state, name), (B, H, K, Vdim), " (B, H, K, V)")
        p = initial_state.pending_k.shape[1] if initial_state.pending_k.dim() == 4 else -1
        if not 0 <= p < chunk_size:
            raise ValueError(f"{_OP}: initial_state.pending_k must be (B, p, H, K) with p < chunk_size={chunk_size}, "
                             f"got shape {tuple(initial_state.pending_k.shape)}; pass the state of a call with the "
                             f"same chunk_size")
        check_shape(_OP, "initial_state.pending_k", initial_state.pending_k, (B, p, H, K), " (B, p, H, K)")
        check_shape(_OP, "initial_state.pending_v", initial_state.pending_v, (B, p, H, Vdim), " (B, p, H, V)")
        check_shape(_OP, "initial_state.pending_gates", initial_state.pending_gates, (B, p, H, 3), " (B, p, H, 3)")
        named.update({f"initial_state.{name}": tensor for name, tensor in initial_state._asdict().items()})
    elif initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError(f"{_OP}: initial_state must be a LinearMemoryState, a pair (M_0, S_0) or None")
        for name, state in zip(("initial_state[0] (M_0)", "initial_state[1] (S_0)"), initial_state):
            check_shape(_OP, name, state, (B, H, K, Vdim), " (B, H, K, V)")
        named.update(M_0=initial_state[0], S_0=initial_state[1])
    check_values(_OP, named, alpha, eta, theta)
    resolved = resolve_backend(backend, q, _OP)
    if resolved == "triton":
        reason = _triton_supports(chunk_size, K)
        if reason is not None:
            if backend == "triton":
                raise ValueError(f"{_OP}: {reason}")
            resolved = "torch"
    return resolved


def _non_finite_stays_causal(run):
    """``run`` (a chunked path) fed zeros in place of the non-finite keys, values and gates, whose outputs from such a
    token on and end state are NaN: its dense in-chunk products multiply masked entries by 0 (0 · NaN = NaN), so a NaN
    would otherwise reach the earlier tokens of its chunk."""
    def guarded(q, k, v, alpha, eta, theta, chunk_size, state):
        bad = non_finite_tokens(k, v, alpha, eta, theta)  # (B, T, H)
        o, (memory, momentum) = run(q, zero_where(bad, k), zero_where(bad, v), *(zero_where(bad, gate) for gate in
                                    (alpha, eta, theta)), chunk_size, state)
        ever = bad.any(1)[..., None, None]  # (B, H, 1, 1)
        return nan_from(bad, o), (memory.masked_fill(ever, float("nan")), momentum.masked_fill(ever, float("nan")))
    return guarded


def _stream(run, q, k, v, alpha, eta, theta, chunk_size, initial_state):
    """Prepend the pending tokens of ``initial_state``, run the chunk-aligned prefix (its end is the new boundary
    state) and then the tail from it; returns (o (B, T, H, V), LinearMemoryState)."""
    B, T, H, K = q.shape
    dtype = compute_dtype(q, k, v)
    gates = torch.stack([alpha, eta, theta], dim=-1)  # (B, T, H, 3)
    if isinstance(initial_state, LinearMemoryState):
        memory, momentum, pending_k, pending_v, pending_gates = initial_state
        pending = pending_k.shape[1]
        q = torch.cat([q.new_zeros(B, pending, H, K), q], dim=1)
        k = torch.cat([pending_k.to(k.dtype), k], dim=1)
        v = torch.cat([pending_v.to(v.dtype), v], dim=1)
        gates = torch.cat([pending_gates.to(gates.dtype), gates], dim=1)
    else:
        memory, momentum = _zero_state(q, v, dtype) if initial_state is None else initial_state
        pending = 0
    total = pending + T
    aligned = (total // chunk_size) * chunk_size
    pieces, state = [], (memory, momentum)
    for start, stop, is_prefix in ((0, aligned, True), (aligned, total, False)):
        if stop == start:
            continue
        g = gates[:, start:stop]
        o, end_state = run(q[:, start:stop], k[:, start:stop], v[:, start:stop], g[..., 0], g[..., 1], g[..., 2],
                           chunk_size, state)
        pieces.append(o)
        if is_prefix:
            state = end_state  # the boundary state after the aligned prefix
    o = torch.cat(pieces, dim=1)[:, pending:] if pieces else v.new_zeros(v.shape)  # (B, T, H, V)
    memory, momentum = state
    return o, LinearMemoryState(memory.to(dtype), momentum.to(dtype), k[:, aligned:], v[:, aligned:],
                                gates[:, aligned:].to(dtype))


def titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size: int = 16, initial_state=None, *,
                         backend: str = "auto"):
    """Titans neural long-term memory with a matrix memory M ∈ R^{K×V}, trained online by chunked gradient descent.

    Args:
        q, k: (B, T, H, K) queries and keys (no normalisation, scale or activation is applied inside the op).
        v: (B, T, H, V) values.
        alpha: (B, T, H) forget gate α_t ∈ [0, 1] (weight decay).
        eta: (B, T, H) momentum gate η_t ∈ [0, 1] (decay of the past surprise S).
        theta: (B, T, H) learning rate θ_t ≥ 0.
        chunk_size: b ≥ 1; every gradient of a chunk of b tokens is taken at the chunk-start weights. Chunks align to
            the start of the sequence (the last one may be partial). b = 1 is plain online gradient descent.
        initial_state: a :class:`LinearMemoryState` returned by a previous call; or a pair (M_0, S_0), each
            (B, H, K, V), the memory at the start of a chunk; None means zeros.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "reference", "torch" or "triton".

    Returns:
        o: (B, T, H, V) in v's dtype, o_t = q_t M_t read after absorbing token t.
        state: :class:`LinearMemoryState` (M and S at the last completed chunk boundary, fp32 or fp64 for fp64
            inputs, plus the pending tokens). Calling on x[:, :t] and then on x[:, t:] with that state equals one
            call, for every t.

    Per chunk of b tokens with start weights R, for each token t (v1 eqs. 13–14, docs/titans.md#the-linear-memory-op):
    S_t = η_t S_{t−1} − θ_t ∇‖k_t R − v_t‖², M_t = (1 − α_t) M_{t−1} + S_t.

    Example:
        >>> import torch
        >>> from zoo.kernels import titans_linear_memory
        >>> B, T, H, K, V = 2, 40, 3, 8, 8
        >>> q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, K), dim=-1)
        >>> v = torch.randn(B, T, H, V)
        >>> alpha, eta, theta = torch.rand(3, B, T, H)
        >>> o, state = titans_linear_memory(q, k, v, alpha, eta, 0.1 * theta, chunk_size=16)
        >>> o.shape, state.memory.shape, state.pending_k.shape
        (torch.Size([2, 40, 3, 8]), torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 3, 8]))
    """
    backend = _validate(q, k, v, alpha, eta, theta, chunk_size, initial_state, backend)
    if q.shape[1] == 1 and backend != "reference":  # decoding: the one-token step
        o, state = linear_memory_step(q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], eta[:, 0], theta[:, 0],
                                      _as_stream_state(q, v, initial_state), chunk_size)
        return o[:, None], state
    run = _RUNS[backend] if backend == "reference" else _non_finite_stays_causal(_RUNS[backend])
    return _stream(run, q, k, v, alpha, eta, theta, chunk_size, initial_state)


# ---------------------------------------------------------------------------------------------------------------------
# 5. One-token step (decoding): the token's chunk read from its boundary state, in closed form
# ---------------------------------------------------------------------------------------------------------------------

def _as_stream_state(q: torch.Tensor, v: torch.Tensor, initial_state) -> LinearMemoryState:
    """A LinearMemoryState for any accepted ``initial_state`` (None or a pair (M_0, S_0) have no pending tokens)."""
    if isinstance(initial_state, LinearMemoryState):
        return initial_state
    dtype = compute_dtype(q, v)
    memory, momentum = _zero_state(q, v, dtype) if initial_state is None else initial_state
    B, _, H, K = q.shape
    empty = q.new_zeros(B, 0, H, K)
    return LinearMemoryState(memory, momentum, empty, v.new_zeros(B, 0, H, v.shape[-1]),
                             q.new_zeros(B, 0, H, 3, dtype=dtype))


def linear_memory_step(q, k, v, alpha, eta, theta, state: LinearMemoryState, chunk_size: int):
    """One token (q, k (B, H, K), v (B, H, V), gates (B, H)) after ``state``: (o (B, H, V), LinearMemoryState).

    The token is row n − 1 of its chunk's n = p + 1 tokens (the p pending ones first), all with gradients at the
    boundary weights R, so o = β qR + f qS − Σ_j Γ_j θ_j (q·k_j) 2(k_j R − v_j) with the dual form's last-row gate
    coefficients (docs/titans.md#chunk-parallel-form); when the chunk completes, the boundary state moves to its end.
    Cost O(n·K·V) for n ≤ chunk_size: constant in the position. Autograd flows through it; no validation.
    """
    dtype = compute_dtype(q, k, v)
    memory, momentum = state.memory.to(dtype), state.momentum.to(dtype)
    gates = torch.stack([alpha, eta, theta], dim=-1).to(dtype)[:, None]  # (B, 1, H, 3)
    keys = torch.cat([state.pending_k.to(k.dtype), k[:, None]], dim=1)  # (B, n, H, K)
    values = torch.cat([state.pending_v.to(v.dtype), v[:, None]], dim=1)  # (B, n, H, V)
    gates = torch.cat([state.pending_gates.to(dtype), gates], dim=1)  # (B, n, H, 3)
    n = keys.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        coef = _chunk_gate_coefficients(gates[..., 0], gates[..., 1], n, dtype)  # one chunk of n tokens
        th = rearrange(gates[..., 2], "b n h -> b h n")  # (B, H, n)
        K_c, V_c = (rearrange(x.to(dtype), "b n h d -> b h n d") for x in (keys, values))  # (B, H, n, K|V)
        q_c = q.to(dtype)[:, :, None]  # (B, H, 1, K)
        delta = 2 * (K_c @ memory - V_c)  # (B, H, n, V)
        weight = coef["G_end"][:, :, 0] * th  # (B, H, n): Γ_{n−1, j} θ_j
        read = torch.cat([q_c @ memory, q_c @ momentum], dim=-2)  # (B, H, 2, V): qR, qS
        o = (coef["beta_end"][:, :, 0, None] * read[:, :, 0] + coef["f_end"][:, :, 0, None] * read[:, :, 1]
             - ((q_c @ K_c.transpose(-1, -2)) * weight[:, :, None] @ delta)[:, :, 0]).to(v.dtype)  # (B, H, V)
        if n < chunk_size:
            return o, LinearMemoryState(memory, momentum, keys, values, gates)
        K_t = K_c.transpose(-1, -2)  # (B, H, K, n)
        beta_end, f_end, m_end = (coef[name][:, :, 0, None, None] for name in ("beta_end", "f_end", "m_end"))
        new_memory = beta_end * memory + f_end * momentum - K_t @ (weight[..., None] * delta)
        new_momentum = m_end * momentum - K_t @ ((coef["B_end"][:, :, 0] * th)[..., None] * delta)
    return o, LinearMemoryState(new_memory, new_momentum, keys[:, n:], values[:, n:], gates[:, n:])


def titans_linear_memory_step(q, k, v, alpha, eta, theta, state, chunk_size: int = 16, *, backend: str = "auto"):
    """One token of :func:`titans_linear_memory` from the state it returned: ``(o, new_state)`` (decoding).

    Args:
        q, k: (B, H, K) and v: (B, H, V), the token (no time axis); alpha, eta, theta: (B, H) its gates.
        state: the :class:`LinearMemoryState` of a previous call (or step) with the same ``chunk_size``; a pair
            (M_0, S_0) or None starts at a chunk boundary. It is not modified.
        chunk_size, backend: as in :func:`titans_linear_memory` ("reference" is refused: the step is closed-form).
            The step is torch on every device (a handful of small matmuls; there is no Triton step kernel).

    Returns:
        o: (B, H, V) in v's dtype; the new :class:`LinearMemoryState` (the boundary moves when the token completes a
        chunk). Each step costs O(chunk_size·K·V) at most, whatever the position.

    Example:
        >>> import torch
        >>> from zoo.kernels.titans_linear_memory import titans_linear_memory, titans_linear_memory_step
        >>> B, T, H, K, V = 2, 20, 3, 8, 8
        >>> q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, K), dim=-1)
        >>> v = torch.randn(B, T, H, V)
        >>> alpha, eta, theta = torch.rand(3, B, T, H)
        >>> o, _ = titans_linear_memory(q, k, v, alpha, eta, 0.1 * theta)
        >>> _, state = titans_linear_memory(q[:, :19], k[:, :19], v[:, :19], alpha[:, :19], eta[:, :19],
        ...                                 0.1 * theta[:, :19])
        >>> o_last, state = titans_linear_memory_step(q[:, 19], k[:, 19], v[:, 19], alpha[:, 19], eta[:, 19],
        ...                                           0.1 * theta[:, 19], state)
        >>> o_last.shape, torch.allclose(o_last, o[:, 19], atol=1e-5)
        (torch.Size([2, 3, 8]), True)
    """
    for name, x, dims in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("alpha", alpha, 2), ("eta", eta, 2),
                          ("theta", theta, 2)):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            raise ValueError(f"{_OP}_step: {name} must be one token without a time axis ({dims} dims), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if backend == "reference":
        raise ValueError(f"{_OP}_step: backend must be 'auto', 'torch' or 'triton', got 'reference'")
    q, k, v, alpha, eta, theta = (x[:, None] for x in (q, k, v, alpha, eta, theta))
    _validate(q, k, v, alpha, eta, theta, chunk_size, state, backend)
    return linear_memory_step(q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], eta[:, 0], theta[:, 0],
                              _as_stream_state(q, v, state), chunk_size)


__all__ = ["LinearMemoryState", "titans_linear_memory", "titans_linear_memory_reference", "titans_linear_memory_step"]

"""``titans_mlp_memory``: the Titans long-term memory with a deep (L ≥ 2) MLP memory (docs/titans.md#deep-memory).

The memory network, per (batch, head), with fast weights W^1 (d×E), W^2..W^{L−1} (E×E), W^L (E×d):

    h_0 = z;  h_ℓ = GELU(h_{ℓ−1} W^ℓ) for ℓ < L;  M_W(z) = z + LN(h_{L−1} W^L)     (exact GELU, LN without affine)

is trained online on ℓ_t(W) = ‖M_W(k_t) − v_t‖² with momentum and decay, every gradient of a chunk taken at the chunk-start
weights, and read after each token: y_t = M_{W_t}(q_t) (Behrouz et al., arXiv 2501.00663, eqs. 13–15; NeurIPS Sec. 3.3).

State across calls: the weights and momenta at the last completed chunk boundary plus the keys, values and gates of
the p < b tokens after it. A call prepends those pending tokens (with zero queries, outputs dropped), so chunks stay
aligned to the original sequence and any split — inside a chunk or not — gives the same outputs as one call.
There is no Triton path: backends are "reference" (token loop with autograd gradients) and "torch" (chunk dual form).
``titans_mlp_memory_step`` reads and writes one token from that state (decoding); the op runs it by itself for T = 1.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels._common import (check_chunk_size, check_shape, compute_dtype, nan_from, non_finite_tokens,
                                 resolve_backend, zero_where)
from zoo.kernels.titans_linear_memory import _chunk_gate_coefficients, _to_chunks, check_values

_OP = "titans_mlp_memory"
_LN_EPS = 1e-5


class MLPMemoryState(NamedTuple):
    """Recurrent state of :func:`titans_mlp_memory`, batch-first.

    weights, momentum: tuples of L tensors (B, H, in, out), fp32 (fp64 for fp64 inputs), at the last chunk boundary.
    pending_k, pending_v: (B, p, H, d), the p < chunk_size tokens since that boundary (p read from the shape).
    pending_gates: (B, p, H, 2 + L) = (α, η, θ^1..θ^L) of those tokens.
    """

    weights: tuple
    momentum: tuple
    pending_k: torch.Tensor
    pending_v: torch.Tensor
    pending_gates: torch.Tensor


def _layer_norm(z: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(z, z.shape[-1:], eps=_LN_EPS)


def _memory_mlp(z: torch.Tensor, weights) -> torch.Tensor:
    """M_W(z) = z + LN(h_{L−1} W^L) for z (B, H, n, d) and weights (B, H, in, out)."""
    h = z
    for layer in weights[:-1]:
        h = F.gelu(h @ layer)  # (B, H, n, E)
    return z + _layer_norm(h @ weights[-1])  # (B, H, n, d)


def _gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    """d GELU(z) / dz = Φ(z) + z φ(z) for the exact (erf) GELU."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


# ---------------------------------------------------------------------------------------------------------------------
# Shared: state in, pending tokens prepended, state out
# ---------------------------------------------------------------------------------------------------------------------

def _start(q, k, v, alpha, eta, theta, weights, initial_state):
    """Prepend the pending tokens of ``initial_state``; return the full-length streams and the boundary state."""
    dtype = compute_dtype(q, k, v)
    B, _, H, d = q.shape
    L = len(weights)
    gates = torch.cat([alpha[..., None], eta[..., None], theta], dim=-1).to(dtype)  # (B, T, H, 2 + L)
    if initial_state is None:
        W = tuple(w.to(dtype).unsqueeze(0).expand(B, *w.shape) for w in weights)  # (B, H, in, out) each
        S = tuple(torch.zeros_like(w) for w in W)
        pending = 0
    else:
        W = tuple(w.to(dtype) for w in initial_state.weights)
        S = tuple(s.to(dtype) for s in initial_state.momentum)
        pending = initial_state.pending_k.shape[1]
        q = torch.cat([q.new_zeros(B, pending, H, d), q], dim=1)
        k = torch.cat([initial_state.pending_k.to(k.dtype), k], dim=1)
        v = torch.cat([initial_state.pending_v.to(v.dtype), v], dim=1)
        gates = torch.cat([initial_state.pending_gates.to(dtype), gates], dim=1)
    assert gates.shape[-1] == 2 + L
    return q, k, v, gates, W, S, pending


def _finish(o, k, v, gates, pending, chunk_size, boundary_weights, boundary_momentum, out_dtype):
    """Drop the outputs of the pending rows and keep the tokens after the last complete chunk as the new pending."""
    total = k.shape[1]
    tail = total - (total // chunk_size) * chunk_size
    state = MLPMemoryState(tuple(boundary_weights), tuple(boundary_momentum), k[:, total - tail:],
                           v[:, total - tail:], gates[:, total - tail:])
    return o[:, pending:].to(out_dtype), state


# ---------------------------------------------------------------------------------------------------------------------
# 1. Reference: the token loop with autograd gradients at the chunk-start weights (docs/titans.md#deep-memory)
# ---------------------------------------------------------------------------------------------------------------------

def titans_mlp_memory_reference(q, k, v, alpha, eta, theta, weights, chunk_size=16, initial_state=None):
    """Token loop: u_t = autograd.grad(ℓ_t, W_{c,0}, create_graph=True), per-token weights materialised; the oracle.

    Shapes and state as in :func:`titans_mlp_memory`; works in float64.
    """
    out_dtype = v.dtype
    q, k, v, gates, W, S, pending = _start(q, k, v, alpha, eta, theta, weights, initial_state)
    dtype = gates.dtype
    create_graph = torch.is_grad_enabled()
    boundary = (W, S)
    outputs = []
    R = W
    for t in range(k.shape[1]):
        if t % chunk_size == 0:
            R = W
        a_t, eta_t = gates[:, t, :, 0, None, None], gates[:, t, :, 1, None, None]  # (B, H, 1, 1)
        with torch.enable_grad():
            R_grad = [r if r.requires_grad else r.detach().requires_grad_() for r in R]
            k_t = k[:, t, :, None, :].to(dtype)  # (B, H, 1, d)
            v_t = v[:, t, :, None, :].to(dtype)  # (B, H, 1, d)
            loss = (_memory_mlp(k_t, R_grad) - v_t).pow(2).sum()
            U = torch.autograd.grad(loss, R_grad, create_graph=create_graph)
        S = tuple(eta_t * s - gates[:, t, :, 2 + layer, None, None] * u for layer, (s, u) in enumerate(zip(S, U)))
        W = tuple((1 - a_t) * w + s for w, s in zip(W, S))
        outputs.append(_memory_mlp(q[:, t, :, None, :].to(dtype), W)[:, :, 0])  # (B, H, d)
        if (t + 1) % chunk_size == 0:
            boundary = (W, S)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(q.shape, dtype=dtype)  # (B, T', H, d)
    return _finish(o, k, v, gates, pending, chunk_size, *boundary, out_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Chunk-parallel torch path: batched store pass, manual backward, dual-form readout, closed-form chunk end
# ---------------------------------------------------------------------------------------------------------------------

def _chunk_store_pass(K, V, W):
    """Per-token activations a^ℓ and prediction gradients g^ℓ of ℓ_s at the chunk-start weights W.

    K, V: (B, H, n, d); W: L tensors (B, H, in, out). Token s's gradient of W^ℓ is a^ℓ_sᵀ g^ℓ_s.
    """
    acts, pre = [K], []
    for layer, w in enumerate(W):
        pre.append(acts[-1] @ w)  # (B, H, n, out)
        if layer < len(W) - 1:
            acts.append(F.gelu(pre[-1]))
    z = pre[-1]  # (B, H, n, d)
    mean = z.mean(-1, keepdim=True)
    sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + _LN_EPS)  # (B, H, n, 1)
    normed = (z - mean) / sigma
    residual = 2 * (K + normed - V)  # (B, H, n, d): ∂ℓ/∂pred
    g = (residual - residual.mean(-1, keepdim=True) - normed * (residual * normed).mean(-1, keepdim=True)) / sigma
    grads = [g]
    for layer in range(len(W) - 2, -1, -1):
        grads.insert(0, (grads[0] @ W[layer + 1].transpose(-1, -2)) * _gelu_derivative(pre[layer]))  # (B, H, n, in)
    return acts, grads


def _sub_outer_(base, at, rows):
    """``base −= at @ rows`` in place (base is a fresh temporary): (B, H, in, out), (B, H, in, b), (B, H, b, out).

    In place, so the full-size (in, out) result is neither allocated nor copied from ``base`` first."""
    base.view(-1, *base.shape[-2:]).baddbmm_(at.reshape(-1, *at.shape[-2:]), rows.reshape(-1, *rows.shape[-2:]),
                                              alpha=-1)
    return base


def _chunk_readout(Qn, W, S, acts, grads, gammas, beta, f):
    """Read every token with its own weights W^ℓ_i = β_iW^ℓ + f_iS^ℓ − Σ_s Γ^ℓ_{i,s} a^ℓ_sᵀ g^ℓ_s, without forming them."""
    r = Qn
    for layer, (w, s, a, g, gamma) in enumerate(zip(W, S, acts, grads, gammas)):
        z = beta * (r @ w) + f * (r @ s) - ((r @ a.transpose(-1, -2)) * gamma) @ g  # (B, H, n, out)
        r = F.gelu(z) if layer < len(W) - 1 else z
    return Qn + _layer_norm(r)  # (B, H, n, d)


class _UpdateBuffers:
    """Where chunk n writes its new weights and momenta. With autograd every chunk's state is kept for backward, so
    each gets fresh tensors (``None``: let the op allocate). Without it only the current state is alive, so two
    buffers per tensor alternate: a fresh full-size tensor per chunk costs about as much as the update itself."""

    def __init__(self, reuse: bool):
        self.reuse, self.slots = reuse, {}

    def pair(self, n: int, layer: int, like: torch.Tensor):
        """(W out, S out) for chunk n and memory layer ``layer``: distinct from the state chunk n reads."""
        if not self.reuse:
            return None, None
        key = (n % 2, layer)
        if key not in self.slots:
            self.slots[key] = (torch.empty_like(like), torch.empty_like(like))
        return self.slots[key]


def _titans_mlp_memory_torch(q, k, v, alpha, eta, theta, weights, chunk_size, initial_state):
    out_dtype = v.dtype
    q, k, v, gates, W, S, pending = _start(q, k, v, alpha, eta, theta, weights, initial_state)
    dtype = gates.dtype
    total = k.shape[1]
    L = len(W)
    if total == 0:
        return _finish(q.new_zeros(q.shape, dtype=dtype), k, v, gates, pending, chunk_size, W, S, out_dtype)
    # the dense in-chunk products multiply masked entries by 0 (0 · NaN = NaN): non-finite keys, values and gates enter
    # as 0, and the outputs from them on and the states after them are NaN, so they reach no earlier output; the
    # pending tokens keep their true values
    bad = non_finite_tokens(k, v, gates)  # (B, T', H)
    raw_k, raw_v, raw_gates = k, v, gates
    k, v, gates = zero_where(bad, k), zero_where(bad, v), zero_where(bad, gates)
    with torch.autocast(q.device.type, enabled=False):
        coef = _chunk_gate_coefficients(gates[..., 0], gates[..., 1], chunk_size, dtype)
        pad = coef["pad"]
        th = _to_chunks(gates[..., 2:], chunk_size, pad, dtype)  # (B, H, N, b, L)
        Q, K, V = (_to_chunks(x, chunk_size, pad, dtype) for x in (q, k, v))  # (B, H, N, b, d)
        beta, f = coef["beta"][..., None], coef["f"][..., None]  # (B, H, N, b, 1)
        ends = [coef[name][..., None, None] for name in ("beta_end", "f_end", "m_end")]  # (B, H, N, 1, 1) each
        outputs = []
        buffers = _UpdateBuffers(reuse=not torch.is_grad_enabled())
        # Unbind every per-chunk tensor once: indexing [:, :, n] inside the loop makes each chunk's backward
        # allocate (and zero) a full-size gradient buffer, which turns the backward quadratic in T.
        per_chunk = zip(Q.unbind(2), K.unbind(2), V.unbind(2), th.unbind(2), coef["G"].unbind(2), beta.unbind(2),
                        f.unbind(2), *(x.unbind(2) for x in ends), coef["G_end"].unbind(2), coef["B_end"].unbind(2))
        for n, (Q_n, K_n, V_n, th_n, G_n, beta_n, f_n, beta_end, f_end, m_end, G_end_n, B_end_n) in enumerate(per_chunk):
            acts, grads = _chunk_store_pass(K_n, V_n, W)
            thetas = [th_n[..., layer] for layer in range(L)]  # (B, H, b) each
            gammas = [G_n * t[..., None, :] for t in thetas]  # (B, H, b, b) each
            outputs.append(_chunk_readout(Q_n, W, S, acts, grads, gammas, beta_n, f_n))
            if (n + 1) * chunk_size <= total:  # a complete chunk: advance the boundary state
                new_W, new_S = [], []
                for layer, (w, s, a, g, t) in enumerate(zip(W, S, acts, grads, thetas)):
                    at = a.transpose(-1, -2)  # (B, H, in, b)
                    c = (G_end_n * t)[..., None]  # (B, H, b, 1)
                    e = (B_end_n * t)[..., None]  # (B, H, b, 1)
                    # fused, in-place forms on fresh temporaries: each full-size (in, out) pass costs as much as
                    # the matmuls at this chunk size
                    W_out, S_out = buffers.pair(n, layer, w)
                    new_W.append(_sub_outer_(torch.mul(w, beta_end, out=W_out).addcmul_(s, f_end), at, c * g))
                    new_S.append(_sub_outer_(torch.mul(s, m_end, out=S_out), at, e * g))
                W, S = tuple(new_W), tuple(new_S)
        o = rearrange(torch.stack(outputs, dim=2), "b h n c d -> b (n c) h d")[:, :total]  # (B, T', H, d)
    ever = bad[:, :(total // chunk_size) * chunk_size].any(1)[..., None, None]  # (B, H, 1, 1): in a completed chunk
    W, S = (tuple(t.masked_fill(ever, float("nan")) for t in state) for state in (W, S))
    return _finish(nan_from(bad, o), raw_k, raw_v, raw_gates, pending, chunk_size, W, S, out_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Triton path: none; the deep memory runs on the torch path on every device (backend="triton" says so)
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# 4. Public op
# ---------------------------------------------------------------------------------------------------------------------

def _validate(q, k, v, alpha, eta, theta, weights, chunk_size, initial_state, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend."""
    check_shape(_OP, "q", q, (None, None, None, None), " (B, T, H, d)")
    B, T, H, d = q.shape
    check_shape(_OP, "k", k, (B, T, H, d), " (the shape of q)")
    check_shape(_OP, "v", v, (B, T, H, d), " (the shape of q: the memory has a residual)")
    if not isinstance(weights, (tuple, list)) or len(weights) < 2:
        raise ValueError(f"{_OP}: weights must be a list of L >= 2 tensors [(H, d, E), ..., (H, E, d)]; "
                         f"use titans_linear_memory for L = 1")
    L = len(weights)
    check_shape(_OP, "weights[0]", weights[0], (H, d, None), " (H, d, E)")
    E = weights[0].shape[-1]
    for layer in range(1, L - 1):
        check_shape(_OP, f"weights[{layer}]", weights[layer], (H, E, E), " (H, E, E)")
    check_shape(_OP, f"weights[{L - 1}]", weights[-1], (H, E, d), " (H, E, d)")
    for name, gate in (("alpha", alpha), ("eta", eta)):
        check_shape(_OP, name, gate, (B, T, H), " (B, T, H)")
    check_shape(_OP, "theta", theta, (B, T, H, L), " (B, T, H, L): one learning rate per memory layer")
    check_chunk_size(_OP, chunk_size)
    named = dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta)
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    if initial_state is not None:
        if not isinstance(initial_state, MLPMemoryState):
            raise TypeError(f"{_OP}: initial_state must be an MLPMemoryState or None, got "
                            f"{type(initial_state).__name__}")
        if len(initial_state.weights) != L or len(initial_state.momentum) != L:
            raise ValueError(f"{_OP}: initial_state holds {len(initial_state.weights)} weights and "
                             f"{len(initial_state.momentum)} momenta, expected {L} (one per memory layer)")
        for layer, w in enumerate(weights):
            for field in ("weights", "momentum"):
                check_shape(_OP, f"initial_state.{field}[{layer}]", getattr(initial_state, field)[layer],
                            (B, *w.shape), " (B, H, in, out)")
        p = initial_state.pending_k.shape[1] if initial_state.pending_k.dim() == 4 else -1
        if not 0 <= p < chunk_size:
            raise ValueError(f"{_OP}: initial_state.pending_k must be (B, p, H, d) with p < chunk_size={chunk_size}, "
                             f"got shape {tuple(initial_state.pending_k.shape)}")
        check_shape(_OP, "initial_state.pending_k", initial_state.pending_k, (B, p, H, d), " (B, p, H, d)")
        check_shape(_OP, "initial_state.pending_v", initial_state.pending_v, (B, p, H, d), " (B, p, H, d)")
        check_shape(_OP, "initial_state.pending_gates", initial_state.pending_gates, (B, p, H, 2 + L),
                    " (B, p, H, 2 + L)")
    check_values(_OP, named, alpha, eta, theta)
    if backend == "triton":
        raise ValueError(f"{_OP}: there is no Triton path for the deep memory; use backend='torch' or 'reference'")
    return resolve_backend(backend, q, _OP, triton_path=False)


def titans_mlp_memory(q, k, v, alpha, eta, theta, weights, chunk_size: int = 16, initial_state=None, *,
                      backend: str = "auto"):
    """Titans neural long-term memory with a deep MLP memory (L ≥ 2 layers), trained online by chunked GD.

    Args:
        q, k, v: (B, T, H, d) queries, keys and values (no normalisation or activation is applied inside the op).
        alpha: (B, T, H) forget gate α_t ∈ [0, 1]; eta: (B, T, H) momentum gate η_t ∈ [0, 1].
        theta: (B, T, H, L) learning rates θ^ℓ_t ≥ 0, one per memory layer.
        weights: the per-head initial fast weights M_0 = [W^1 (H, d, E), W^2..W^{L−1} (H, E, E), W^L (H, E, d)],
            used when ``initial_state`` is None (then the momentum starts at 0). Gradients flow into them.
        chunk_size: b ≥ 1; every gradient of a chunk is taken at its start weights; chunks align to the sequence start.
        initial_state: an :class:`MLPMemoryState` returned by a previous call, or None for a fresh sequence.
        backend: "auto" or "torch" (chunk dual form), or "reference" (token loop). There is no Triton path.

    Returns:
        o: (B, T, H, d) in v's dtype, y_t = M_{W_t}(q_t), read after absorbing token t.
        state: :class:`MLPMemoryState` (weights and momenta at the last completed chunk boundary, plus the pending
            tokens). Calling on x[:, :t] and then on x[:, t:] with that state equals one call, for every t.

    Per token t of a chunk with start weights W_c (docs/titans.md#deep-memory): u_t = ∇_W ‖M_W(k_t) − v_t‖² at W_c,
    S_t = η_t S_{t−1} − θ_t u_t (θ^ℓ for layer ℓ), W_t = (1 − α_t) W_{t−1} + S_t.

    Example:
        >>> import torch
        >>> from zoo.kernels.titans_mlp_memory import titans_mlp_memory
        >>> B, T, H, d, E = 2, 20, 2, 8, 32
        >>> q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, d), dim=-1)
        >>> v = torch.randn(B, T, H, d)
        >>> alpha, eta = torch.rand(2, B, T, H)
        >>> theta = 0.1 * torch.rand(B, T, H, 2)
        >>> weights = [0.1 * torch.randn(H, d, E), 0.1 * torch.randn(H, E, d)]
        >>> o, state = titans_mlp_memory(q[:, :7], k[:, :7], v[:, :7], alpha[:, :7], eta[:, :7], theta[:, :7], weights)
        >>> o2, state = titans_mlp_memory(q[:, 7:], k[:, 7:], v[:, 7:], alpha[:, 7:], eta[:, 7:], theta[:, 7:],
        ...                               weights, initial_state=state)
        >>> o2.shape, state.pending_k.shape
        (torch.Size([2, 13, 2, 8]), torch.Size([2, 4, 2, 8]))
    """
    resolved = _validate(q, k, v, alpha, eta, theta, weights, chunk_size, initial_state, backend)
    if q.shape[1] == 1 and resolved != "reference":  # decoding: the one-token step
        o, state = mlp_memory_step(q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], eta[:, 0], theta[:, 0], weights,
                                   chunk_size, initial_state)
        return o[:, None], state
    if resolved == "reference":
        return titans_mlp_memory_reference(q, k, v, alpha, eta, theta, weights, chunk_size, initial_state)
    return _titans_mlp_memory_torch(q, k, v, alpha, eta, theta, weights, chunk_size, initial_state)


# ---------------------------------------------------------------------------------------------------------------------
# 5. One-token step (decoding): the token's chunk, read at its boundary weights
# ---------------------------------------------------------------------------------------------------------------------

def mlp_memory_step(q, k, v, alpha, eta, theta, weights, chunk_size: int, state):
    """One token (q, k, v (B, H, d), alpha, eta (B, H), theta (B, H, L)) after ``state`` (None: ``weights``, zero
    momentum): (o (B, H, d), MLPMemoryState). No validation; autograd flows through it.

    The token is the last of its chunk's n = p + 1 tokens: their store pass at the boundary weights and the dual-form
    read-out of that one row (``_chunk_readout`` with the last row of the gate coefficients); when the chunk
    completes, the boundary state moves to its end as in the chunked path. Cost O(n·|W|) for n ≤ chunk_size.
    """
    out_dtype = v.dtype
    q, k, v, gates, W, S, _ = _start(q[:, None], k[:, None], v[:, None], alpha[:, None], eta[:, None],
                                     theta[:, None], weights, state)  # (B, n, H, ·), pending tokens first
    dtype = gates.dtype
    n = k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        coef = _chunk_gate_coefficients(gates[..., 0], gates[..., 1], n, dtype)  # one chunk of n tokens
        th = rearrange(gates[..., 2:], "b n h l -> b h n l")  # (B, H, n, L)
        K_c, V_c = (rearrange(x.to(dtype), "b n h d -> b h n d") for x in (k, v))  # (B, H, n, d)
        acts, grads = _chunk_store_pass(K_c, V_c, W)
        thetas = th.unbind(-1)  # L × (B, H, n)
        last_row = coef["G_end"][:, :, 0, None, :]  # (B, H, 1, n)
        gammas = [last_row * t[:, :, None, :] for t in thetas]  # (B, H, 1, n) each
        q_last = rearrange(q[:, -1:].to(dtype), "b n h d -> b h n d")  # (B, H, 1, d)
        o = _chunk_readout(q_last, W, S, acts, grads, gammas, coef["beta_end"][:, :, 0, None, None],
                           coef["f_end"][:, :, 0, None, None])[:, :, 0].to(out_dtype)  # (B, H, d)
        if n < chunk_size:
            return o, MLPMemoryState(W, S, k, v, gates)
        beta_end, f_end, m_end = (coef[name][:, :, 0, None, None] for name in ("beta_end", "f_end", "m_end"))
        new_W, new_S = [], []
        for w, s, a, g, t in zip(W, S, acts, grads, thetas):
            at = a.transpose(-1, -2)  # (B, H, in, n)
            c = (coef["G_end"][:, :, 0] * t)[..., None]  # (B, H, n, 1)
            e = (coef["B_end"][:, :, 0] * t)[..., None]
            new_W.append(beta_end * w + f_end * s - at @ (c * g))
            new_S.append(m_end * s - at @ (e * g))
    return o, MLPMemoryState(tuple(new_W), tuple(new_S), k[:, n:], v[:, n:], gates[:, n:])


def titans_mlp_memory_step(q, k, v, alpha, eta, theta, weights, chunk_size: int = 16, state=None, *,
                           backend: str = "auto"):
    """One token of :func:`titans_mlp_memory` from the state it returned: ``(o, new_state)`` (decoding).

    Args:
        q, k, v: (B, H, d), the token (no time axis); alpha, eta: (B, H); theta: (B, H, L).
        weights, chunk_size: as in :func:`titans_mlp_memory` (``weights`` is read only when ``state`` is None).
        state: the :class:`MLPMemoryState` of a previous call or step with the same ``chunk_size``, or None for the
            first token of a sequence. It is not modified.
        backend: "auto" or "torch" ("reference" is refused; there is no Triton path).

    Returns:
        o: (B, H, d) in v's dtype; the new :class:`MLPMemoryState`. Each step costs at most one chunk's store pass,
        whatever the position.

    Example:
        >>> import torch
        >>> from zoo.kernels.titans_mlp_memory import titans_mlp_memory, titans_mlp_memory_step
        >>> B, T, H, d, E = 2, 20, 2, 8, 32
        >>> q, k = torch.nn.functional.normalize(torch.randn(2, B, T, H, d), dim=-1)
        >>> v = torch.randn(B, T, H, d)
        >>> alpha, eta = 0.1 * torch.rand(2, B, T, H)
        >>> theta = 0.1 * torch.rand(B, T, H, 2)
        >>> weights = [0.1 * torch.randn(H, d, E), 0.1 * torch.randn(H, E, d)]
        >>> o, _ = titans_mlp_memory(q, k, v, alpha, eta, theta, weights)
        >>> _, state = titans_mlp_memory(q[:, :19], k[:, :19], v[:, :19], alpha[:, :19], eta[:, :19],
        ...                              theta[:, :19], weights)
        >>> o_last, state = titans_mlp_memory_step(q[:, 19], k[:, 19], v[:, 19], alpha[:, 19], eta[:, 19],
        ...                                        theta[:, 19], weights, state=state)
        >>> o_last.shape, torch.allclose(o_last, o[:, 19], atol=1e-5)
        (torch.Size([2, 2, 8]), True)
    """
    for name, x, dims in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("alpha", alpha, 2), ("eta", eta, 2),
                          ("theta", theta, 3)):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            raise ValueError(f"{_OP}_step: {name} must be one token without a time axis ({dims} dims), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if backend == "reference":
        raise ValueError(f"{_OP}_step: backend must be 'auto' or 'torch', got 'reference'")
    _validate(q[:, None], k[:, None], v[:, None], alpha[:, None], eta[:, None], theta[:, None], weights, chunk_size,
              state, backend)
    return mlp_memory_step(q, k, v, alpha, eta, theta, weights, chunk_size, state)


__all__ = ["MLPMemoryState", "titans_mlp_memory", "titans_mlp_memory_reference", "titans_mlp_memory_step"]

"""Gated DeltaNet and Mixture-of-Memories mixers (arXiv 2412.06464, arXiv 2502.13685); see docs/mom.md.

``GatedDeltaNet`` is one gated-delta-rule memory: short convs on q, k, v, the recurrence of
:func:`zoo.kernels.gated_delta_rule`, a per-head RMSNorm and a SiLU output gate.

``MixtureOfMemories`` routes each token to its top-k of M such memories (plus an always-on shared memory). The routed
(token, memory) rows are stably sorted by (batch, memory, time) and run as B·M variable-length sequences through one
call of the op (varlen in eager, a dense (B·M, T) batch under torch.compile), with static shapes and no host
synchronisation in the layer:

    r = x W_r; p = softmax(r); (p̂, I) = topk(p, k); w = p̂ / Σ p̂                       (eqs. 3–4)
    memory m sees only τ_m = (t : m ∈ I_t): q^m, k^m, v^m = SiLU(conv(·|τ_m)), S^m ← gated delta rule   (eqs. 5–6)
    o_t = Σ_j w_{t,j} o^{I_{t,j}}_t + o^s_t;  y = W_O(RMSNorm(o) ⊙ SiLU(x W_G))            (eqs. 7–8)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels._common import compute_dtype, resolve_backend
from zoo.kernels.gated_delta import gated_delta_rule
from zoo.kernels.gated_delta import step_function as gated_delta_step_function
from zoo.layers.base import Mixer, cat_rows, document_bounds
from zoo.layers.conv import ShortConv, conv_documents
from zoo.layers.norm import RMSNorm

__all__ = ["GatedDeltaNet", "GDNState", "MixtureOfMemories", "MoMState", "LoadBalanceTerms", "CONV_SIZE",
           "sort_by_memory", "segment_conv", "segment_cache", "segment_delta_rule"]

CONV_SIZE = 4                # w: taps of the short convs on q, k, v (a module constant, docs/mom.md#parameters)
INIT_GAIN = 2 ** -2.5        # xavier_uniform gain of every projection (the fla parameterisation)
NORM_EPS = 1e-5


class GDNState(NamedTuple):
    """State of a ``GatedDeltaNet``: S (B, H_v, d, d_v) fp32 (fp64 for fp64 inputs); conv_q/k (B, w−1, H·d) and
    conv_v (B, w−1, H_v·d_v) pre-conv rows of the last w−1 tokens (H_v = H, d_v = d by default)."""

    S: torch.Tensor
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor


AUX_LOSS_FORMS = ("global", "layer_mean")


@dataclass(frozen=True)
class LoadBalanceTerms:
    """One MoM call's routing statistics for the official load-balancing loss, one loss over all layers
    (docs/mom.md#load-balancing-loss): counts (M,) routed slots per memory (no gradient), prob_sums (M,) Σ_t p_e over
    the call's ``tokens`` = B·T tokens, and the layer's ``scale``. Not a tuple: state checks never walk into it."""

    counts: torch.Tensor
    prob_sums: torch.Tensor
    tokens: int
    scale: float

    @staticmethod
    def pool(terms: list) -> torch.Tensor:
        """scale · M · Σ_e F_e P_e with F and P over the tokens of every term together (as if the router outputs of
        all layers and calls were concatenated, the official code's form); 0-dim."""
        tokens = sum(term.tokens for term in terms)
        counts = torch.stack([term.counts for term in terms]).sum(0)                   # (M,)
        prob_sums = torch.stack([term.prob_sums for term in terms]).sum(0)             # (M,)
        return terms[0].scale * counts.shape[0] * ((counts / tokens) * (prob_sums / tokens)).sum()


class MoMState(NamedTuple):
    """State of a ``MixtureOfMemories`` (docs/mom.md#state-across-calls), batch-first.

    - S: (B, M, H, d, d), the routed memories; S_shared: (B, H, d, d) or None without a shared memory.
    - conv_q, conv_k, conv_v: (B, M', w−1, H·d), pre-conv rows of each memory's last w−1 routed tokens; M' = M + 1
      with a shared memory (index M), else M.
    - aux_loss: in training mode, this call's load-balancing loss (0-dim, already scaled) with
      ``aux_loss_form="layer_mean"``, or its ``LoadBalanceTerms`` with ``"global"`` (pooled over the layers by
      ``zoo.layers.base.combine_aux_losses``); else None. It is an output only: a state passed back in is read for S
      and the conv caches, never for aux_loss.
    """

    S: torch.Tensor
    S_shared: torch.Tensor | None
    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    aux_loss: torch.Tensor | LoadBalanceTerms | None = None


# ------------------------------------------------------------------------------------------------------ helpers
def _xavier_(weight: torch.Tensor) -> None:
    """xavier_uniform with gain 2^-2.5 on the last two dims (each (out, in) slice of a stacked weight)."""
    fan_out, fan_in = weight.shape[-2], weight.shape[-1]
    bound = INIT_GAIN * math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


def _init_decay(A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    """A_log = log U(0, 16); dt = exp(U(log 1e-3, log 0.1)) ≥ 1e-4, dt_bias = softplus⁻¹(dt), docs/mom.md#parameters."""
    with torch.no_grad():
        A_log.copy_(torch.empty_like(A_log).uniform_(0, 16).clamp_min(1e-6).log())
        dt = torch.empty_like(dt_bias).uniform_(math.log(1e-3), math.log(0.1)).exp().clamp_min(1e-4)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def _check_heads(name: str, dim: int, heads: int, head_dim: int | None) -> int:
    if dim < 1 or heads < 1:
        raise ValueError(f"{name}: dim and heads must be positive, got dim={dim}, heads={heads}")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"{name}: dim ({dim}) must be divisible by heads ({heads}) when head_dim is null")
        head_dim = dim // heads
    if head_dim < 1:
        raise ValueError(f"{name}: head_dim must be positive, got {head_dim}")
    return head_dim


def sort_by_memory(top_index: torch.Tensor, num_memories: int):
    """Pack routed rows by (batch, memory, time) with static shapes and no host sync (docs/mom.md#routing-and-packing).

    top_index: (B, T, k) memory ids. Row n = (b·T + t)·k + j of the flattened (b, t, j) order is row ``j`` of token t.
    Returns ``order`` (N_r,) the flattened row of each packed row, ``segment`` (N_r,) its segment b·M + m
    (non-decreasing) and ``cu_seqlens`` (B·M + 1,) int64 with empty segments kept as zero-length sequences.
    The sort is stable, so rows of one segment stay in time order even when routing ties.
    """
    B, M = top_index.shape[0], num_memories
    batch_index = torch.arange(B, device=top_index.device)[:, None, None]
    segment = (batch_index * M + top_index).reshape(-1)                               # (N_r,) in (b, t, j) order
    order = torch.argsort(segment, stable=True)                                       # packed row -> (b, t, j)
    segment = segment[order]                                                          # (N_r,) non-decreasing
    lengths = torch.zeros(B * M, dtype=torch.long, device=top_index.device).scatter_add_(
        0, segment, torch.ones_like(segment))                                         # (B·M,) no bincount/unique
    return order, segment, F.pad(lengths.cumsum(0), (1, 0))                          # cu_seqlens (B·M + 1,)


class _GatedDeltaBase(Mixer):
    """Parts shared by both mixers: W_q, the q/k/v convs, A_log and dt_bias, the output norm, gate and W_O.

    Values may be wider than keys (``value_head_dim`` d_v) and come in more heads (``value_heads`` H_v, a multiple
    of H: value head j reads query/key head j // (H_v / H)); decays and write strengths are per value head
    (docs/interop.md#importing-fla-and-vim-checkpoints). ``use_gate=False`` drops W_G (y = W_O RMSNorm(o)).
    """

    _no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, dim: int, heads: int, head_dim: int, value_head_dim: int | None = None,
                 value_heads: int | None = None, use_gate: bool = True, norm_eps: float = NORM_EPS):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.value_heads = heads if value_heads is None else value_heads
        self.value_head_dim = head_dim if value_head_dim is None else value_head_dim
        if self.value_heads < heads or self.value_heads % heads or self.value_head_dim < 1:
            raise ValueError(f"{type(self).__name__}: value_heads ({self.value_heads}) must be a multiple of heads "
                             f"({heads}) and the value head width positive (got {self.value_head_dim})")
        width, value_width = heads * head_dim, self.value_heads * self.value_head_dim
        self.q_proj = nn.Linear(dim, width, bias=False)
        self.conv_q = ShortConv(width, CONV_SIZE)
        self.conv_k = ShortConv(width, CONV_SIZE)
        self.conv_v = ShortConv(value_width, CONV_SIZE)
        self.A_log = nn.Parameter(torch.empty(self.value_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.value_heads))
        self.gate_proj = nn.Linear(dim, value_width, bias=False) if use_gate else None
        self.o_norm = RMSNorm(self.value_head_dim, norm_eps)
        self.o_proj = nn.Linear(value_width, dim, bias=False)

    def _reset_common(self) -> None:
        for linear in (self.q_proj, self.gate_proj, self.o_proj):
            if linear is not None:
                _xavier_(linear.weight)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            conv.reset_parameters()
        _init_decay(self.A_log, self.dt_bias)
        self.o_norm.reset_parameters()

    def _gates(self, beta_logits: torch.Tensor, decay_logits: torch.Tensor, dtype: torch.dtype):
        """β = sigmoid(x W_b) and g = −exp(A_log)·softplus(x W_a + dt_bias) ≤ 0, both (..., H) in ``dtype``."""
        beta = torch.sigmoid(beta_logits.to(dtype))
        g = -self.A_log.to(dtype).exp() * F.softplus(decay_logits.to(dtype) + self.dt_bias.to(dtype))
        return beta, g

    def _dense_memory(self, q_raw, k_raw, v_raw, beta, g, S, cache_q, cache_k, cache_v):
        """One memory over the full sequence: convs with carried caches, SiLU, the op. Raw inputs (B, T, H·d).

        Returns o (B, T, H, d), the final S (B, H, d, d) and the new caches (B, w−1, H·d) each.
        """
        q, cache_q = self.conv_q(q_raw, cache_q)                                     # (B, T, H·d)
        k, cache_k = self.conv_k(k_raw, cache_k)
        v, cache_v = self.conv_v(v_raw, cache_v)
        q, k = (rearrange(F.silu(z), "b t (h d) -> b t h d", d=self.head_dim) for z in (q, k))
        v = rearrange(F.silu(v), "b t (h d) -> b t h d", d=self.value_head_dim)      # (B, T, H_v, d_v)
        if self.value_heads > self.heads:                                          # value head j reads q/k head j // r
            q, k = (z.repeat_interleave(self.value_heads // self.heads, dim=2) for z in (q, k))  # (B, T, H_v, d)
        o, S = gated_delta_rule(q, k, v, g, beta, initial_state=S, use_qk_l2norm=True)  # (B, T, H_v, d_v)
        return o, S, cache_q, cache_k, cache_v

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = W_O(RMSNorm(o) ⊙ SiLU(x W_G)), or W_O(RMSNorm(o)) without the gate; o (B, T, H_v, d_v) -> (B, T, D).
        The norm runs per head over d_v."""
        dtype = compute_dtype(x)
        d_v = self.value_head_dim
        normed = F.rms_norm(o.to(dtype), (d_v,), self.o_norm.weight.to(dtype), self.o_norm.eps)
        if self.gate_proj is not None:
            gate = rearrange(self.gate_proj(x), "b t (h d) -> b t h d", d=d_v)        # (B, T, H_v, d_v)
            normed = normed * F.silu(gate.to(dtype))
        return self.o_proj(rearrange(normed.to(x.dtype), "b t h d -> b t (h d)"))

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 0, self.dim)


# ---------------------------------------------------------------------------------------------- Gated DeltaNet
class GatedDeltaNet(_GatedDeltaBase):
    """Gated DeltaNet mixer (Yang et al., arXiv 2412.06464), the one-memory baseline of MoM.

    ``forward(x (B, T, D), state: GDNState | None) -> (y (B, T, D), GDNState)``; H heads of width d (keys = values).
    q, k, v = SiLU(conv(x W_{q,k,v})); β = sigmoid(x W_b); g = −exp(A_log)·softplus(x W_a + dt_bias);
    (o, S) = gated_delta_rule(q, k, v, g, β, use_qk_l2norm=True); y = W_O(RMSNorm(o) ⊙ SiLU(x W_G)).
    fla's configurations: values ``expand_v`` times as wide as keys, ``value_heads`` (grouped value heads, None = H),
    ``use_gate`` (W_G), ``norm_eps`` of the output norm (docs/interop.md#importing-fla-and-vim-checkpoints).
    """

    takes_mask, takes_cu_seqlens, State = True, True, GDNState

    def __init__(self, dim: int, heads: int = 2, head_dim: int | None = None, expand_v: float = 1.0,
                 value_heads: int | None = None, use_gate: bool = True, norm_eps: float = NORM_EPS):
        head_dim = _check_heads("GatedDeltaNet", dim, heads, head_dim)
        value_head_dim = round(head_dim * expand_v)
        if not math.isclose(value_head_dim, head_dim * expand_v) or value_head_dim < 1:
            raise ValueError(f"GatedDeltaNet: head_dim * expand_v ({head_dim} * {expand_v}) must be a positive "
                             f"integer (the value head width)")
        super().__init__(dim, heads, head_dim, value_head_dim, value_heads, use_gate, norm_eps)
        value_width = self.value_heads * value_head_dim
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_width, bias=False)
        self.b_proj = nn.Linear(dim, self.value_heads, bias=False)
        self.a_proj = nn.Linear(dim, self.value_heads, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_common()
        for linear in (self.k_proj, self.v_proj, self.b_proj, self.a_proj):
            _xavier_(linear.weight)

    def initial_state(self, x: torch.Tensor) -> GDNState:
        """Zeros for a fresh sequence of a batch like ``x``."""
        B, H_v, d, d_v = x.shape[0], self.value_heads, self.head_dim, self.value_head_dim
        cache = x.new_zeros(B, CONV_SIZE - 1, self.heads * d)
        return GDNState(x.new_zeros(B, H_v, d, d_v, dtype=compute_dtype(x)), cache, cache,
                        x.new_zeros(B, CONV_SIZE - 1, H_v * d_v))

    def state_shapes(self) -> dict:
        H, d, H_v, d_v = self.heads, self.head_dim, self.value_heads, self.value_head_dim
        cache = (CONV_SIZE - 1, H * d)
        return {"S": (H_v, d, d_v), "conv_q": cache, "conv_k": cache, "conv_v": (CONV_SIZE - 1, H_v * d_v)}

    def forward(self, x: torch.Tensor, state: GDNState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, GDNState]:
        self.check_input(x)
        if cu_seqlens is not None and mask is None:
            return self._forward_packed(x, state, cu_seqlens)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        state = self.initial_state(x) if state is None else state
        if x.shape[1] == 0:
            return self._empty_output(x), state
        if x.shape[1] == 1:                                                            # decoding
            return self._step(x, state)
        beta, g = self._gates(self.b_proj(x), self.a_proj(x), compute_dtype(x))    # (B, T, H) each
        o, *new_state = self._dense_memory(self.q_proj(x), self.k_proj(x), self.v_proj(x), beta, g, *state)
        return self._output(o, x), GDNState(*new_state)

    def _forward_packed(self, x: torch.Tensor, state: GDNState | None, cu_seqlens: torch.Tensor):
        """Packed documents x (1, T, D): the convs per document, then one ``gated_delta_rule`` call with the
        boundaries; the state has one row per document."""
        bounds = document_bounds("GatedDeltaNet", cu_seqlens, x)
        self.check_state(state, x, batch=len(bounds) - 1)
        caches = (None,) * 3 if state is None else state[1:]
        q, cache_q = conv_documents(self.conv_q, self.q_proj(x), caches[0], bounds)  # (1, T, H·d)
        k, cache_k = conv_documents(self.conv_k, self.k_proj(x), caches[1], bounds)
        v, cache_v = conv_documents(self.conv_v, self.v_proj(x), caches[2], bounds)
        q, k, v = (rearrange(F.silu(z), "b t (h d) -> b t h d", d=self.head_dim) for z in (q, k, v))
        beta, g = self._gates(self.b_proj(x), self.a_proj(x), compute_dtype(x))    # (1, T, H) each
        o, S = gated_delta_rule(q, k, v, g, beta, initial_state=None if state is None else state.S,
                                cu_seqlens=cu_seqlens, use_qk_l2norm=True)       # (1, T, H, d), (N, H, d, d)
        return self._output(o, x), GDNState(S, cache_q, cache_k, cache_v)


    def _step(self, x: torch.Tensor, state: GDNState) -> tuple[torch.Tensor, GDNState]:
        """One token x (B, 1, D): the convs' one-token updates and the op's step."""
        x_t, d = x[:, 0], self.head_dim
        beta, g = self._gates(self.b_proj(x_t), self.a_proj(x_t), compute_dtype(x))  # (B, H) each
        q, cache_q = self.conv_q.step(self.q_proj(x_t), state.conv_q)              # (B, H·d)
        k, cache_k = self.conv_k.step(self.k_proj(x_t), state.conv_k)
        v, cache_v = self.conv_v.step(self.v_proj(x_t), state.conv_v)
        q, k = (F.silu(z).unflatten(-1, (self.heads, d)) for z in (q, k))          # (B, H, d)
        v = F.silu(v).unflatten(-1, (self.value_heads, self.value_head_dim))        # (B, H_v, d_v)
        if self.value_heads > self.heads:                                          # value head j reads q/k head j // r
            q, k = (z.repeat_interleave(self.value_heads // self.heads, dim=1) for z in (q, k))  # (B, H_v, d)
        tensors = (q, k, v, g, beta, state.S)
        step = gated_delta_step_function(resolve_backend("auto", x, "GatedDeltaNet"), *tensors)
        o, S = step(*tensors, None, True)                                            # (B, H, d)
        return self._output(o[:, None], x), GDNState(S, cache_q, cache_k, cache_v)


# ------------------------------------------------------------------------------------------ Mixture-of-Memories
class MixtureOfMemories(_GatedDeltaBase):
    """Mixture-of-Memories mixer (Du et al., arXiv 2502.13685) with gated-delta-rule memories.

    ``forward(x (B, T, D), state: MoMState | None) -> (y (B, T, D), MoMState)``. Each token is written into and read
    from its top-k of ``num_memories`` memories (router weights renormalised over the k), plus the shared memory with
    weight 1. W_q, the convs, A_log and dt_bias are shared; each memory has its own W_k, W_v, W_b, W_a. In training
    mode the state's ``aux_loss`` carries the Switch-style load balance ``aux_loss_scale · M · Σ_e F_e P_e``:
    ``aux_loss_form="global"`` (default, the official code's) returns this call's ``LoadBalanceTerms`` so that F and
    P are pooled over all layers into one loss; ``"layer_mean"`` returns the layer's own loss, averaged over layers.
    ``use_gate`` and ``norm_eps`` as in ``GatedDeltaNet`` (fla's ``use_output_gate``, ``norm_eps``).
    """

    takes_mask, takes_cu_seqlens, State = True, True, MoMState

    def __init__(self, dim: int, heads: int = 2, head_dim: int | None = None, num_memories: int = 4,
                 topk: int = 2, shared_memory: bool = True, aux_loss_scale: float = 0.01,
                 aux_loss_form: str = "global", use_gate: bool = True, norm_eps: float = NORM_EPS):
        head_dim = _check_heads("MixtureOfMemories", dim, heads, head_dim)
        if num_memories < 1:
            raise ValueError(f"MixtureOfMemories: num_memories must be >= 1, got {num_memories}")
        if not 1 <= topk <= num_memories:
            raise ValueError(f"MixtureOfMemories: topk must be in [1, num_memories={num_memories}], got {topk}")
        if not aux_loss_scale >= 0 or not math.isfinite(aux_loss_scale):
            raise ValueError(f"MixtureOfMemories: aux_loss_scale must be a finite number >= 0, got {aux_loss_scale}")
        if aux_loss_form not in AUX_LOSS_FORMS:
            raise ValueError(f"MixtureOfMemories: aux_loss_form must be 'global' or 'layer_mean', got {aux_loss_form!r}")
        super().__init__(dim, heads, head_dim, use_gate=use_gate, norm_eps=norm_eps)
        self.num_memories, self.topk, self.shared_memory = num_memories, topk, bool(shared_memory)
        self.aux_loss_scale, self.aux_loss_form = float(aux_loss_scale), aux_loss_form
        width, stacked = heads * head_dim, num_memories + int(shared_memory)     # M' memories with projections
        self.router = nn.Linear(dim, num_memories, bias=False)
        # Per-memory projections, stacked along dim 0 (index M is the shared memory): (M', out, D) each.
        self.k_proj = nn.Parameter(torch.empty(stacked, width, dim))
        self.v_proj = nn.Parameter(torch.empty(stacked, width, dim))
        self.b_proj = nn.Parameter(torch.empty(stacked, heads, dim))
        self.a_proj = nn.Parameter(torch.empty(stacked, heads, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_common()
        _xavier_(self.router.weight)
        for weight in (self.k_proj, self.v_proj, self.b_proj, self.a_proj):
            _xavier_(weight)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, num_memories={self.num_memories}, "
                f"topk={self.topk}, shared_memory={self.shared_memory}, aux_loss_scale={self.aux_loss_scale}, "
                f"aux_loss_form={self.aux_loss_form!r}")

    def initial_state(self, x: torch.Tensor) -> MoMState:
        """Zeros for a fresh sequence of a batch like ``x`` (the M+1 states and their conv caches)."""
        B, M, H, d = x.shape[0], self.num_memories, self.heads, self.head_dim
        dtype = compute_dtype(x)
        cache = x.new_zeros(B, M + int(self.shared_memory), CONV_SIZE - 1, H * d)
        shared = x.new_zeros(B, H, d, d, dtype=dtype) if self.shared_memory else None
        return MoMState(x.new_zeros(B, M, H, d, d, dtype=dtype), shared, cache, cache, cache)

    # ------------------------------------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor):
        """Router probabilities p (B, T, M), the top-k memories I (B, T, k) and renormalised weights w (B, T, k)."""
        dtype = compute_dtype(x)
        probs = F.linear(x.to(dtype), self.router.weight.to(dtype)).softmax(dim=-1)   # (B, T, M)
        top_probs, top_index = probs.topk(self.topk, dim=-1)                          # (B, T, k) each
        return probs, top_index, top_probs / top_probs.sum(dim=-1, keepdim=True)

    def load_balance_terms(self, probs: torch.Tensor, top_index: torch.Tensor) -> LoadBalanceTerms:
        """The routing statistics of probs (B, T, M) and top_index (B, T, k), at this layer's scale."""
        B, T, M = probs.shape
        counts = probs.new_zeros(B, M).scatter_add_(1, top_index.reshape(B, -1),
                                                    probs.new_ones(B, T * self.topk))  # (B, M)
        return LoadBalanceTerms(counts.sum(0), probs.sum(dim=(0, 1)), B * T, self.aux_loss_scale)

    def load_balance_loss(self, probs: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
        """L_aux = M · Σ_e F_e P_e (unscaled): F_e the fraction of tokens routed to e (no gradient), P_e the mean p_e."""
        terms = self.load_balance_terms(probs, top_index)
        return terms.counts.shape[0] * ((terms.counts / terms.tokens) * (terms.prob_sums / terms.tokens)).sum()

    # ------------------------------------------------------------------------------------------------ forward
    def state_shapes(self) -> dict:
        M, H, d = self.num_memories, self.heads, self.head_dim
        cache = (M + int(self.shared_memory), CONV_SIZE - 1, H * d)  # (M', w−1, H·d)
        shared = {"S_shared": (H, d, d)} if self.shared_memory else {}
        return {"S": (M, H, d, d), "conv_q": cache, "conv_k": cache, "conv_v": cache, **shared}

    def stack_states(self, states: list[MoMState]) -> MoMState:
        """The rows of ``states`` in one state; aux_loss: the routing statistics of every group or document summed
        (``global``: as if they had run as one call), or the mean of their losses (``layer_mean``)."""
        losses = [state.aux_loss for state in states if state.aux_loss is not None]
        stacked = cat_rows("MixtureOfMemories", [state._replace(aux_loss=None) for state in states])
        if not losses:
            return stacked
        if isinstance(losses[0], LoadBalanceTerms):
            return stacked._replace(aux_loss=LoadBalanceTerms(
                torch.stack([t.counts for t in losses]).sum(0), torch.stack([t.prob_sums for t in losses]).sum(0),
                sum(t.tokens for t in losses), losses[0].scale))
        return stacked._replace(aux_loss=torch.stack(losses).mean())

    def forward(self, x: torch.Tensor, state: MoMState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MoMState]:
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        state = self.initial_state(x) if state is None else state
        B, T, _ = x.shape
        if T == 0:
            return self._empty_output(x), state._replace(aux_loss=None)
        M, H, width = self.num_memories, self.heads, self.heads * self.head_dim
        probs, top_index, weights = self.route(x)                                      # (B, T, M), (B, T, k) ×2
        q_raw = self.q_proj(x)                                                         # (B, T, H·d)
        # Dense per-memory projections, one matmul of stacked weights (docs/mom.md#routing-and-packing).
        stacked = torch.cat([self.k_proj, self.v_proj, self.b_proj, self.a_proj], dim=1).to(x.dtype)  # (M', O, D)
        projected = F.linear(x, stacked.flatten(0, 1)).unflatten(-1, stacked.shape[:2])  # (B, T, M', O)

        aux = None
        if self.training and self.aux_loss_scale > 0 and self.aux_loss_form == "global":
            aux = self.load_balance_terms(probs, top_index)
        elif self.training and self.aux_loss_scale > 0:
            aux = self.aux_loss_scale * self.load_balance_loss(probs, top_index)
        if T == 1:                                                                     # decoding: k + 1 updates
            o, S, S_shared, caches = self._step(x, q_raw, projected, top_index, weights, state)
            return self._output(o, x), MoMState(S, S_shared, *caches, aux_loss=aux)
        o, S, caches = self._routed(x, q_raw, projected, top_index, weights, state)    # (B, T, H, d)
        S_shared = None
        if self.shared_memory:
            k_raw, v_raw, beta_logits, decay_logits = projected[:, :, M].split([width, width, H, H], dim=-1)
            beta, g = self._gates(beta_logits, decay_logits, compute_dtype(x))        # (B, T, H) each
            o_shared, S_shared, *shared_caches = self._dense_memory(
                q_raw, k_raw, v_raw, beta, g, state.S_shared,
                state.conv_q[:, M], state.conv_k[:, M], state.conv_v[:, M])
            o = o + o_shared
            caches = [torch.cat([c, s[:, None]], dim=1) for c, s in zip(caches, shared_caches)]
        return self._output(o, x), MoMState(S, S_shared, *caches, aux_loss=aux)

    def _routed(self, x, q_raw, projected, top_index, weights, state: MoMState):
        """The routed memories as B·M packed segments: sort, segment-aware conv, one op call, weighted gather.

        q_raw (B, T, H·d); projected (B, T, M', 2·H·d + 2·H). Returns o (B, T, H, d) = Σ_j w_j o^{I_j}, the final
        S (B, M, H, d, d) and the new pre-conv caches (B, M, w−1, H·d) ×3.
        """
        B, T, k = top_index.shape
        M, H, d, w = self.num_memories, self.heads, self.head_dim, CONV_SIZE
        stacked, width, device = projected.shape[2], H * d, x.device
        segments, rows = B * M, B * T * k
        # 1. Stable sort of the (b, t, j) rows by segment b·M + m: time order inside each segment survives.
        order, segment, cu_seqlens = sort_by_memory(top_index, M)
        token = order // k                                                            # (N_r,) b·T + t
        source = token * stacked + top_index.reshape(-1)[order]                       # (N_r,) into (B·T·M')
        # 2. Gather the rows: q̃ from its token; k̃, ṽ and the gate logits from the token's row for that memory.
        picked = projected.reshape(B * T * stacked, -1).index_select(0, source)      # (N_r, O)
        k_raw, v_raw, beta_logits, decay_logits = picked.split([width, width, H, H], dim=-1)
        beta, g = self._gates(beta_logits, decay_logits, compute_dtype(x))           # (N_r, H) each
        raw = torch.cat([q_raw.reshape(B * T, width).index_select(0, token), k_raw, v_raw], dim=-1)  # (N_r, 3Hd)
        # 3. Segment-aware short conv (docs/mom.md#segment-aware-short-conv) and the new caches.
        cache = torch.cat([state.conv_q[:, :M], state.conv_k[:, :M], state.conv_v[:, :M]], dim=-1)
        cache = cache.reshape(segments, w - 1, 3 * width).to(raw.dtype)              # (B·M, w−1, 3·H·d)
        conv_weight = torch.cat([self.conv_q.weight, self.conv_k.weight, self.conv_v.weight]).to(raw.dtype)
        mixed = segment_conv(raw, cache, cu_seqlens, conv_weight)                     # (N_r, 3·H·d)
        new_cache = segment_cache(raw, cache, cu_seqlens)                             # (B·M, w−1, 3·H·d)
        q, k_, v = (rearrange(F.silu(z), "n (h d) -> n h d", d=d) for z in mixed.split(width, dim=-1))
        # 4. The op over the B·M segments: one varlen call, or one dense call while torch.compile traces.
        o_packed, S = segment_delta_rule(q, k_, v, g, beta, state.S.reshape(segments, H, d, d), segment, cu_seqlens,
                                         T, dense=torch.compiler.is_compiling())     # (N_r, H, d)
        # 5. Back to (b, t, j) order through the inverse permutation, then weight and sum over j.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=device))
        o_rows = o_packed.index_select(0, inverse).reshape(B, T, k, H, d)
        o = torch.einsum("btj,btjhd->bthd", weights.to(o_rows.dtype), o_rows)         # (B, T, H, d)
        caches = [c.reshape(B, M, w - 1, width) for c in new_cache.split(width, dim=-1)]
        return o, S.reshape(B, M, H, d, d), caches


    def _step(self, x, q_raw, projected, top_index, weights, state: MoMState):
        """One token (T = 1) with the M+1 states: gather the k selected memories (and the shared one)
        along the memory axis, push the token into their conv caches, one gated-delta update each, scatter back.
        Unselected memories keep their state and caches. Returns o (B, 1, H, d), S, S_shared and the caches."""
        B, M, H, d, w = x.shape[0], self.num_memories, self.heads, self.head_dim, CONV_SIZE
        width, dtype = H * d, compute_dtype(x)
        index, mix = top_index[:, 0], weights[:, 0]                                   # (B, k) each
        S_all, cache = state.S, torch.cat([state.conv_q, state.conv_k, state.conv_v], dim=-1)  # (B, M', w−1, 3Hd)
        if self.shared_memory:
            index = torch.cat([index, index.new_full((B, 1), M)], dim=1)              # (B, k'), k' = k + 1
            mix = torch.cat([mix, mix.new_ones(B, 1)], dim=1)
            S_all = torch.cat([S_all, state.S_shared[:, None]], dim=1)                # (B, M', H, d, d)
        selected = index.shape[1]
        picked = projected[:, 0].gather(1, index[..., None].expand(-1, -1, projected.shape[-1]))  # (B, k', O)
        k_raw, v_raw, beta_logits, decay_logits = picked.split([width, width, H, H], dim=-1)
        beta, g = self._gates(beta_logits, decay_logits, dtype)                       # (B, k', H) each
        raw = torch.cat([q_raw.expand(B, selected, width), k_raw, v_raw], dim=-1)     # (B, k', 3·H·d)
        cache_index = index[..., None, None].expand(-1, -1, w - 1, 3 * width)
        window = torch.cat([cache.gather(1, cache_index).to(raw.dtype), raw[:, :, None]], dim=2)  # (B, k', w, 3Hd)
        conv_weight = torch.cat([self.conv_q.weight, self.conv_k.weight, self.conv_v.weight]).to(raw.dtype)
        mixed = F.silu((window * conv_weight.T).sum(2)).to(dtype)                     # (B, k', 3·H·d)
        q, k, v = (rearrange(z, "b j (h d) -> (b j) h d", d=d) for z in mixed.split(width, dim=-1))
        state_index = index[..., None, None, None].expand(-1, -1, H, d, d)
        tensors = (q, k, v, g.flatten(0, 1), beta.flatten(0, 1), S_all.gather(1, state_index).flatten(0, 1))
        step = gated_delta_step_function(resolve_backend("auto", x, "MixtureOfMemories"), *tensors)
        o, memory = step(*tensors, None, True)                                        # (B·k', H, d), (B·k', H, d, d)
        memory = memory.unflatten(0, (B, selected))                                   # (B, k', H, d, d)
        o = torch.einsum("bj,bjhv->bhv", mix.to(dtype), o.unflatten(0, (B, selected)))[:, None].to(x.dtype)
        S_all = S_all.scatter(1, state_index, memory.to(S_all.dtype))
        cache = cache.scatter(1, cache_index, window[:, :, 1:].to(cache.dtype))
        S, S_shared = (S_all[:, :M], S_all[:, M]) if self.shared_memory else (S_all, None)
        return o, S, S_shared, list(cache.split(width, dim=-1))


# ------------------------------------------------------------------------------------- segment-aware short conv
def segment_conv(rows: torch.Tensor, cache: torch.Tensor, cu_seqlens: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over packed segments, each continuing its own cache (docs/mom.md#segment-aware-short-conv).

    rows (N, C) packed segment after segment; cache (S, w−1, C) the pre-conv rows before each segment; cu_seqlens
    (S + 1,); weight (C, w), the last tap multiplies the row itself. Tap j of the row at offset r of its segment reads
    row r − j of the same segment, or the segment's cache when r − j < 0. Static shapes, no host sync: the conv runs
    over the whole packed stream as shifted sums, then the first w−1 rows of every segment are recomputed from its
    cache and written back (rows past a short segment's end go to a discarded extra row).
    """
    N, C = rows.shape
    S, w = cache.shape[0], weight.shape[1]
    padded = torch.cat([rows.new_zeros(w - 1, C), rows])                              # (w−1+N, C)
    out = sum(padded[j:j + N] * weight[:, j] for j in range(w))                       # (N, C), ignores boundaries
    if w == 1:
        return out
    offsets = torch.arange(w - 1, device=rows.device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]                                        # (S,)
    head = cu_seqlens[:-1, None] + offsets                                            # (S, w−1) first rows
    inside = offsets < lengths[:, None]                                               # (S, w−1)
    head_rows = torch.cat([rows, rows.new_zeros(1, C)]).index_select(
        0, torch.where(inside, head, N).flatten()).reshape(S, w - 1, C)
    window = torch.cat([cache, head_rows], dim=1)                                     # (S, 2(w−1), C)
    fixed = sum(window[:, j:j + w - 1] * weight[:, j] for j in range(w))              # (S, w−1, C)
    target = torch.where(inside, head, N).flatten()                                   # (S·(w−1),) N = discard
    out = torch.cat([out, out.new_zeros(1, C)]).index_put((target,), fixed.reshape(-1, C))
    return out[:N]


def segment_cache(rows: torch.Tensor, cache: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The last w−1 pre-conv rows of every segment after it ran: (S, w−1, C), reaching into the old cache
    (S, w−1, C) for segments shorter than w−1."""
    N, C = rows.shape
    S, taps = cache.shape[0], cache.shape[1]
    offsets = torch.arange(taps, device=rows.device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]                                        # (S,)
    from_rows = (offsets + lengths[:, None]) >= taps                                  # (S, w−1)
    row_index = (cu_seqlens[1:, None] - taps + offsets).clamp_min(0)                  # (S, w−1)
    taken = torch.cat([rows, rows.new_zeros(1, C)]).index_select(0, row_index.flatten())   # (S·(w−1), C)
    cache_index = (offsets + lengths[:, None]).clamp_max(taps - 1)                    # (S, w−1)
    kept = torch.gather(cache, 1, cache_index[..., None].expand(S, taps, C))          # (S, w−1, C)
    return torch.where(from_rows[..., None], taken.reshape(S, taps, C), kept)


# ------------------------------------------------------------------------------------- gated delta rule per segment
def segment_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       initial_state: torch.Tensor, segment: torch.Tensor, cu_seqlens: torch.Tensor, length: int, *,
                       dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule (ℓ2-normalised q, k) over packed segments (docs/mom.md#routing-and-packing).

    q, k, v (N, H, d) and g, beta (N, H): rows packed segment after segment; initial_state (S, H, d, d); segment (N,)
    the non-decreasing segment of each row; cu_seqlens (S + 1,); ``length`` bounds every segment's row count. Returns
    o (N, H, d) in packed order and the final states (S, H, d, d).

    ``dense=False``: one varlen call of the op, whose torch path reads ``cu_seqlens`` on the host (eager only).
    ``dense=True``: static shapes and no host read, for torch.compile. Row r of segment s goes to slot
    s·length + (r − cu_seqlens[s]) of a dense (S, length) batch; the empty slots after a segment's rows have
    q = k = v = 0 and β = g = 0, where the update is exactly the identity, so each final state is the state after its
    segment's last row. Its chunks start at the same rows as the varlen call's, so the two agree to rounding; but it
    runs S·length slots for N rows (M/k times as many under balanced routing), so eager keeps the varlen call.
    """
    if not dense:
        o, final = gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], initial_state=initial_state,
                                    cu_seqlens=cu_seqlens, use_qk_l2norm=True)      # (1, N, H, d)
        return o[0], final
    S, N = initial_state.shape[0], q.shape[0]
    slot = segment * length + torch.arange(N, device=q.device) - cu_seqlens[segment]  # (N,) into (S·length)
    batched = [z.new_zeros(S * length, *z.shape[1:]).index_copy(0, slot, z).unflatten(0, (S, length))
               for z in (q, k, v, g, beta)]                                           # (S, length, H[, d]) each
    o, final = gated_delta_rule(*batched, initial_state=initial_state, use_qk_l2norm=True)  # (S, length, H, d)
    return o.flatten(0, 1).index_select(0, slot), final

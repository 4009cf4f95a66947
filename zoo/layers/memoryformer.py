"""MemoryFormer layers (Ding et al., NeurIPS 2024, arXiv 2411.12992): every fully-connected projection replaced by a
Memory Layer, a hash lookup into learned tables (``zoo.kernels.hash_lookup``).

- ``MemoryLinear(in_dim, out_dim, tau)``: y = Σ_k s_k · tables[k, code_k] + bias, K = in_dim / τ tables of 2^τ rows.
- ``MemoryFFN(dim, tau)``: expand to K(τ+2) with τ-bit hashing, LayerNorm, contract with (τ+2)-bit hashing; no
  activation (hashing is the non-linearity).
- ``MemoryAttention(dim, heads, tau)``: one hash shared by Q, K and V (one fused lookup into (K, 2^τ, 3·dim)
  tables), partial RoPE, causal softmax attention with a KV cache, no output projection.

A block is ``x + MemoryAttention(RMSNorm(x))`` then ``x + MemoryFFN(RMSNorm(x))`` (pattern entry ``memoryformer``).
See docs/memoryformer.md#layers.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from zoo.kernels.hash_lookup import MAX_TAU, SCORES, hash_codes, hash_lookup
from zoo.layers.attention import AttentionState, nan_safe_attention, stack_kv_caches
from zoo.layers.base import Mixer
from zoo.layers.rotary import RotaryEmbedding

__all__ = ["MemoryLinear", "MemoryFFN", "MemoryAttention", "bucket_usage"]

TABLE_STD = 0.02  # MemoryLinear / MemoryFFN tables: N(0, 0.02²)
BIAS_STD = 0.001  # every bias: 0.001 · N(0, 1)


def _check_tau(owner: str, name: str, tau: int) -> None:
    if isinstance(tau, bool) or not isinstance(tau, int) or not 1 <= tau <= MAX_TAU:
        raise ValueError(f"{owner}: {name} must be an int in [1, {MAX_TAU}], got {tau!r}")


def _check_divisible(owner: str, name: str, size: int, tau: int) -> None:
    if size <= 0 or size % tau:
        raise ValueError(f"{owner}: input dims not divisible by tau: {name}={size} is not a positive multiple of "
                         f"tau={tau} (the input is cut into chunks of tau values)")


def _check_score(owner: str, score: str, temperature: float, table_weight_decay: float) -> None:
    if score not in SCORES:
        raise ValueError(f"{owner}: score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {temperature!r}; 1 is the paper's "
                         f"plain softmax over the buckets")
    if isinstance(table_weight_decay, bool) or not isinstance(table_weight_decay, (int, float)) \
            or not 0 <= table_weight_decay < math.inf:
        raise ValueError(f"{owner}: table_weight_decay must be a finite number >= 0, got {table_weight_decay!r}; "
                         f"0.1 is the released recipe's, 0 never decays the tables")


class MemoryLinear(nn.Module):
    """Memory Layer: a (in_dim → out_dim) projection by hashing, ``y = Σ_k s_k · tables[k, code_k] + bias``.

    ``forward(x (..., in_dim)) -> (..., out_dim)``. K = in_dim / τ chunks; each chunk's sign pattern picks one of
    2^τ rows of its table and s_k = ‖z_k‖₁·p_k (``score="l1prob"``, the released code's, default) or p_k (``"prob"``,
    the paper's) weights it, p_k = Π σ(2|z_k|/t) at ``temperature`` t.
    Parameters: ``tables`` (K, 2^τ, out_dim) and ``bias`` (out_dim,): K·2^τ·out_dim + out_dim in all, about 2^τ/τ
    times a dense layer; a forward costs about 2·K·out_dim FLOPs per token, τ times fewer than 2·in_dim·out_dim.
    Put a norm in front: the bucket distribution (and in ``l1prob`` the output scale) follows the input norm.
    The tables are decayed at ``table_weight_decay`` (the released recipe's 0.1; 0 excludes them), whatever
    ``optim.weight_decay`` is (docs/memoryformer.md#dead-buckets).
    """

    def __init__(self, in_dim: int, out_dim: int, tau: int = 8, *, score: str = "l1prob", temperature: float = 1.0,
                 table_weight_decay: float = 0.1, bias: bool = True):
        super().__init__()
        _check_tau("MemoryLinear", "tau", tau)
        _check_divisible("MemoryLinear", "in_dim", in_dim, tau)
        _check_score("MemoryLinear", score, temperature, table_weight_decay)
        if out_dim <= 0:
            raise ValueError(f"MemoryLinear: out_dim must be positive, got {out_dim}")
        self.in_dim, self.out_dim, self.tau, self.score = in_dim, out_dim, tau, score
        self.temperature = float(temperature)
        self.weight_decay_overrides = {"tables": float(table_weight_decay)}
        self.num_tables = in_dim // tau  # K
        self.tables = nn.Parameter(torch.empty(self.num_tables, 2 ** tau, out_dim))
        self.bias = nn.Parameter(torch.empty(out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tables, std=TABLE_STD)
        if self.bias is not None:
            nn.init.normal_(self.bias, std=BIAS_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"MemoryLinear: x has {x.shape[-1]} features, expected in_dim={self.in_dim}")
        return hash_lookup(x, self.tables, self.tau, self.bias, score=self.score, temperature=self.temperature)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, tau={self.tau}, tables={self.num_tables}, "
                f"score={self.score!r}, temperature={self.temperature}, bias={self.bias is not None}")


class MemoryFFN(nn.Module):
    """MemoryFormer's channel mixer: two Memory Layers that expand then contract, with no activation.

    ``forward(x (B, T, D)) -> (B, T, D)``: h = MemoryLinear(D → K(τ+2), τ)(x); h = LayerNorm(h);
    y = MemoryLinear(K(τ+2) → D, τ+2)(h), where K = D / τ, so the contraction hashes K chunks of τ+2 bits into
    tables of 2^(τ+2) rows (the released ``extra_bit`` expansion). ``score``, ``temperature`` and
    ``table_weight_decay`` are both layers'.
    """

    def __init__(self, dim: int, tau: int = 8, *, score: str = "l1prob", temperature: float = 1.0,
                 table_weight_decay: float = 0.1):
        super().__init__()
        _check_tau("MemoryFFN", "tau", tau)
        if tau + 2 > MAX_TAU:
            raise ValueError(f"MemoryFFN: tau must be <= {MAX_TAU - 2} (the contraction hashes tau+2 bits), got {tau}")
        _check_divisible("MemoryFFN", "dim", dim, tau)
        _check_score("MemoryFFN", score, temperature, table_weight_decay)
        self.dim, self.tau = dim, tau
        hidden = (dim // tau) * (tau + 2)  # K(τ+2)
        self.hidden = hidden
        options = {"score": score, "temperature": temperature, "table_weight_decay": table_weight_decay}
        self.expand = MemoryLinear(dim, hidden, tau, **options)
        self.norm = nn.LayerNorm(hidden, eps=1e-5)
        self.contract = MemoryLinear(hidden, dim, tau + 2, **options)

    def reset_parameters(self) -> None:
        self.expand.reset_parameters()
        self.norm.reset_parameters()
        self.contract.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x)  # (B, T, K(τ+2))
        return self.contract(self.norm(h))  # (B, T, D)


class MemoryAttention(Mixer):
    """MemoryFormer's multi-head attention: Q, K, V from one shared hash of x, no output projection.

    ``forward(x (B, T, D), state=None) -> (y (B, T, D), state)``, causal:

        qkv = Σ_k s_k · tables_qkv[k, code_k] + bias_qkv          # one hash_lookup into (K, 2^τ, 3·D) tables
        q, k, v = split(qkv) → (B, T, H, d);  RoPE on the first ⌊rotary_pct·d⌋ (even) channels of q and k
        y = softmax(q kᵀ / √d + causal mask) v, heads concatenated   # no output projection

    The state is an ``AttentionState`` KV cache (rotated keys, values, positions), so a split call and
    token-by-token decoding equal one full call; positions continue from the cache length. Sharing the hash is exact
    because Q, K and V read the same input with no projection in front. ``score``, ``temperature`` and
    ``table_weight_decay`` (of ``tables_qkv``) are as in ``MemoryLinear``.
    """

    takes_mask, takes_cu_seqlens, State = True, True, AttentionState

    def __init__(self, dim: int, heads: int, tau: int = 8, *, score: str = "l1prob", temperature: float = 1.0,
                 table_weight_decay: float = 0.1, rotary_pct: float = 0.25):
        super().__init__()
        _check_tau("MemoryAttention", "tau", tau)
        if heads <= 0 or dim % heads:
            raise ValueError(f"MemoryAttention: dim ({dim}) must be divisible by heads ({heads})")
        _check_divisible("MemoryAttention", "dim", dim, tau)
        _check_score("MemoryAttention", score, temperature, table_weight_decay)
        if not 0.0 <= rotary_pct <= 1.0:
            raise ValueError(f"MemoryAttention: rotary_pct must be in [0, 1], got {rotary_pct}")
        self.dim, self.heads, self.tau, self.score, self.rotary_pct = dim, heads, tau, score, rotary_pct
        self.temperature = float(temperature)
        self.weight_decay_overrides = {"tables_qkv": float(table_weight_decay)}
        self.head_dim = dim // heads
        self.num_tables = dim // tau  # K
        self.rotary_dims = 2 * int(rotary_pct * self.head_dim // 2)  # rounded down to even
        self.tables_qkv = nn.Parameter(torch.empty(self.num_tables, 2 ** tau, 3 * dim))
        self.bias_qkv = nn.Parameter(torch.empty(3 * dim))
        self.rotary = RotaryEmbedding(self.rotary_dims) if self.rotary_dims else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tables_qkv, std=math.sqrt(2.0 / (5.0 * self.dim)))  # "small_init"
        nn.init.normal_(self.bias_qkv, std=BIAS_STD)
        if self.rotary is not None:
            self.rotary.reset_parameters()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, tau={self.tau}, tables={self.num_tables}, "
                f"score={self.score!r}, temperature={self.temperature}, rotary_dims={self.rotary_dims}")

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q, k (rotated at ``positions`` (B, T)) and v of x (B, T, D), each (B, T, H, d), from one lookup."""
        qkv = hash_lookup(x, self.tables_qkv, self.tau, self.bias_qkv, score=self.score,
                          temperature=self.temperature)  # (B, T, 3D)
        q, k, v = (rearrange(part, "b t (h d) -> b t h d", d=self.head_dim) for part in qkv.chunk(3, dim=-1))
        if self.rotary is not None:
            r = self.rotary_dims
            q = torch.cat([self.rotary(q[..., :r], positions), q[..., r:]], dim=-1)  # (B, T, H, d)
            k = torch.cat([self.rotary(k[..., :r], positions), k[..., r:]], dim=-1)
        return q, k, v

    def state_shapes(self) -> dict:
        cache = (None, self.heads, self.head_dim)  # (T_past, H, d)
        return {"k": cache, "v": cache, "positions": (None,)}

    def stack_states(self, states: list[AttentionState]) -> AttentionState:
        return stack_kv_caches(states)

    def forward(self, x: torch.Tensor, state: AttentionState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        if state is not None and state.positions.shape[1]:
            positions = state.positions[:, -1:] + 1 + positions  # continue each row after its last cached token
        q, k, v = self.project(x, positions)
        if state is not None:
            k_all = torch.cat([state.k.to(k.dtype), k], dim=1)  # (B, T_past + T, H, d)
            v_all = torch.cat([state.v.to(v.dtype), v], dim=1)
            k_pos = torch.cat([state.positions, positions], dim=1)  # (B, T_past + T)
        else:
            k_all, v_all, k_pos = k, v, positions
        q_h, k_h, v_h = (rearrange(t, "b t h d -> b h t d") for t in (q, k_all, v_all))
        if state is None:
            out = nan_safe_attention(q_h, k_h, v_h, is_causal=True)  # (B, H, T, d)
        else:
            allowed = positions.unsqueeze(-1) >= k_pos.unsqueeze(-2)  # (B, T, T_past + T)
            allowed = allowed & (k_pos >= 0).unsqueeze(-2)  # cache pads (position -1) are never seen
            out = nan_safe_attention(q_h, k_h, v_h, allowed.unsqueeze(1))
        y = rearrange(out, "b h t d -> b t (h d)").to(x.dtype)  # (B, T, D), no output projection
        return y, AttentionState(k_all, v_all, k_pos)


@torch.no_grad()
def bucket_usage(model: nn.Module, *inputs, **kwargs) -> dict[str, float]:
    """Fraction of table rows hit, per Memory Layer of ``model``, while it runs on ``inputs`` (no gradients).

    Returns ``{module name: rows hit / (K·2^τ)}`` for every ``MemoryLinear`` and ``MemoryAttention``; rows that are
    never hit get no gradient (docs/memoryformer.md#dead-buckets), so this is the histogram to log during training.
    """
    usage, hooks = {}, []

    def hook_for(name, module):
        def hook(_module, args):
            x = args[0]
            code, _ = hash_codes(x.reshape(-1, x.shape[-1]), module.tau)  # (N, K)
            rows = 2 ** module.tau
            hit = torch.zeros(module.num_tables * rows, dtype=torch.bool, device=x.device)
            hit[(code + torch.arange(module.num_tables, device=x.device) * rows).reshape(-1)] = True
            usage[name] = float(hit.float().mean())
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (MemoryLinear, MemoryAttention)):
            hooks.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        model(*inputs, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    return usage

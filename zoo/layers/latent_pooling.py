"""NV-Embed's latent-attention pooling (Lee et al. 2024, arXiv 2405.17428 Sec. 3.2) and masked pooling helpers.

Token states are the queries and a trainable dictionary of r latents supplies the keys and values; an MLP follows,
then a masked mean over the valid tokens. The head mixes nothing across tokens (each token is mapped on its own), so
its output is exactly invariant to padding and to token order.

    from zoo.layers.latent_pooling import LatentAttentionPooling
    pool = LatentAttentionPooling(dim=64, num_latents=16, heads=2)
    h = torch.randn(3, 10, 64)
    mask = torch.arange(10) < torch.tensor([[10], [7], [1]])      # (3, 10), right padding
    e = pool(h, mask)                                               # (3, 64), unit L2 norm
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def valid_mask(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool mask from ``mask`` (any dtype, nonzero = valid) or all-true for None; checks the shape."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, T) = {(batch, length)}")
    return mask.to(device=device, dtype=torch.bool)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T, D) over positions where ``valid`` (B, T) is True -> (B, D); an empty row gives zeros.

    Accumulates in at least float32 and returns x's dtype; masked positions are excluded with ``where``, so inf or
    NaN there never reaches the result.

        masked_mean(torch.ones(1, 3, 2), torch.tensor([[True, False, True]]))   # tensor([[1., 1.]])
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    total = torch.where(valid.unsqueeze(-1), x.to(dtype), 0.0).sum(dim=1)                 # (B, D)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)                         # (B, 1)
    return (total / count).to(x.dtype)


def last_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) at the last position where ``valid`` (B, T) is True -> (B, D); an empty row gives zeros.

        last_valid(torch.arange(4.).view(1, 4, 1), torch.tensor([[True, True, False, False]]))   # tensor([[1.]])
    """
    positions = torch.arange(x.shape[1], device=x.device).expand_as(valid)               # (B, T)
    last = torch.where(valid, positions, -1).amax(dim=1)                                  # (B,), -1 when empty
    picked = x.gather(1, last.clamp_min(0)[:, None, None].expand(-1, 1, x.shape[-1]))    # (B, 1, D)
    return torch.where((last >= 0)[:, None], picked.squeeze(1), 0.0)


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent-attention head: per-token cross-attention to r latents, GEGLU MLP, masked mean, L2.

    ``forward(h (B, T, D), mask (B, T) | None) -> e (B, D)``. Symbols: D = dim, D_l = latent_dim, H = heads,
    d = head_dim, r = num_latents, m = mlp_ratio::

        h0 = where(mask, h, 0)
        o  = to_out(softmax_r(to_q(norm_q(h0)) · kᵀ / √d) · v),   k, v = chunk(to_kv(norm_kv(latents)), 2)
        h1 = o + h0
        h2 = ff_out(a * gelu(g)) + h1,                            a, g = chunk(ff_in(norm_ff(h1)), 2)
        e  = masked mean of h2, then e / max(‖e‖, 1e-12) when ``normalize``

    ``mask=None`` means every position is valid; an all-false row gives a zero vector (and zero gradient). The
    parameter names map onto NV-Embed's ``LatentAttentionModel`` through ``convert_nvembed_state_dict``. The
    latents get no weight decay.
    """

    _no_weight_decay = ("latents",)

    def __init__(self, dim: int, num_latents: int = 512, heads: int = 8, mlp_ratio: int = 4, *,
                 head_dim: int | None = None, latent_dim: int | None = None, normalize: bool = True):
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"LatentAttentionPooling: dim ({dim}) must be divisible by heads ({heads}), "
                             f"or pass head_dim")
        for name, value in (("dim", dim), ("num_latents", num_latents), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            if value < 1:
                raise ValueError(f"LatentAttentionPooling: {name} must be >= 1, got {value}")
        self.dim, self.num_latents, self.heads, self.mlp_ratio = dim, num_latents, heads, mlp_ratio
        self.head_dim = head_dim or dim // heads
        self.latent_dim = latent_dim or dim
        self.normalize = normalize
        inner = heads * self.head_dim
        self.latents = nn.Parameter(torch.empty(num_latents, self.latent_dim))
        self.norm_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm_kv = nn.LayerNorm(self.latent_dim, eps=1e-5)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(self.latent_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.ff_in = nn.Linear(dim, 2 * mlp_ratio * dim)
        self.ff_out = nn.Linear(mlp_ratio * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Latents N(0, 1); LayerNorms weight 1, bias 0; linear layers PyTorch's default init."""
        nn.init.normal_(self.latents, mean=0.0, std=1.0)
        for module in (self.norm_q, self.norm_kv, self.norm_ff, self.to_q, self.to_kv, self.to_out, self.ff_in,
                       self.ff_out):
            module.reset_parameters()

    def latent_keys_values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the latents, (r, H, d) each; computed once per call."""
        kv = self.to_kv(self.norm_kv(self.latents.to(dtype)))                              # (r, 2·H·d)
        k, v = kv.chunk(2, dim=-1)                                                          # (r, H·d) each
        return (rearrange(k, "r (h d) -> r h d", h=self.heads), rearrange(v, "r (h d) -> r h d", h=self.heads))

    def latent_attention(self, h0: torch.Tensor) -> torch.Tensor:
        """The attention output o (B, T, D) of tokens h0 (B, T, D) over the latents (no mask: keys are latents)."""
        q = rearrange(self.to_q(self.norm_q(h0)), "b t (h d) -> b t h d", h=self.heads)    # (B, T, H, d)
        k, v = self.latent_keys_values(h0.dtype)                                            # (r, H, d)
        scores = torch.einsum("bthd,rhd->bthr", q, k) / math.sqrt(self.head_dim)           # (B, T, H, r)
        out = torch.einsum("bthr,rhd->bthd", scores.softmax(dim=-1), v)                     # (B, T, H, d)
        return self.to_out(rearrange(out, "b t h d -> b t (h d)"))                          # (B, T, D)

    def token_states(self, h0: torch.Tensor) -> torch.Tensor:
        """h2 (B, T, D): the per-token map (latent attention + residual, GEGLU MLP + residual) before pooling."""
        h1 = self.latent_attention(h0) + h0                                                 # (B, T, D)
        value, gate = self.ff_in(self.norm_ff(h1)).chunk(2, dim=-1)                         # (B, T, m·D) each
        return self.ff_out(value * F.gelu(gate)) + h1                                       # (B, T, D)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.dim:
            raise ValueError(f"LatentAttentionPooling: h must be (B, T, {self.dim}), got {tuple(h.shape)}")
        valid = valid_mask(mask, h.shape[0], h.shape[1], h.device)                          # (B, T)
        h0 = torch.where(valid.unsqueeze(-1), h, 0.0)                                       # pads zeroed
        e = masked_mean(self.token_states(h0), valid)                                       # (B, D)
        return F.normalize(e, dim=-1, eps=1e-12) if self.normalize else e


# NV-Embed (``LatentAttentionModel``) key -> zoo key; ``.weight``/``.bias`` suffixes carry over.
NVEMBED_KEYS = {
    "latents": "latents",
    "cross_attend_blocks.0.norm": "norm_q",
    "cross_attend_blocks.0.norm_context": "norm_kv",
    "cross_attend_blocks.0.fn.to_q": "to_q",
    "cross_attend_blocks.0.fn.to_kv": "to_kv",
    "cross_attend_blocks.0.fn.to_out": "to_out",
    "cross_attend_blocks.1.norm": "norm_ff",
    "cross_attend_blocks.1.fn.net.0": "ff_in",
    "cross_attend_blocks.1.fn.net.2": "ff_out",
}
NVEMBED_PREFIX = "latent_attention_model."


def convert_nvembed_state_dict(state: dict) -> dict:
    """Rename an NV-Embed ``LatentAttentionModel`` state dict to ``LatentAttentionPooling``'s names.

    Accepts the head's own keys or a whole ``NVEmbedModel`` state dict (keys under ``latent_attention_model.``;
    the backbone's keys are then ignored). No tensor is permuted: the ``to_kv`` chunk layout already matches.

        pool.load_state_dict(convert_nvembed_state_dict(torch.load("nvembed_head.pt")))
    """
    if any(key.startswith(NVEMBED_PREFIX) for key in state):
        state = {key[len(NVEMBED_PREFIX):]: v for key, v in state.items() if key.startswith(NVEMBED_PREFIX)}
    converted, unknown = {}, []
    for key, value in state.items():
        module, _, suffix = key.rpartition(".") if key != "latents" else ("latents", "", "")
        if module not in NVEMBED_KEYS:
            unknown.append(key)
            continue
        converted[NVEMBED_KEYS[module] + (f".{suffix}" if suffix else "")] = value
    if unknown:
        raise ValueError(f"convert_nvembed_state_dict: keys that are not NV-Embed latent-attention weights: "
                         f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    return converted

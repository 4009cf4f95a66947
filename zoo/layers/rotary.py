"""Rotary position embeddings (RoFormer, Su et al. 2021), computed from explicit positions."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs of channels ``(x_i, x_{i+d/2})`` by ``position * base^(-2i/d)``.

    ``forward(x (B, T, H, d), positions (B, T) long) -> (B, T, H, d)``. Positions are explicit so cached decoding
    and streaming rotate each token by its absolute position. The frequency table is a non-persistent buffer that
    ``reset_parameters`` recomputes (it holds garbage after a meta-device build and ``to_empty``).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        self.inv_freq.copy_(1.0 / self.base ** (exponent / self.head_dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)              # at least fp32; fp64 stays fp64
        angles = positions.to(dtype).unsqueeze(-1) * self.inv_freq.to(dtype)  # (B, T, d/2)
        cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # (B, T, 1, d/2)
        x1, x2 = x.to(dtype).chunk(2, dim=-1)                          # (B, T, H, d/2) each
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return rotated.to(x.dtype)

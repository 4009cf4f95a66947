"""Channel mixers: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(dim: int, expansion: float, multiple: int = 16) -> int:
    """Hidden width ``expansion * dim`` rounded up to a multiple of ``multiple``."""
    hidden = int(expansion * dim)
    return multiple * ((hidden + multiple - 1) // multiple)


class SwiGLU(nn.Module):
    """``W_down(SiLU(x W_gate) * (x W_up))``. Shapes: x (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.init_std = init_std
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)   # gate and up, fused
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in.weight, std=self.init_std)
        nn.init.normal_(self.w_out.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)             # (B, T, hidden) each
        return self.w_out(F.silu(gate) * up)                 # (B, T, D)

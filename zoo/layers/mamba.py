"""Mamba mixers: ``Mamba`` (S6, Mamba-1) and ``BiMamba`` (Vision Mamba's bidirectional block), and the pieces Mamba-2
(``zoo.layers.mamba2``) shares with them.

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752;
Zhu et al., "Vision Mamba", arXiv 2401.09417.

Parameter names follow ``mamba_ssm`` and Hugging Face (``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``), so
their checkpoints load by an identity map of keys (``zoo.hf_import``).

    from zoo.layers import Mamba
    mixer = Mamba(dim=128, d_state=16)
    y, state = mixer(torch.randn(2, 16, 128))          # continue with mixer(x_next, state)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels._common import resolve_backend, step_exp
from zoo.kernels.selective_scan import selective_scan
from zoo.kernels.selective_scan import step_function as selective_scan_step_function
from zoo.layers.base import Mixer
from zoo.layers.conv import ShortConv

__all__ = ["Mamba", "MambaState", "BiMamba"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MambaState(NamedTuple):
    """Decode state of ``Mamba``: conv (B, d_conv-1, E) pre-conv inputs in the activation dtype; ssm (B, E, N) fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces (Mamba, BiMamba and Mamba2)
# ---------------------------------------------------------------------------------------------------------------------
def mamba_conv(channels: int, d_conv: int) -> ShortConv:
    """The causal depthwise conv + SiLU of the Mamba mixers, with a bias, in ``nn.Conv1d``'s weight layout."""
    return ShortConv(channels, d_conv, bias=True, activation="silu", conv1d_layout=True)


def init_dt_bias_(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """bias = softplus⁻¹(dt), dt = exp(U(log dt_min, log dt_max)) clamped to ≥ floor (mamba_ssm's init)."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class KeepFP32(Mixer):
    """Keeps the parameters named in ``_fp32_params`` (dotted, relative to self) fp32 under ``.half()/.bfloat16()``."""

    _fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: self.get_parameter(name).detach().clone() for name in self._fp32_params}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            param = self.get_parameter(name)
            if param.dtype in _LOW_PRECISION:
                param.data = before.to(device=param.device, dtype=torch.float32)
        return self


def fp32(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _s6(x_in, z, conv, x_proj, dt_proj, A_log, D, dt_rank: int, d_state: int, state: MambaState | None,
        keep: torch.Tensor | None = None):
    """Mamba-1 steps 2–4 on x_in, z (B, T, E): conv + SiLU, x_proj → (Δ_low, B, C), dt_proj, selective scan.

    ``keep`` (B, T, 1) zeroes padded positions before and after the conv. Returns (y (B, T, E), MambaState).
    """
    if keep is not None:
        x_in = x_in * keep
    x_c, conv_state = conv(x_in, None if state is None else state.conv)              # (B, T, E)
    if keep is not None:
        x_c = x_c * keep
    dt_low, B, C = torch.split(x_proj(x_c), [dt_rank, d_state, d_state], dim=-1)     # (B, T, R), (B, T, N) x2
    delta = F.linear(dt_low, dt_proj.weight.to(dt_low.dtype))                         # (B, T, E), bias in the scan
    y, h = selective_scan(x_c, delta, -torch.exp(fp32(A_log)), B, C, fp32(D), z, fp32(dt_proj.bias), True,
                          None if state is None else state.ssm)
    return y, MambaState(conv_state, h)


def _init_s6(conv, x_proj, dt_proj, A_log, D, dt_rank: int) -> None:
    """Mamba-1 init: conv/x_proj PyTorch defaults; dt_proj.weight U(±R^-½); dt bias softplus⁻¹(dt); S4D-real A."""
    conv.reset_parameters()
    x_proj.reset_parameters()
    bound = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -bound, bound)
    init_dt_bias_(dt_proj.bias)
    with torch.no_grad():
        N = A_log.shape[1]
        A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=A_log.device)).expand_as(A_log))
        D.fill_(1.0)


def _resolve_dt_rank(dt_rank: int | None, dim: int) -> int:
    if dt_rank is None:
        return math.ceil(dim / 16)
    if int(dt_rank) < 1:
        raise ValueError(f"dt_rank must be >= 1, or None for ceil(dim/16), got {dt_rank!r}")
    return int(dt_rank)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-1
# ---------------------------------------------------------------------------------------------------------------------
class Mamba(KeepFP32):
    """Mamba-1 mixer (S6 selective scan with a causal depthwise conv and a SiLU gate; arXiv 2312.00752).

    ``forward(x (B, T, D), state: MambaState | None) -> (y (B, T, D), MambaState)``. E = expand·dim,
    R = ``dt_rank`` (None: ceil(dim/16)). Streaming: passing the returned state continues the sequence exactly, and
    T = 1 calls decode token by token.
    """

    takes_mask, takes_cu_seqlens, State = True, True, MambaState
    _fp32_params = ("A_log", "D", "dt_proj.bias")
    _no_weight_decay = ("A_log", "D")

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None):
        super().__init__()
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = E = expand * dim
        self.dt_rank = R = _resolve_dt_rank(dt_rank, dim)
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv1d = mamba_conv(E, d_conv)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        _init_s6(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank)
        self.out_proj.reset_parameters()

    def state_shapes(self) -> dict:
        return {"conv": (self.d_conv - 1, self.d_inner), "ssm": (self.d_inner, self.d_state)}

    def forward(self, x: torch.Tensor, state: MambaState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        if x.shape[1] == 1 and state is not None:                                    # decoding
            return self._step(x, state)
        x_in, z = self.in_proj(x).chunk(2, dim=-1)                                    # (B, T, E) each
        y, state = _s6(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank,
                       self.d_state, state)
        return self.out_proj(y), state


    def _step(self, x: torch.Tensor, state: MambaState):
        """One token x (B, 1, D) after ``state``: the conv's one-token update and the selective scan's step."""
        x_in, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)                              # (B, E) each
        x_c, conv_state = self.conv1d.step(x_in, state.conv)                         # (B, E)
        dt_low, B, C = torch.split(self.x_proj(x_c), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt_low, self.dt_proj.weight.to(dt_low.dtype))                # (B, E)
        tensors = (x_c, delta, -step_exp(fp32(self.A_log)), B, C, state.ssm, fp32(self.D), z,
                   fp32(self.dt_proj.bias))
        step = selective_scan_step_function(resolve_backend("auto", x, "Mamba"), *tensors)
        y, h = step(*tensors, True)                                                   # (B, E), (B, E, N)
        return self.out_proj(y)[:, None], MambaState(conv_state, h)


# ---------------------------------------------------------------------------------------------------------------------
# Vision Mamba's bidirectional mixer
# ---------------------------------------------------------------------------------------------------------------------
class BiMamba(KeepFP32):
    """Vim's "v2" bidirectional Mamba mixer (arXiv 2401.09417): a forward and a flipped S6 scan, averaged.

    ``forward(x (B, T, D), state=None, *, mask (B, T) bool | None) -> (y (B, T, D), None)``; not causal. Shared
    ``in_proj``/``out_proj``; the backward direction has its own ``conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b``.
    ``mask`` marks real tokens (one contiguous span per row): pads are zeroed before and after the conv, so valid
    outputs equal the unpadded run and pad outputs are 0.
    """

    causal, takes_mask, State = False, True, None
    _fp32_params = ("A_log", "D", "dt_proj.bias", "A_b_log", "D_b", "dt_proj_b.bias")
    _no_weight_decay = ("A_log", "D", "A_b_log", "D_b")

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None):
        super().__init__()
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = E = expand * dim
        self.dt_rank = R = _resolve_dt_rank(dt_rank, dim)
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", mamba_conv(E, d_conv))
            setattr(self, f"x_proj{suffix}", nn.Linear(E, R + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(R, E, bias=True))
        self.A_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.A_b_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D_b = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        _init_s6(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank)
        _init_s6(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.dt_rank)
        self.out_proj.reset_parameters()

    def forward(self, x: torch.Tensor, state=None, *, mask: torch.Tensor | None = None):
        self.check_input(x)
        self.check_state(state, x)
        keep = None
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"BiMamba: mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
            keep = mask.to(x.dtype).unsqueeze(-1)                                     # (B, T, 1)
        x_in, z = self.in_proj(x).chunk(2, dim=-1)                                    # (B, T, E) each
        y_f, _ = _s6(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank,
                     self.d_state, None, keep)
        flip_keep = None if keep is None else keep.flip(1)
        y_b, _ = _s6(x_in.flip(1), z.flip(1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
                     self.dt_rank, self.d_state, None, flip_keep)
        y = (y_f + y_b.flip(1)) / 2                                                   # (B, T, E)
        if keep is not None:
            y = y * keep
        return self.out_proj(y), None

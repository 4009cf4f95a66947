"""Mamba-2 mixer (SSD, state-space duality) and its gated per-group RMSNorm.

Paper: Dao & Gu, "Transformers are SSMs", arXiv 2405.21060.

Parameter names follow ``mamba_ssm`` and Hugging Face (``in_proj, conv1d, dt_bias, A_log, D, norm, out_proj``), so
their checkpoints load by an identity map of keys (``zoo.hf_import``).

    from zoo.layers import Mamba2
    mixer = Mamba2(dim=128, d_state=32, headdim=32)
    y, state = mixer(torch.randn(2, 16, 128))          # continue with mixer(x_next, state)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels._common import resolve_backend, step_exp
from zoo.kernels.ssd import ssd
from zoo.kernels.ssd import step_function as ssd_step_function
from zoo.layers.base import document_bounds
from zoo.layers.mamba import KeepFP32, fp32, init_dt_bias_, mamba_conv

__all__ = ["Mamba2", "Mamba2State", "GroupedGatedRMSNorm"]


class Mamba2State(NamedTuple):
    """Decode state of ``Mamba2``: conv (B, d_conv-1, E+2GN) pre-conv inputs; ssm (B, H, P, N) fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor


class _GatedRMSNorm(torch.autograd.Function):
    """w ⊙ v / sqrt(mean_group(v²) + eps) with v = y·silu(z), in fp32, with a hand-written backward.

    Shapes: y, z (M, G, c), weight (G, c) -> (M, G, c). Keeps silu(z), v and the per-group 1/rms r. With n = v·r:
    gw = Σ_m g·n,  gv = r·(g·w) − v·r³·Σ_c(g·w·v)/c,  gy = gv·silu(z),  gz = silu'(z)·gv·y.
    """

    @staticmethod
    def forward(ctx, y, z, weight, eps):
        s = F.silu(z)                                                                    # (M, G, c)
        v = s * y                                                                        # (M, G, c)
        r = torch.rsqrt(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[-1]).add_(eps))
        ctx.save_for_backward(y, z, weight, s, v, r)
        return (v * r).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        y, z, weight, s, v, r = ctx.saved_tensors
        gv_w = g * v                                                                     # g·v, summed two ways:
        g_weight = torch.einsum("mg,mgc->gc", r.squeeze(-1), gv_w)                        # Σ_m g·n
        dot = torch.einsum("mgc,gc->mg", gv_w, weight).unsqueeze(-1)                     # Σ_c g·w·v  (M, G, 1)
        gv = (g * weight).mul_(r).addcmul_(v, r.pow(3).mul_(dot).div_(-v.shape[-1]))      # (M, G, c)
        g_z = torch.ops.aten.silu_backward(gv * y, z)
        return gv.mul_(s), g_z, g_weight, None


class GroupedGatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm, gate first then normalise per group (``norm_before_gate=False``), in fp32.

    ``v = y·silu(z)``; each of the G contiguous groups of E/G channels becomes ``v_g / sqrt(mean(v_g²) + eps)``,
    then times ``weight``. Shapes: y, z (..., E) -> (..., E) in y's dtype. One autograd Function (``_GatedRMSNorm``)
    with a hand-written backward: about half the passes over (T, E) of autograd through the elementwise ops.
    """

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % groups:
            raise ValueError(f"GroupedGatedRMSNorm: groups ({groups}) must divide dim ({dim})")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if y.shape != z.shape or y.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"GroupedGatedRMSNorm: y and z must both be (..., {self.weight.shape[0]}), got "
                             f"{tuple(y.shape)} and {tuple(z.shape)}")
        G = self.groups
        rows = (-1, G, y.shape[-1] // G)
        out = _GatedRMSNorm.apply(fp32(y).reshape(rows), fp32(z).reshape(rows), fp32(self.weight).view(G, -1),
                                  self.eps)                                             # (M, G, E/G)
        return out.view(y.shape).to(y.dtype)


class Mamba2(KeepFP32):
    """Mamba-2 mixer (SSD with scalar-per-head A, one conv over [x | B | C], gated per-group RMSNorm; arXiv 2405.21060).

    ``forward(x (B, T, D), state: Mamba2State | None, *, cu_seqlens=None) -> (y (B, T, D), Mamba2State)``.
    E = expand·dim, H = E / headdim heads of width P = headdim, G = ngroups groups of B/C, N = d_state.
    ``cu_seqlens`` (B == 1) packs sequences along time: conv taps never reach past a sequence start and the state has
    one row per sequence.

    On CPU a sequence longer than ``segment_len`` runs as consecutive segments that carry the state (the streaming
    contract, so the result is the same up to rounding). This keeps every temporary under glibc's 32 MB mmap
    threshold, where freed memory is reused instead of mapped afresh and page-faulted on every call: at T = 16k
    (d_model 768) one forward + backward took 16 % less time this way.
    """

    takes_mask, takes_cu_seqlens, State = True, True, Mamba2State
    _fp32_params = ("A_log", "D", "dt_bias")
    _no_weight_decay = ("A_log", "D", "dt_bias")
    segment_len = 2048

    def __init__(self, dim: int, d_state: int = 128, headdim: int = 64, ngroups: int = 1, chunk_size: int = 64,
                 expand: int = 2, d_conv: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        E = expand * dim
        if E % headdim:
            raise ValueError(f"Mamba2: expand*dim ({E}) must be divisible by headdim ({headdim})")
        H = E // headdim
        if H % ngroups:
            raise ValueError(f"Mamba2: the number of heads ({H}) must be divisible by ngroups ({ngroups})")
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"Mamba2: chunk_size must be a power of two, got {chunk_size}")
        self.dim, self.d_state, self.headdim, self.ngroups = dim, d_state, headdim, ngroups
        self.chunk_size, self.d_conv, self.d_inner, self.nheads = chunk_size, d_conv, E, H
        conv_channels = E + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, 2 * E + 2 * ngroups * d_state + H, bias=False)
        self.conv1d = mamba_conv(conv_channels, d_conv)
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.norm = GroupedGatedRMSNorm(E, ngroups, norm_eps)
        self.out_proj = nn.Linear(E, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        init_dt_bias_(self.dt_bias)
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
            self.D.fill_(1.0)
        self.norm.reset_parameters()
        self.out_proj.reset_parameters()

    def state_shapes(self) -> dict:
        conv_channels = self.d_inner + 2 * self.ngroups * self.d_state  # E + 2GN
        return {"conv": (self.d_conv - 1, conv_channels), "ssm": (self.nheads, self.headdim, self.d_state)}

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        if cu_seqlens is not None:
            document_bounds("Mamba2", cu_seqlens, x)
        sequences = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1  # packed: one state row each
        self.check_state(state, x, batch=sequences)
        if x.shape[1] == 1 and state is not None and cu_seqlens is None:             # decoding
            return self._step(x, state)
        segment = max(self.segment_len, self.chunk_size)
        if cu_seqlens is not None or x.device.type != "cpu" or x.shape[1] <= segment:
            return self._forward(x, state, cu_seqlens)
        outputs = []
        for start in range(0, x.shape[1], segment):
            y, state = self._forward(x[:, start:start + segment], state, None)
            outputs.append(y)
        return torch.cat(outputs, 1), state

    def _forward(self, x: torch.Tensor, state: Mamba2State | None, cu_seqlens: torch.Tensor | None):
        E, H, G, N, P = self.d_inner, self.nheads, self.ngroups, self.d_state, self.headdim
        z, xBC, dt = torch.split(self.in_proj(x), [E, E + 2 * G * N, H], dim=-1)      # (B, T, E | E+2GN | H)
        sizes = (E, G * N, G * N)
        if cu_seqlens is None:
            (x_c, B, C), conv_state = self.conv1d(xBC, None if state is None else state.conv, split=sizes)
        else:
            xBC, conv_state = self._varlen_conv(xBC, None if state is None else state.conv, cu_seqlens)
            x_c, B, C = torch.split(xBC, sizes, dim=-1)                               # silu(conv) of each
        x_c = rearrange(x_c, "b t (h p) -> b t h p", p=P)                             # (B, T, H, P)
        B = rearrange(B, "b t (g n) -> b t g n", g=G)                                 # (B, T, G, N)
        C = rearrange(C, "b t (g n) -> b t g n", g=G)
        y, S = ssd(x_c, dt, -torch.exp(fp32(self.A_log)), B, C, self.chunk_size, fp32(self.D),
                   fp32(self.dt_bias), True, None if state is None else state.ssm, cu_seqlens=cu_seqlens)
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)                        # (B, T, E)
        return self.out_proj(y), Mamba2State(conv_state, S)

    def _step(self, x: torch.Tensor, state: Mamba2State):
        """One token x (B, 1, D) after ``state``: the conv's one-token update and the SSD step."""
        E, H, G, N, P = self.d_inner, self.nheads, self.ngroups, self.d_state, self.headdim
        batch = x.shape[0]
        z, xBC, dt = torch.split(self.in_proj(x[:, 0]), [E, E + 2 * G * N, H], dim=-1)  # (B, E | E+2GN | H)
        xBC, conv_state = self.conv1d.step(xBC, state.conv)                           # (B, E+2GN)
        x_c, B, C = torch.split(xBC, [E, G * N, G * N], dim=-1)
        tensors = (x_c.view(batch, H, P), dt, -step_exp(fp32(self.A_log)), B.view(batch, G, N),
                   C.view(batch, G, N), state.ssm, fp32(self.D), fp32(self.dt_bias))
        y, S = ssd_step_function(resolve_backend("auto", x, "Mamba2"), *tensors)(*tensors, True)  # (B, H, P)
        return self.out_proj(self.norm(y.reshape(batch, E), z))[:, None], Mamba2State(conv_state, S)

    def _varlen_conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None, cu_seqlens: torch.Tensor):
        """Per-sequence silu(causal conv) of packed xBC (1, T, C); conv_state (nseq, K-1, C) or None."""
        if xBC.shape[0] != 1:
            raise ValueError(f"Mamba2: cu_seqlens needs batch size 1, got {xBC.shape[0]}")
        bounds = cu_seqlens.tolist()  # layout metadata, read on the host (as ssd does)
        outs, states = [], []
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            init = None if conv_state is None else conv_state[k:k + 1]
            out, new = self.conv1d(xBC[:, start:end], init)
            outs.append(out)
            states.append(new)
        return torch.cat(outs, dim=1), torch.cat(states, dim=0)

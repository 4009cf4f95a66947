"""Mamba mixers: ``Mamba`` (S6, Mamba-1), ``Mamba2`` (SSD) and ``BiMamba`` (Vision Mamba's bidirectional block).

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752;
Dao & Gu, "Transformers are SSMs", arXiv 2405.21060; Zhu et al., "Vision Mamba", arXiv 2401.09417.

Parameter names follow ``mamba_ssm`` and Hugging Face (``in_proj, conv1d, x_proj, dt_proj, A_log, D, dt_bias, norm,
out_proj``), so their checkpoints load by an identity map of keys (``zoo.hf_import``).

    from zoo.layers import Mamba2
    mixer = Mamba2(dim=128, d_state=32, headdim=32)
    y, state = mixer(torch.randn(2, 16, 128))          # continue with mixer(x_next, state)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels.selective_scan import selective_scan
from zoo.kernels.ssd import ssd
from zoo.layers.base import Mixer

__all__ = ["Mamba", "MambaState", "Mamba2", "Mamba2State", "BiMamba", "GroupedGatedRMSNorm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MambaState(NamedTuple):
    """Decode state of ``Mamba``: conv (B, d_conv-1, E) pre-conv inputs in the activation dtype; ssm (B, E, N) fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba2State(NamedTuple):
    """Decode state of ``Mamba2``: conv (B, d_conv-1, E+2GN) pre-conv inputs; ssm (B, H, P, N) fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------------
class _CausalConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv) of x (B, T, C) after ``state`` (B, K-1, C), with a hand-written backward.

    u_t = bias + Σ_j w_j·[state | x]_{t+j}, as shifted multiply-adds on x plus the few rows that reach into the
    state (several times faster than conv1d on CPU, and no padded copy of x). Keeps x and the pre-activation u.
    Returns the output split along channels into ``sizes`` (views, so the backward writes each piece's gradient in
    place instead of autograd concatenating them), then the last K-1 inputs (B, K-1, C).
    """

    @staticmethod
    def forward(ctx, x, state, weight, bias, sizes):
        T, K = x.shape[1], weight.shape[1]
        u = x * weight[:, K - 1] if bias is None else torch.addcmul(bias, x, weight[:, K - 1])  # (B, T, C)
        for shift in range(1, K):
            tap = weight[:, K - 1 - shift]
            if shift < T:
                u[:, shift:].addcmul_(x[:, :T - shift], tap)
            rows = min(shift, T)  # the first rows read the state: u_t += w·state[K-1-shift+t]
            u[:, :rows].addcmul_(state[:, K - 1 - shift:K - 1 - shift + rows], tap)
        ctx.save_for_backward(x, state, weight, u)
        ctx.has_bias, ctx.sizes = bias is not None, sizes
        ctx.set_materialize_grads(False)  # an unused piece or state gets None, not a zero tensor
        carried = torch.cat([state[:, min(T, K - 1):], x[:, max(0, T - (K - 1)):]], dim=1)  # last K-1 inputs
        return *F.silu(u).split(sizes, dim=-1), carried

    @staticmethod
    def backward(ctx, *grads):
        x, state, weight, u = ctx.saved_tensors
        T, K = x.shape[1], weight.shape[1]
        gu = torch.empty_like(u)                                                       # (B, T, C)
        for g_piece, u_piece, gu_piece in zip(grads[:-1], u.split(ctx.sizes, -1), gu.split(ctx.sizes, -1)):
            if g_piece is None:
                gu_piece.zero_()
            else:
                torch.ops.aten.silu_backward.grad_input(g_piece, u_piece, grad_input=gu_piece)
        gx = gu * weight[:, K - 1]
        g_state = torch.zeros_like(state)
        g_weight = [torch.linalg.vecdot(gu, x, dim=1).sum(0)]
        for shift in range(1, K):
            tap = weight[:, K - 1 - shift]
            rows = min(shift, T)
            window = slice(K - 1 - shift, K - 1 - shift + rows)
            g_state[:, window].addcmul_(gu[:, :rows], tap)
            g_tap = torch.linalg.vecdot(gu[:, :rows], state[:, window], dim=1).sum(0)
            if shift < T:
                gx[:, :T - shift].addcmul_(gu[:, shift:], tap)
                g_tap += torch.linalg.vecdot(gu[:, shift:], x[:, :T - shift], dim=1).sum(0)
            g_weight.append(g_tap)
        g_new_state = grads[-1]
        from_state = max(0, K - 1 - T)  # the returned state is the last K-1 rows of [state | x]
        if g_new_state is not None:
            g_state[:, K - 1 - from_state:] += g_new_state[:, :from_state]
            gx[:, T - (K - 1 - from_state):] += g_new_state[:, from_state:]
        g_weight = torch.stack(g_weight[::-1], 1)                                        # (C, K)
        g_bias = gu.sum((0, 1)) if ctx.has_bias else None
        return gx, g_state, g_weight, g_bias, None


def _conv_silu(conv: nn.Conv1d, x: torch.Tensor, state: torch.Tensor | None, sizes: tuple[int, ...] | None = None):
    """silu(causal depthwise conv of x (B, T, C)) continuing from ``state`` (B, K-1, C) of earlier inputs.

    Returns (*the activated output (B, T, C) split along channels into ``sizes`` (default: one piece), new state =
    the last K-1 inputs (B, K-1, C)).
    """
    K = conv.kernel_size[0]
    sizes = (x.shape[-1],) if sizes is None else tuple(sizes)
    if state is None:
        state = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    state = state.to(x.dtype)
    if x.shape[1] == 0:  # an empty call: nothing out, the state passes through
        return *x.split(sizes, dim=-1), state
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return _CausalConvSiLU.apply(x, state, conv.weight[:, 0].to(x.dtype), bias, sizes)


def _dt_bias_init_(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """bias = softplus⁻¹(dt), dt = exp(U(log dt_min, log dt_max)) clamped to ≥ floor (mamba_ssm's init)."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def _linear_default_(linear: nn.Module) -> None:
    """PyTorch's default init for a Linear/Conv (kaiming-uniform a=√5, bias U(±1/√fan_in))."""
    linear.reset_parameters()


class _KeepFP32(Mixer):
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


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _mark(param: nn.Parameter, no_weight_decay: bool = True, no_reinit: bool = False) -> None:
    if no_weight_decay:
        param._no_weight_decay = True
    if no_reinit:
        param._no_reinit = True


def _s6(x_in, z, conv, x_proj, dt_proj, A_log, D, dt_rank: int, d_state: int, state: MambaState | None,
        keep: torch.Tensor | None = None):
    """Mamba-1 steps 2–4 on x_in, z (B, T, E): conv + SiLU, x_proj → (Δ_low, B, C), dt_proj, selective scan.

    ``keep`` (B, T, 1) zeroes padded positions before and after the conv. Returns (y (B, T, E), MambaState).
    """
    if keep is not None:
        x_in = x_in * keep
    x_c, conv_state = _conv_silu(conv, x_in, None if state is None else state.conv)  # (B, T, E)
    if keep is not None:
        x_c = x_c * keep
    dt_low, B, C = torch.split(x_proj(x_c), [dt_rank, d_state, d_state], dim=-1)     # (B, T, R), (B, T, N) x2
    delta = F.linear(dt_low, dt_proj.weight.to(dt_low.dtype))                         # (B, T, E), bias in the scan
    y, h = selective_scan(x_c, delta, -torch.exp(_fp32(A_log)), B, C, _fp32(D), z, _fp32(dt_proj.bias), True,
                          None if state is None else state.ssm)
    return y, MambaState(conv_state, h)


def _init_s6(conv, x_proj, dt_proj, A_log, D, dt_rank: int) -> None:
    """Mamba-1 init: conv/x_proj PyTorch defaults; dt_proj.weight U(±R^-½); dt bias softplus⁻¹(dt); S4D-real A."""
    _linear_default_(conv)
    _linear_default_(x_proj)
    bound = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -bound, bound)
    _dt_bias_init_(dt_proj.bias)
    with torch.no_grad():
        N = A_log.shape[1]
        A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=A_log.device)).expand_as(A_log))
        D.fill_(1.0)


def _resolve_dt_rank(dt_rank, dim: int) -> int:
    if dt_rank is None or dt_rank == "auto":
        return math.ceil(dim / 16)
    if int(dt_rank) < 1:
        raise ValueError(f"dt_rank must be >= 1 or 'auto', got {dt_rank!r}")
    return int(dt_rank)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-1
# ---------------------------------------------------------------------------------------------------------------------
class Mamba(_KeepFP32):
    """Mamba-1 mixer (S6 selective scan with a causal depthwise conv and a SiLU gate; arXiv 2312.00752).

    ``forward(x (B, T, D), state: MambaState | None) -> (y (B, T, D), MambaState)``. E = expand·dim,
    R = ceil(dim/16) for ``dt_rank="auto"`` (or None). Streaming: passing the returned state continues the sequence
    exactly, and T = 1 calls decode token by token.
    """

    State = MambaState
    _fp32_params = ("A_log", "D", "dt_proj.bias")
    _no_weight_decay = ("A_log", "D")

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto"):
        super().__init__()
        rng = torch.get_rng_state()
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = E = expand * dim
        self.dt_rank = R = _resolve_dt_rank(dt_rank, dim)
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, dim, bias=False)
        _mark(self.A_log)
        _mark(self.D)
        _mark(self.dt_proj.bias, no_reinit=True)
        torch.set_rng_state(rng)  # meta build + reset_parameters() under one seed == this build
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, section) -> "Mamba":
        """Build from a ``MambaConfig`` (dt_rank None = auto)."""
        return cls(dim, section.d_state, section.d_conv, section.expand, section.dt_rank)

    def reset_parameters(self) -> None:
        _linear_default_(self.in_proj)
        _init_s6(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank)
        _linear_default_(self.out_proj)

    def forward(self, x: torch.Tensor, state: MambaState | None = None):
        x_in, z = self.in_proj(x).chunk(2, dim=-1)                                    # (B, T, E) each
        y, state = _s6(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank,
                       self.d_state, state)
        return self.out_proj(y), state


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2
# ---------------------------------------------------------------------------------------------------------------------
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
        out = _GatedRMSNorm.apply(_fp32(y).reshape(rows), _fp32(z).reshape(rows), _fp32(self.weight).view(G, -1),
                                  self.eps)                                             # (M, G, E/G)
        return out.view(y.shape).to(y.dtype)


class Mamba2(_KeepFP32):
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

    State = Mamba2State
    _fp32_params = ("A_log", "D", "dt_bias")
    _no_weight_decay = ("A_log", "D", "dt_bias")
    segment_len = 2048

    def __init__(self, dim: int, d_state: int = 128, headdim: int = 64, ngroups: int = 1, chunk_size: int = 64,
                 expand: int = 2, d_conv: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        rng = torch.get_rng_state()
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
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, d_conv, groups=conv_channels, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.norm = GroupedGatedRMSNorm(E, ngroups, norm_eps)
        self.out_proj = nn.Linear(E, dim, bias=False)
        for p in (self.A_log, self.D):
            _mark(p)
        _mark(self.dt_bias, no_reinit=True)
        torch.set_rng_state(rng)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_default_(self.in_proj)
        _linear_default_(self.conv1d)
        _dt_bias_init_(self.dt_bias)
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1.0, 16.0)))
            self.D.fill_(1.0)
        self.norm.reset_parameters()
        _linear_default_(self.out_proj)

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None, *, cu_seqlens: torch.Tensor | None = None):
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
            x_c, B, C, conv_state = _conv_silu(self.conv1d, xBC, None if state is None else state.conv, sizes)
        else:
            xBC, conv_state = self._varlen_conv(xBC, None if state is None else state.conv, cu_seqlens)
            x_c, B, C = torch.split(xBC, sizes, dim=-1)                               # silu(conv) of each
        x_c = rearrange(x_c, "b t (h p) -> b t h p", p=P)                             # (B, T, H, P)
        B = rearrange(B, "b t (g n) -> b t g n", g=G)                                 # (B, T, G, N)
        C = rearrange(C, "b t (g n) -> b t g n", g=G)
        y, S = ssd(x_c, dt, -torch.exp(_fp32(self.A_log)), B, C, self.chunk_size, _fp32(self.D),
                   _fp32(self.dt_bias), True, None if state is None else state.ssm, cu_seqlens=cu_seqlens)
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)                        # (B, T, E)
        return self.out_proj(y), Mamba2State(conv_state, S)

    def _varlen_conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None, cu_seqlens: torch.Tensor):
        """Per-sequence silu(causal conv) of packed xBC (1, T, C); conv_state (nseq, K-1, C) or None."""
        if xBC.shape[0] != 1:
            raise ValueError(f"Mamba2: cu_seqlens needs batch size 1, got {xBC.shape[0]}")
        bounds = cu_seqlens.tolist()  # layout metadata, read on the host (as ssd does)
        outs, states = [], []
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            init = None if conv_state is None else conv_state[k:k + 1]
            out, new = _conv_silu(self.conv1d, xBC[:, start:end], init)
            outs.append(out)
            states.append(new)
        return torch.cat(outs, dim=1), torch.cat(states, dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# Vision Mamba's bidirectional mixer
# ---------------------------------------------------------------------------------------------------------------------
class BiMamba(_KeepFP32):
    """Vim's "v2" bidirectional Mamba mixer (arXiv 2401.09417): a forward and a flipped S6 scan, averaged.

    ``forward(x (B, T, D), state=None, *, mask (B, T) bool | None) -> (y (B, T, D), None)``; not causal. Shared
    ``in_proj``/``out_proj``; the backward direction has its own ``conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b``.
    ``mask`` marks real tokens (one contiguous span per row): pads are zeroed before and after the conv, so valid
    outputs equal the unpadded run and pad outputs are 0.
    """

    causal, takes_mask, State = False, True, None
    _fp32_params = ("A_log", "D", "dt_proj.bias", "A_b_log", "D_b", "dt_proj_b.bias")
    _no_weight_decay = ("A_log", "D", "A_b_log", "D_b")

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto"):
        super().__init__()
        rng = torch.get_rng_state()
        self.dim, self.d_state, self.d_conv = dim, d_state, d_conv
        self.d_inner = E = expand * dim
        self.dt_rank = R = _resolve_dt_rank(dt_rank, dim)
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(E, E, d_conv, groups=E, bias=True))
            setattr(self, f"x_proj{suffix}", nn.Linear(E, R + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(R, E, bias=True))
        self.A_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.A_b_log = nn.Parameter(torch.empty(E, d_state, dtype=torch.float32))
        self.D_b = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, dim, bias=False)
        for p in (self.A_log, self.D, self.A_b_log, self.D_b):
            _mark(p)
        _mark(self.dt_proj.bias, no_reinit=True)
        _mark(self.dt_proj_b.bias, no_reinit=True)
        torch.set_rng_state(rng)
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, section) -> "BiMamba":
        """Build from a ``MambaConfig`` (dt_rank None = auto)."""
        return cls(dim, section.d_state, section.d_conv, section.expand, section.dt_rank)

    def reset_parameters(self) -> None:
        _linear_default_(self.in_proj)
        _init_s6(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.dt_rank)
        _init_s6(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.dt_rank)
        _linear_default_(self.out_proj)

    def forward(self, x: torch.Tensor, state=None, *, mask: torch.Tensor | None = None):
        if state is not None:
            raise ValueError("BiMamba is not causal and carries no state; call it on whole sequences (state=None)")
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

"""ShortConv: depthwise causal convolution over time that carries its state across calls (Mamba, Mamba-2, BiMamba,
MoM/GatedDeltaNet, Titans and attention all use it)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = (None, "silu")


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


class ShortConv(nn.Module):
    """Depthwise causal 1-D convolution (kernel ``size``) along time, optionally followed by SiLU.

    ``forward(x (B, T, C), state (B, size-1, C) | None, *, split=None) -> (y (B, T, C), state (B, size-1, C))``.
    The state holds the last ``size - 1`` inputs, so ``conv(x[:, :t])`` then ``conv(x[:, t:], state)`` equals
    ``conv(x)``. ``split`` (channel sizes summing to C) returns y as that many pieces along channels instead.

    ``activation="silu"`` (Mamba's conv) runs conv and SiLU as one autograd Function with a hand-written backward;
    None applies no activation. ``conv1d_layout=True`` stores the weight as ``nn.Conv1d``'s depthwise (C, 1, size)
    instead of (C, size), the shape Mamba checkpoints (mamba_ssm, Hugging Face, zoo's) hold.
    """

    def __init__(self, channels: int, size: int = 4, bias: bool = False, *, activation: str | None = None,
                 conv1d_layout: bool = False):
        super().__init__()
        if size < 1:
            raise ValueError(f"ShortConv: size must be >= 1, got {size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ShortConv: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.channels, self.size, self.activation = channels, size, activation
        shape = (channels, 1, size) if conv1d_layout else (channels, size)
        self.weight = nn.Parameter(torch.empty(shape))             # the last tap multiplies x_t
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.size)                        # nn.Conv1d's default for groups == channels
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros of the state's shape for a batch like ``x``."""
        return x.new_zeros(x.shape[0], self.size - 1, self.channels)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, *, split: tuple[int, ...] | None = None):
        state = self.initial_state(x) if state is None else state.to(x.dtype)
        weight = self.weight.view(self.channels, self.size).to(x.dtype)   # (C, size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.activation == "silu":
            return self._conv_silu(x, state, weight, bias, split)
        T = x.shape[1]
        padded = torch.cat([state, x], dim=1)                      # (B, size-1+T, C)
        # A sum of size shifted products: on CPU this is several times faster than a depthwise conv1d, mostly in
        # the backward, for the small kernels used here.
        y = padded[:, :T] * weight[:, 0]                          # (B, T, C)
        for j in range(1, self.size):
            y = y + padded[:, j:j + T] * weight[:, j]
        if bias is not None:
            y = y + bias
        new_state = padded[:, padded.shape[1] - (self.size - 1):]  # (B, size-1, C)
        return (y if split is None else y.split(split, dim=-1)), new_state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token (decoding): x (B, C), state (B, size-1, C) -> (y (B, C), new state (B, size-1, C)).

        Equals ``forward(x[:, None], state)`` (y squeezed), in three ops instead of the general path's loop; the state
        passed in is not modified (the new one is a view of a fresh window).
        """
        window = torch.cat([state.to(x.dtype), x[:, None]], dim=1)                # (B, size, C)
        y = (window * self.weight.view(self.channels, self.size).T.to(x.dtype)).sum(1)  # (B, C)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return (F.silu(y) if self.activation == "silu" else y), window[:, 1:]

    @staticmethod
    def _conv_silu(x, state, weight, bias, split):
        """The fused conv + SiLU path: (y or its ``split`` pieces, the last size-1 inputs)."""
        sizes = (x.shape[-1],) if split is None else tuple(split)
        if x.shape[1] == 0:  # an empty call: nothing out, the state passes through
            pieces = x.split(sizes, dim=-1)
        else:
            *pieces, state = _CausalConvSiLU.apply(x, state, weight, bias, sizes)
        return (pieces[0] if split is None else tuple(pieces)), state


def conv_documents(conv: ShortConv, x: torch.Tensor, state: torch.Tensor | None, bounds: list[int]):
    """``conv`` on packed documents x (1, T, C) with boundaries ``bounds`` [0, ..., T]: no tap reaches past a
    document's start. state: (N, size-1, C) per document or None; returns (y (1, T, C), new states (N, size-1, C))."""
    outputs, states = [], []
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        y, new_state = conv(x[:, start:end], None if state is None else state[k:k + 1])
        outputs.append(y)
        states.append(new_state)
    return torch.cat(outputs, dim=1), torch.cat(states, dim=0)

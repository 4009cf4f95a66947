"""Titans neural long-term memory (LMM) as a sequence mixer: ``TitansMemory`` (docs/titans.md).

Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663; v1 Sec. 3–4, NeurIPS Sec. 3.3).
The memory is a small network M_W whose weights W are the recurrent state, trained online at test time by gradient
descent with momentum and weight decay on ‖M_W(k_t) − v_t‖², every gradient of a chunk of b tokens taken at the
chunk-start weights. Depth 1 runs the op :func:`zoo.kernels.titans_linear_memory` (matrix memory), depth ≥ 2 the op
:func:`zoo.kernels.titans_mlp_memory.titans_mlp_memory` (residual MLP memory with LayerNorm).

The hybrids built on it (``TitansMAC``, ``TitansMAG``, ``TitansMAL``) live in ``zoo.layers.titans_hybrids`` (import them
from there or from ``zoo.layers``).

    from zoo.layers.titans import TitansMemory
    mixer = TitansMemory(dim=64, heads=2)
    y, state = mixer(torch.randn(2, 40, 64))          # y (2, 40, 64)
    y2, state = mixer(torch.randn(2, 1, 64), state)   # continue the sequence token by token
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from zoo.kernels._common import compute_dtype, l2_normalize
from zoo.kernels.titans_linear_memory import LinearMemoryState, linear_memory_step, titans_linear_memory
from zoo.kernels.titans_mlp_memory import MLPMemoryState, _memory_mlp, mlp_memory_step, titans_mlp_memory
from zoo.layers.base import Mixer, cat_rows, left_pad_time, row_groups, select_rows
from zoo.layers.conv import ShortConv
from zoo.layers.norm import RMSNorm

_INIT_GAIN = 2 ** -2.5          # xavier_uniform gain of every projection (docs/titans.md#parameters)
_GATE_BIAS = {"alpha": -4.6, "eta": 0.0, "theta": -2.2}   # sigmoid: α ≈ 0.01, η = 0.5, θ ≈ 0.1·θ_max
# The arguments of TitansMemory besides dim: the keys a hybrid's ``memory`` dict accepts (docs/titans.md#hybrids).
MEMORY_OPTIONS = ("heads", "head_dim", "memory_depth", "memory_expansion", "chunk_size", "conv_size", "momentum",
                  "forget", "theta_max", "backend", "checkpoint_chunks")


class TitansState(NamedTuple):
    """Recurrent state of :class:`TitansMemory`, batch-first (docs/titans.md#state-across-calls).

    weights, momentum: tuples of L tensors (B, H, in, out), fp32 (fp64 for fp64 inputs): the fast weights W^ℓ and the
        momentum S^ℓ at the last completed chunk boundary.
    pending_k, pending_v: (B, p, H, d): the p < chunk_size tokens after that boundary (p is read from the shape).
    pending_gates: (B, p, H, 2 + L) = (α, η, θ^1..θ^L) of those tokens (zeros where a gate is disabled).
    conv: (B, conv_size − 1, 3·H·d): the last pre-conv q, k, v projections.
    pending_rows: (B,) long, each row's own p when the rows of a batch stand at different places of the chunk grid
        (left-padded rows, packed documents): the pending tensors then hold each row's p tokens at their end, after
        zeros; None when every row has p = pending_k.shape[1].
    """

    weights: tuple
    momentum: tuple
    pending_k: torch.Tensor
    pending_v: torch.Tensor
    pending_gates: torch.Tensor
    conv: torch.Tensor
    pending_rows: torch.Tensor | None = None


class TitansMemory(Mixer):
    """Multi-head Titans long-term memory mixer (Behrouz et al. 2025, arXiv 2501.00663 v1 Sec. 3, Sec. 4.4).

    ``forward(x (B, T, D), state: TitansState | None = None) -> (y (B, T, D), TitansState)``.

    Per token t and head (docs/titans.md#forward-equations):
    q, k, v = l2(SiLU(conv(x W_q))), l2(SiLU(conv(x W_k))), SiLU(conv(x W_v)), each (B, T, H, d);
    [α, η, θ^1..θ^L] = sigmoid(x W_gate + b_gate), θ scaled by ``theta_max``;
    u_t = ∇_W ‖M_W(k_t) − v_t‖² at the chunk-start weights; S_t = η_t S_{t−1} − θ_t u_t; W_t = (1 − α_t) W_{t−1} + S_t;
    y_t = M_{W_t}(q_t); out = W_O(RMSNorm(y) ⊙ SiLU(x W_G)).

    M_W is a d×d matrix for ``memory_depth`` = 1, else the residual MLP z + LN(GELU(…GELU(z W^1)…) W^L) with hidden
    width ``memory_expansion``·d. The learned initial weights M_0 are real per-head parameters. The state carries the tokens
    since the last chunk boundary, so streaming over any split (inside a chunk too) and token-by-token decoding equal
    one call. ``momentum=False`` / ``forget=False`` fix η ≡ 0 / α ≡ 0 (the paper's ablations).

    ``checkpoint_chunks = G > 0`` runs the memory in groups of G chunks under activation checkpointing when gradients
    are needed: backward recomputes one group at a time (all but the last, whose graph it needs first), so activation
    memory holds the group-boundary states ((T / (G·b))·|M|) plus one group's graph instead of every chunk's, for
    about one extra forward of the memory. Results are identical.
    """

    takes_mask, takes_cu_seqlens, State = True, True, TitansState

    def __init__(self, dim: int, heads: int = 4, head_dim: int | None = None, memory_depth: int = 2,
                 memory_expansion: int = 4, chunk_size: int = 16, conv_size: int = 4, momentum: bool = True,
                 forget: bool = True, theta_max: float = 1.0, backend: str = "auto", checkpoint_chunks: int = 0):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("heads", heads, 1), ("memory_depth", memory_depth, 1),
                                 ("memory_expansion", memory_expansion, 1), ("chunk_size", chunk_size, 1),
                                 ("conv_size", conv_size, 0), ("checkpoint_chunks", checkpoint_chunks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TitansMemory: {name} must be an integer >= {low}, got {value!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"TitansMemory: dim ({dim}) must be divisible by heads ({heads}) "
                                 f"when head_dim is not given")
            head_dim = dim // heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"TitansMemory: head_dim must be an integer >= 1 or None, got {head_dim!r}")
        if not theta_max > 0:
            raise ValueError(f"TitansMemory: theta_max must be > 0, got {theta_max!r}")
        if backend not in ("auto", "reference", "torch", "triton"):
            raise ValueError(f"TitansMemory: backend must be 'auto', 'reference', 'torch' or 'triton', got {backend!r}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.memory_depth, self.memory_expansion, self.chunk_size = memory_depth, memory_expansion, chunk_size
        self.conv_size, self.momentum, self.forget = conv_size, momentum, forget
        self.theta_max, self.backend, self.checkpoint_chunks = float(theta_max), backend, checkpoint_chunks
        inner = heads * head_dim
        self.w_q = nn.Linear(dim, inner, bias=False)
        self.w_k = nn.Linear(dim, inner, bias=False)
        self.w_v = nn.Linear(dim, inner, bias=False)
        if conv_size > 0:
            self.conv_q, self.conv_k, self.conv_v = (ShortConv(inner, conv_size) for _ in range(3))
        else:
            self.conv_q = self.conv_k = self.conv_v = None
        # Gate columns per head: [α if forget] [η if momentum] θ^1..θ^L.
        self.gate_names = (("alpha",) if forget else ()) + (("eta",) if momentum else ()) + ("theta",) * memory_depth
        self.w_gate = nn.Linear(dim, heads * len(self.gate_names), bias=True)
        hidden = memory_expansion * head_dim
        widths = [head_dim] + [hidden] * (memory_depth - 1) + [head_dim]
        self.memory_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(heads, widths[i], widths[i + 1])) for i in range(memory_depth)])  # M_0
        self.w_out_gate = nn.Linear(dim, inner, bias=False)
        self.o_norm = RMSNorm(head_dim, eps=1e-5)
        self.w_o = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter (docs/titans.md#parameters)."""
        for linear in (self.w_q, self.w_k, self.w_v, self.w_gate, self.w_out_gate, self.w_o):
            nn.init.xavier_uniform_(linear.weight, gain=_INIT_GAIN)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            if conv is not None:
                conv.reset_parameters()
        with torch.no_grad():
            bias = self.w_gate.bias.view(self.heads, len(self.gate_names))
            for column, name in enumerate(self.gate_names):
                bias[:, column].fill_(_GATE_BIAS[name])
            for weight in self.memory_weights:
                for head in range(self.heads):
                    nn.init.xavier_uniform_(weight[head])
        self.o_norm.reset_parameters()

    # ------------------------------------------------------------------------------------------------ pieces
    def _conv(self, conv: ShortConv | None, x: torch.Tensor, state: torch.Tensor | None):
        if conv is None:
            return x, x.new_zeros(x.shape[0], 0, x.shape[-1])
        return conv(x, state)

    def _query(self, x: torch.Tensor, conv_state: torch.Tensor | None):
        """q = l2(SiLU(conv_q(x W_q))), (B, T, H, d), and the new conv cache of the q path."""
        q, conv_state = self._conv(self.conv_q, self.w_q(x), conv_state)
        return l2_normalize(rearrange(F.silu(q), "b t (h d) -> b t h d", h=self.heads)), conv_state

    def _gates(self, x: torch.Tensor):
        """α, η (B, T, H) and θ (B, T, H, L) from sigmoid(x W_gate + b_gate); disabled gates are zeros."""
        raw = torch.sigmoid(rearrange(self.w_gate(x), "b t (h g) -> b t h g", h=self.heads))  # (B, T, H, n_gates)
        column = 0
        zeros = raw.new_zeros(raw.shape[:-1])
        alpha = eta = zeros
        if self.forget:
            alpha, column = raw[..., column], column + 1
        if self.momentum:
            eta, column = raw[..., column], column + 1
        return alpha, eta, self.theta_max * raw[..., column:]

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W_O(RMSNorm(y) ⊙ SiLU(x W_G)) for memory reads y (B, T, H, d) -> (B, T, D)."""
        y = rearrange(self.o_norm(y.to(x.dtype)), "b t h d -> b t (h d)")
        return self.w_o(y * F.silu(self.w_out_gate(x)))

    def initial_weights(self, batch: int) -> tuple:
        """M_0 broadcast over the batch: L tensors (B, H, in, out) (views; nothing is written into them)."""
        return tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in self.memory_weights)

    def read(self, x: torch.Tensor, weights: tuple, conv_state: torch.Tensor | None = None):
        """Read the memory with fixed weights and no update: W_O(RMSNorm(M_W(q)) ⊙ SiLU(x W_G)) (MAC, v1 eq. 21).

        x: (B, T, D); weights: L tensors (B, H, in, out); conv_state: (B, conv_size − 1, H·d) cache of this stream's
        q path, or None. Returns (h (B, T, D), new conv_state).
        """
        q, conv_state = self._query(x, conv_state)
        q = rearrange(q, "b t h d -> b h t d").to(weights[0].dtype)  # (B, H, T, d)
        y = q @ weights[0] if self.memory_depth == 1 else _memory_mlp(q, weights)  # (B, H, T, d)
        return self._output(rearrange(y, "b h t d -> b t h d"), x), conv_state

    # ------------------------------------------------------------------------------------------------ forward
    def state_shapes(self) -> dict:
        H, d = self.heads, self.head_dim
        weights = [tuple(w.shape) for w in self.memory_weights]  # (H, in, out) per memory layer
        return {"weights": weights, "momentum": weights, "pending_k": (None, H, d), "pending_v": (None, H, d),
                "pending_gates": (None, H, 2 + self.memory_depth), "conv": (max(self.conv_size - 1, 0), 3 * H * d)}

    def stack_states(self, states: list[TitansState]) -> TitansState:
        """The rows of ``states`` in one state; rows at different places of the chunk grid keep their own pending
        count in ``pending_rows``."""
        counts = torch.cat([pending_counts(state) for state in states])                # (B,)
        width = max(state.pending_k.shape[1] for state in states)
        padded = [state._replace(pending_k=left_pad_time(state.pending_k, width),
                                 pending_v=left_pad_time(state.pending_v, width),
                                 pending_gates=left_pad_time(state.pending_gates, width), pending_rows=None)
                  for state in states]
        stacked = cat_rows("TitansMemory", padded)
        return stacked if bool((counts == width).all()) else stacked._replace(pending_rows=counts)

    def _forward_apart(self, x: torch.Tensor, state: TitansState):
        """Rows at different places of the chunk grid: each group of rows with one pending count runs alone."""
        width = state.pending_k.shape[1]
        groups = []
        for count, rows in row_groups(state.pending_rows.tolist()).items():
            part = select_rows(state, rows)
            part = part._replace(pending_k=part.pending_k[:, width - count:],
                                 pending_v=part.pending_v[:, width - count:],
                                 pending_gates=part.pending_gates[:, width - count:], pending_rows=None)
            groups.append((rows, 0, part))
        return self.forward_row_groups(x, groups)

    def forward(self, x: torch.Tensor, state: TitansState | None = None, *, mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None):
        self.check_input(x)
        if mask is not None or cu_seqlens is not None:
            return self.forward_split(x, state, mask, cu_seqlens)
        self.check_state(state, x)
        if state is not None and state.pending_rows is not None:
            return self._forward_apart(x, state)
        B, T, D = x.shape
        if T == 0:  # nothing to absorb (ShortConv needs at least one token)
            return x.new_zeros(B, 0, D), (state if state is not None else self._empty_state(x))
        if T == 1 and state is not None and self.backend != "reference":  # decoding
            return self._step(x, state)
        inner = self.heads * self.head_dim
        conv_states = (None,) * 3 if state is None else state.conv.split(inner, dim=-1)
        q, conv_q = self._query(x, conv_states[0])
        k, conv_k = self._conv(self.conv_k, self.w_k(x), conv_states[1])
        v, conv_v = self._conv(self.conv_v, self.w_v(x), conv_states[2])
        k = l2_normalize(rearrange(F.silu(k), "b t (h d) -> b t h d", h=self.heads))  # (B, T, H, d)
        v = rearrange(F.silu(v), "b t (h d) -> b t h d", h=self.heads)  # (B, T, H, d)
        alpha, eta, theta = self._gates(x)  # (B, T, H), (B, T, H), (B, T, H, L)
        conv = torch.cat([conv_q, conv_k, conv_v], dim=-1)  # (B, conv_size − 1, 3·H·d)
        memory = None if state is None else tuple(state[:5])
        group = self.checkpoint_chunks * self.chunk_size
        if group == 0 or T <= group or not torch.is_grad_enabled():
            y, memory = self._memory(q, k, v, alpha, eta, theta, memory)
        else:  # groups of G chunks, aligned to the chunk grid of the stream, all but the last recomputed in backward
            pending = 0 if state is None else state.pending_k.shape[1]
            first = min(T, group - pending)  # pending < chunk_size <= group: realign to the chunk grid
            sizes = [first] + [group] * ((T - first) // group) + ([(T - first) % group] if (T - first) % group else [])
            # split, not slicing in the loop: each slice's backward would zero a full-size gradient (quadratic in T)
            groups = list(zip(*(t.split(sizes, dim=1) for t in (q, k, v, alpha, eta, theta))))
            pieces = []
            for index, inputs in enumerate(groups):
                # the last group keeps its graph: the backward starts there, so recomputing it would cost time and
                # save no peak memory (a recomputed group's graph is as large)
                run = self._memory if index == len(groups) - 1 else self._checkpointed_memory
                y, memory = run(*inputs, memory)
                pieces.append(y)
            y = torch.cat(pieces, dim=1)  # (B, T, H, d)
        return self._output(y, x), TitansState(*memory, conv)

    def _step(self, x: torch.Tensor, state: TitansState):
        """One token x (B, 1, D) after ``state``: the convs' one-token updates and the memory op's step."""
        x_t, H = x[:, 0], self.heads
        conv_states = state.conv.split(self.heads * self.head_dim, dim=-1)
        streams, caches = [], []
        for conv, w, cache in zip((self.conv_q, self.conv_k, self.conv_v), (self.w_q, self.w_k, self.w_v),
                                  conv_states):
            z = w(x_t)  # (B, H·d)
            if conv is not None:
                z, cache = conv.step(z, cache)
            streams.append(F.silu(z).unflatten(-1, (H, self.head_dim)))  # (B, H, d)
            caches.append(cache)
        q, k, v = l2_normalize(streams[0]), l2_normalize(streams[1]), streams[2]
        alpha, eta, theta = (gate[:, 0] for gate in self._gates(x))  # (B, H), (B, H), (B, H, L)
        if self.memory_depth == 1:
            (weights,), (momentum,), *pending = state[:5]
            y, memory = linear_memory_step(q, k, v, alpha, eta, theta[..., 0],
                                           LinearMemoryState(weights, momentum, *pending), self.chunk_size)
            memory = ((memory.memory,), (memory.momentum,), *memory[2:])
        else:
            y, memory = mlp_memory_step(q, k, v, alpha, eta, theta, list(self.memory_weights), self.chunk_size,
                                        MLPMemoryState(*state[:5]))
        return self._output(y[:, None], x), TitansState(*memory, torch.cat(caches, dim=-1))

    def _checkpointed_memory(self, q, k, v, alpha, eta, theta, memory):
        """``_memory`` on one group under reentrant checkpointing: its forward runs without building a graph, so
        a group's intermediates (per-chunk weights) are freed at once; the backward re-runs it with autograd.

        The reentrant form tracks gradients only through flat tensor arguments, so the memory pytree is flattened.
        """
        leaves, spec = tree_flatten(memory)
        out_spec = []

        def run(*tensors):
            state = tree_unflatten(list(tensors[6:]), spec)
            y, new_memory = self._memory(*tensors[:6], state)
            new_leaves, new_spec = tree_flatten(new_memory)
            out_spec[:] = [new_spec]
            return (y, *new_leaves)

        y, *new_leaves = checkpoint(run, q, k, v, alpha, eta, theta, *leaves, use_reentrant=True)
        return y, tree_unflatten(new_leaves, out_spec[0])

    def _memory(self, q, k, v, alpha, eta, theta, memory):
        """Absorb and read q, k, v (B, T, H, d); memory = (weights, momentum, pending k, v, gates) or None."""
        if self.memory_depth == 1:
            return self._linear_memory(q, k, v, alpha, eta, theta, memory)
        y, memory = titans_mlp_memory(q, k, v, alpha, eta, theta, list(self.memory_weights),
                                      chunk_size=self.chunk_size,
                                      initial_state=None if memory is None else MLPMemoryState(*memory),
                                      backend=self.backend)
        return y, tuple(memory)

    def _linear_memory(self, q, k, v, alpha, eta, theta, memory):
        """Matrix memory through :func:`titans_linear_memory`, which carries the pending tokens in its state.

        Returns (y (B, T, H, d), (weights, momentum, pending k, v, gates)) in the layout of ``_memory``.
        """
        if memory is None:
            weights = self.initial_weights(q.shape[0])[0]
            initial = (weights, torch.zeros_like(weights, dtype=compute_dtype(q)))
        else:
            (weights,), (momentum,), *pending = memory
            initial = LinearMemoryState(weights, momentum, *pending)
        y, state = titans_linear_memory(q, k, v, alpha, eta, theta[..., 0], chunk_size=self.chunk_size,
                                        initial_state=initial, backend=self.backend)
        return y, ((state.memory,), (state.momentum,), state.pending_k, state.pending_v, state.pending_gates)

    def _empty_state(self, x: torch.Tensor) -> TitansState:
        """The state of a fresh sequence (returned for an empty first call)."""
        B = x.shape[0]
        dtype = compute_dtype(x)
        weights = tuple(w.to(dtype) for w in self.initial_weights(B))
        inner = self.heads * self.head_dim
        empty = x.new_zeros(B, 0, self.heads, self.head_dim)
        return TitansState(weights, tuple(torch.zeros_like(w) for w in weights), empty, empty.clone(),
                           x.new_zeros(B, 0, self.heads, 2 + self.memory_depth, dtype=dtype),
                           x.new_zeros(B, max(self.conv_size - 1, 0), 3 * inner))


def pending_counts(state: TitansState) -> torch.Tensor:
    """(B,) long: each row's number of pending tokens."""
    if state.pending_rows is not None:
        return state.pending_rows
    B, p = state.pending_k.shape[:2]
    return torch.full((B,), p, dtype=torch.long, device=state.pending_k.device)


__all__ = ["TitansMemory", "TitansState"]

"""``Mixer``: the base class every sequence mixer derives from, and what it declares about itself.

A mixer maps ``x (B, T, D)`` to ``(y (B, T, D), state)`` (the contract is in ``docs/adding-a-mixer.md``). What the rest
of zoo needs to know about a mixer it reads from these class attributes, never from ``inspect`` or ``isinstance``:

- ``causal``: no output depends on a later input, and the returned state continues the sequence. A constructor option
  may decide it per instance (``Attention(causal=False)`` sets ``self.causal``).
- ``has_causal_option``: the constructor takes ``causal=`` (the embedding model builds such mixers bidirectional).
- ``takes_mask``: ``forward`` accepts ``mask (B, T)`` (True = a real token) for padded batches; a causal mixer takes
  left padding only (each row False...False True...True), and its pads leave the state untouched.
- ``takes_cu_seqlens``: ``forward`` accepts ``cu_seqlens`` (int64 (N + 1,) = [0, ..., T], B == 1): documents packed
  along time, each run as if alone; the state then holds one row per document (the FlashAttention / fla convention).
- ``State``: the state type ``forward`` returns (a NamedTuple of batch-first tensors), or None for mixers without one.

``forward`` starts with ``self.check_input(x)`` and ``self.check_state(state, x)``, which checks the fields that
``state_shapes()`` names: shape and type checks only (no tensor values), so they cost nothing measurable and keep
``torch.compile(fullgraph=True)``. A causal mixer handles ``mask`` and ``cu_seqlens`` with ``self.forward_split``
(or natively), which runs each group of equally padded rows, or each document, on its real tokens alone.

    class MyMixer(Mixer):
        causal, has_causal_option, takes_mask, takes_cu_seqlens, State = True, False, True, True, MyState
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from zoo.kernels._common import check_cu_seqlens


class Mixer(nn.Module):
    """Base of the sequence mixers: ``forward(x (B, T, D), state=None) -> (y (B, T, D), state)``."""

    causal: bool = True
    has_causal_option: ClassVar[bool] = False
    takes_mask: ClassVar[bool] = False
    takes_cu_seqlens: ClassVar[bool] = False
    State: ClassVar[type | None] = None

    def check_input(self, x) -> None:
        """Raise a ValueError unless x is a floating-point (B, T, dim) tensor."""
        name, expected = type(self).__name__, f"a floating-point (B, T, {self.dim}) tensor for dim={self.dim}"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: x must be {expected}, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must be {expected}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: x must be {expected}, got dtype {x.dtype}")

    def state_shapes(self) -> dict:
        """What ``check_state`` checks per field of ``State``: its dims after the batch dim (None matches any size), a
        list of those for a tuple of tensors, or the sub-mixer whose state the field holds. Every tensor's batch size is
        checked whether named here or not."""
        return {}

    def check_state(self, state, x: torch.Tensor, batch: int | None = None) -> None:
        """Raise a ValueError unless state is None or a ``self.State`` whose tensors all have ``batch`` rows (default
        x's) and whose fields have the dims ``state_shapes()`` gives."""
        if state is None:
            return
        name = type(self).__name__
        if not self.causal or self.State is None:
            raise ValueError(f"{name} is not causal and carries no state; call it on whole sequences (state=None)")
        if type(state) is not self.State:
            raise ValueError(f"{name}: state must be the {self.State.__name__} that {name} returned, "
                             f"got {type(state).__name__}")
        _check_batch(name, state, "state", x.shape[0] if batch is None else batch)
        _check_fields(name, self, state, "state")

    def stack_states(self, states: list):
        """One state of all rows of ``states`` (each a ``self.State``), in order; rows must agree in every shape
        (a KV cache overrides this to left-pad shorter caches with invisible keys). A field that ``state_shapes()``
        names a sub-mixer's state is stacked by that sub-mixer."""
        name, subs = type(self).__name__, {f: s for f, s in self.state_shapes().items() if isinstance(s, Mixer)}
        if not subs:
            return cat_rows(name, states)
        return self.State(*(subs[field].stack_states(column) if field in subs else cat_rows(name, column)
                            for field, column in zip(self.State._fields, map(list, zip(*states)))))

    def forward_split(self, x: torch.Tensor, state=None, mask: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None):
        """``forward`` of a left-padded batch (``mask``) or of packed documents (``cu_seqlens``), built from plain
        ``forward`` calls: each group of rows with the same padding, or each document, runs alone on its real tokens.
        Pads get output 0 and leave their row's state untouched."""
        if mask is not None and cu_seqlens is not None:
            raise ValueError(f"{type(self).__name__}: pass either mask (padded rows) or cu_seqlens (packed "
                             f"documents), not both")
        if cu_seqlens is not None:
            return self._forward_documents(x, state, cu_seqlens)
        return self._forward_padded(x, state, mask)

    def _forward_documents(self, x: torch.Tensor, state, cu_seqlens: torch.Tensor):
        bounds = document_bounds(type(self).__name__, cu_seqlens, x)
        self.check_state(state, x, batch=len(bounds) - 1)
        outputs, states = [], []
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            y, doc_state = self.forward(x[:, start:end], None if state is None else select_rows(state, [k]))
            outputs.append(y)
            states.append(doc_state)
        return torch.cat(outputs, dim=1), self.stack_states(states)

    def _forward_padded(self, x: torch.Tensor, state, mask: torch.Tensor):
        starts = left_padding_starts(type(self).__name__, mask, x)
        if not any(starts):
            return self.forward(x, state)
        self.check_state(state, x)
        T = x.shape[1]
        groups: dict[int, list[int]] = {}
        for row, start in enumerate(starts):
            groups.setdefault(start, []).append(row)
        if T in groups and state is None:
            raise ValueError(f"{type(self).__name__}: rows {groups[T]} of mask hold no real token and there is no "
                             f"state to keep; give every row at least one real token")
        return self.forward_row_groups(x, [(rows, start, None if state is None else select_rows(state, rows))
                                           for start, rows in sorted(groups.items())])

    def forward_row_groups(self, x: torch.Tensor, groups: list):
        """``forward`` of x (B, T, D) as groups of rows, each ``(rows, start, state)``: the rows run alone on
        ``x[rows, start:]`` from ``state`` (outputs before start are 0; start == T keeps the state as it is), and
        the groups' states are stacked back in row order."""
        B, T = x.shape[:2]
        y, order, states = None, [], []
        for rows, start, state in groups:
            index = torch.tensor(rows, device=x.device)
            if start < T:
                out, state = self.forward(x[index, start:], state)
                if y is None:
                    y = out.new_zeros(B, T, out.shape[-1])                          # (B, T, D), 0 at the pads
                y = y.index_put((index.unsqueeze(1), torch.arange(start, T, device=x.device)), out)
            states.append(state)
            order.extend(rows)
        inverse = torch.empty(B, dtype=torch.long, device=x.device)
        inverse[torch.tensor(order, device=x.device)] = torch.arange(B, device=x.device)
        y = x.new_zeros(B, T, x.shape[-1]) if y is None else y
        return y, select_rows(self.stack_states(states), inverse)


def document_bounds(name: str, cu_seqlens, x: torch.Tensor) -> list[int]:
    """The document boundaries [0, ..., T] of ``cu_seqlens`` as ints, or one ValueError naming what is wrong: a 1-D
    int tensor on x's device, B == 1, starting at 0, strictly increasing (no empty document), ending at T."""
    check_cu_seqlens(name, cu_seqlens, x.shape[0], x.shape[1], x.device)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[1] or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{name}: cu_seqlens must increase strictly from 0 to T={x.shape[1]} (every document holds "
                         f"a token), got {bounds}")
    return bounds


def left_padding_starts(name: str, mask, x: torch.Tensor) -> list[int]:
    """Per row of a left-padding ``mask`` (B, T) bool, the index of its first real token (T for a row of pads);
    one ValueError unless mask is (B, T) bool with each row False...False True...True."""
    B, T = x.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.shape != (B, T) or mask.dtype != torch.bool:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: mask must be a bool (B, T) = {(B, T)} tensor (True = real token), got {got}")
    real = mask.long()
    starts = T - real.sum(dim=1)                                                        # (B,)
    positions = torch.arange(T, device=mask.device)
    if not bool((mask == (positions >= starts.unsqueeze(1))).all()):
        raise ValueError(f"{name}: mask must be left padding (each row False...False True...True); pad on the left, "
                         f"or run rows with other padding separately")
    return starts.tolist()


def select_rows(state, index):
    """``state`` (a NamedTuple of batch-first tensors, possibly nested; None fields stay None) at batch rows
    ``index`` (a list or long tensor)."""
    if isinstance(state, torch.Tensor):
        return state[index] if state.dim() else state
    if isinstance(state, tuple):
        items = [select_rows(item, index) for item in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def row_groups(counts: list[int]) -> dict[int, list[int]]:
    """{count: the rows that have it}, by increasing count."""
    groups: dict[int, list[int]] = {}
    for row, count in enumerate(counts):
        groups.setdefault(count, []).append(row)
    return dict(sorted(groups.items()))


def left_pad_time(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """tensor (B, t, ...) with zeros prepended along time to (B, width, ...)."""
    missing = width - tensor.shape[1]
    if not missing:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:]), tensor], dim=1)


def cat_rows(name: str, states: list):
    """The rows of ``states`` (states of one type) concatenated along the batch; one ValueError when two rows
    disagree in a shape (e.g. positions inside a segment) and so cannot share one state."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        if any(s.shape[1:] != first.shape[1:] for s in states):
            raise ValueError(f"{name}: rows whose states differ in shape ({sorted({tuple(s.shape) for s in states})}) "
                             f"cannot share one batch state; run them in separate batches")
        return torch.cat(states, dim=0)
    if isinstance(first, tuple):
        if any(s is None for s in states):
            raise ValueError(f"{name}: rows whose states differ (some unset) cannot share one batch state; run them "
                             f"in separate batches")
        items = [cat_rows(name, [s[i] for s in states]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if any(s is not None for s in states):
        raise ValueError(f"{name}: rows whose states differ (some unset) cannot share one batch state; run them in "
                         f"separate batches")
    return first


def _check_fields(name: str, mixer: Mixer, state, path: str) -> None:
    """The fields of ``state`` (a ``mixer.State``) have the dims ``mixer.state_shapes()`` gives."""
    for field, spec in mixer.state_shapes().items():
        value = getattr(state, field)
        if isinstance(spec, Mixer):
            if value is None:  # the sub-mixer starts fresh
                continue
            if type(value) is not spec.State:
                raise ValueError(f"{name}: {path}.{field} must be the {spec.State.__name__} that "
                                 f"{type(spec).__name__} returned, got {type(value).__name__}")
            _check_fields(name, spec, value, f"{path}.{field}")
        elif isinstance(spec, list):
            if not isinstance(value, tuple) or len(value) != len(spec):
                raise ValueError(f"{name}: {path}.{field} must be a tuple of {len(spec)} tensors, got "
                                 f"{_describe(value)}; pass the state {name} returned")
            for i, (tensor, shape) in enumerate(zip(value, spec)):
                _check_trailing(name, tensor, f"{path}.{field}", shape, index=i)
        else:
            _check_trailing(name, value, f"{path}.{field}", spec)


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_batch(name: str, value, path: str, batch: int) -> None:
    """Every tensor of at least one dim in value (a tensor or nested tuples) has ``batch`` rows."""
    wrong = _off_batch(value, batch)
    if wrong is not None:
        where, rows = wrong
        raise ValueError(f"{name}: {path}{where} has batch size {rows}, expected {batch} (one row per sequence of x); "
                         f"pass the state returned for this batch")


def _off_batch(value, batch: int) -> tuple[str, int] | None:
    """(where inside value, its rows) of the first tensor without ``batch`` rows, or None (the path is built only
    for the error, keeping the check cheap)."""
    if isinstance(value, torch.Tensor):
        return ("", value.shape[0]) if value.dim() and value.shape[0] != batch else None
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            wrong = _off_batch(item, batch)
            if wrong is not None:
                fields = getattr(value, "_fields", None)
                return (f".{fields[i]}" if fields else f"[{i}]") + wrong[0], wrong[1]
    return None


def _check_trailing(name: str, tensor, path: str, shape: tuple, index: int | None = None) -> None:
    """tensor (``path``, or its item ``index``) is a tensor of shape (batch, *shape), None in shape matching any
    size."""
    if isinstance(tensor, torch.Tensor) and tensor.dim() == len(shape) + 1:
        for got, size in zip(tensor.shape[1:], shape):
            if size is not None and got != size:
                break
        else:
            return
    expected = "(B, " + ", ".join("*" if size is None else str(size) for size in shape) + ")"
    where = path if index is None else f"{path}[{index}]"
    raise ValueError(f"{name}: {where} must have shape {expected} for this layer, got {_describe(tensor)}; "
                     f"pass the state {name} returned")


def combine_aux_losses(terms: list) -> torch.Tensor | None:
    """One auxiliary loss from the ``aux_loss`` fields of block states (of one or several backbone calls), or None.

    The mean over loss terms: each 0-dim tensor is one term, and the pooled terms of one kind (objects whose type has
    ``pool(terms) -> 0-dim tensor``, MoM's global load balance) give one term together.
    """
    losses = [term for term in terms if isinstance(term, torch.Tensor)]
    pooled: dict[type, list] = {}
    for term in terms:
        if not isinstance(term, torch.Tensor):
            pooled.setdefault(type(term), []).append(term)
    losses += [kind.pool(group) for kind, group in pooled.items()]
    if not losses:
        return None
    dtype = torch.promote_types(torch.float32, losses[0].dtype)                      # at least fp32, fp64 stays
    return torch.stack([loss.to(dtype) for loss in losses]).mean()

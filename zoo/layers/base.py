"""``Mixer``: the base class every sequence mixer derives from, and what it declares about itself.

A mixer maps ``x (B, T, D)`` to ``(y (B, T, D), state)`` (the contract is in ``docs/adding-a-mixer.md``). What the rest
of zoo needs to know about a mixer it reads from these class attributes, never from ``inspect`` or ``isinstance``:

- ``causal``: no output depends on a later input, and the returned state continues the sequence. A constructor option
  may decide it per instance (``Attention(causal=False)`` sets ``self.causal``).
- ``has_causal_option``: the constructor takes ``causal=`` (the embedding model builds such mixers bidirectional).
- ``takes_mask``: ``forward`` accepts ``mask (B, T)`` (True = a real token) for padded batches.
- ``State``: the state type ``forward`` returns (a NamedTuple of batch-first tensors), or None for mixers without one.

``forward`` starts with ``self.check_input(x)`` and ``self.check_state(state, x)``, which checks the fields that
``state_shapes()`` names: shape and type checks only (no tensor values), so they cost nothing measurable and keep
``torch.compile(fullgraph=True)``.

    class MyMixer(Mixer):
        causal, has_causal_option, takes_mask, State = True, False, False, MyState
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Mixer(nn.Module):
    """Base of the sequence mixers: ``forward(x (B, T, D), state=None) -> (y (B, T, D), state)``."""

    causal: bool = True
    has_causal_option: ClassVar[bool] = False
    takes_mask: ClassVar[bool] = False
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

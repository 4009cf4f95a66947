"""``Mixer``: the base class every sequence mixer derives from, and what it declares about itself.

A mixer maps ``x (B, T, D)`` to ``(y (B, T, D), state)`` (the contract is in ``docs/adding-a-mixer.md``). What the rest
of zoo needs to know about a mixer it reads from these class attributes, never from ``inspect`` or ``isinstance``:

- ``causal``: no output depends on a later input, and the returned state continues the sequence. A constructor option
  may decide it per instance (``Attention(causal=False)`` sets ``self.causal``).
- ``has_causal_option``: the constructor takes ``causal=`` (the embedding model builds such mixers bidirectional).
- ``takes_mask``: ``forward`` accepts ``mask (B, T)`` (True = a real token) for padded batches.
- ``State``: the state type ``forward`` returns (a NamedTuple of batch-first tensors), or None for mixers without one.

    class MyMixer(Mixer):
        causal, has_causal_option, takes_mask, State = True, False, False, MyState
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn


class Mixer(nn.Module):
    """Base of the sequence mixers: ``forward(x (B, T, D), state=None) -> (y (B, T, D), state)``."""

    causal: bool = True
    has_causal_option: ClassVar[bool] = False
    takes_mask: ClassVar[bool] = False
    State: ClassVar[type | None] = None

"""Batch-row operations on model states: every zoo state is a tree of batch-first tensors (docs/interop.md#cache).

A state is what ``model(ids, state)`` returns: None, a tensor, a tuple (NamedTuple states included), a list, a dict
or a dataclass (``HMTState``) of these. Tensors of one or more dimensions hold one row per batch element in dim 0;
0-dim tensors (a loss) and plain values (counters shared by all rows) are shared.

    from zoo.models.state import select_rows
    state = select_rows(state, torch.tensor([1, 1, 0]))    # beam search: rows 1, 1, 0 of the old batch
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["select_rows", "state_batch_size"]


def _tensors(value):
    """Every tensor in a state tree, depth first."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


def state_batch_size(state) -> int | None:
    """The number of rows of ``state`` (dim 0 of its batched tensors), or None when it holds none.

    Raises ValueError when two batched tensors disagree (a state that is not batch-first).
    """
    sizes = {tensor.shape[0] for tensor in _tensors(state) if tensor.dim() > 0}
    if len(sizes) > 1:
        raise ValueError(f"select_rows: the state's tensors have different leading sizes {sorted(sizes)}; every "
                         f"batched tensor of a zoo state must be batch-first")
    return sizes.pop() if sizes else None


def _select(value, index: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device)) if value.dim() > 0 else value
    if isinstance(value, tuple):
        items = [_select(item, index) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_select(item, index) for item in value]
    if isinstance(value, dict):
        return {key: _select(item, index) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _select(getattr(value, f.name), index)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def select_rows(state, index: torch.Tensor):
    """The state of the batch whose row i is row ``index[i]`` of ``state``'s batch: index Long (B',), any B'.

    Rows may repeat or drop (beam search reorders, a finished row leaves); shared values pass through unchanged.
    """
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"select_rows: index must be a 1-d integer tensor of row numbers, got dtype {index.dtype} "
                         f"shape {tuple(index.shape)}")
    rows = state_batch_size(state)
    if rows is not None and index.numel() and not (0 <= int(index.min()) and int(index.max()) < rows):
        raise ValueError(f"select_rows: index holds rows {int(index.min())}..{int(index.max())}, the state has "
                         f"{rows} rows (0..{rows - 1})")
    return _select(state, index)

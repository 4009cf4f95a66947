"""Per-block training transforms applied in ``Task.configure_model``: activation checkpointing (each ``Block``
recomputed in backward) and FSDP2 sharding (``fully_shard`` on every ``Block``, then on the root)."""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _blocks(model: torch.nn.Module) -> list:
    from zoo.models import Block

    return [module for module in model.modules() if isinstance(module, Block)]


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Make every ``Block`` recompute its forward in backward (non-reentrant ``torch.utils.checkpoint``, the RNG state
    replayed so dropout matches); parameters and state-dict keys are unchanged. Returns the number of blocks."""
    blocks = _blocks(model)
    for block in blocks:
        if not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def shard_blocks(model: torch.nn.Module, mesh) -> None:
    """FSDP2: ``fully_shard`` every ``Block`` over the data-parallel ``mesh``, then the root (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unsharded_model(model: torch.nn.Module, config) -> torch.nn.Module:
    """A plain copy of a sharded model with its full weights on CPU, for export (collective: every rank calls it;
    rank 0 gets the copy, the others get ``model`` back)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from zoo.models import build_model

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return model
    plain = build_model(config, device="cpu")
    plain.load_state_dict(state)
    return plain

"""Weight files in, strict state-dict loading out, with one-line errors: the floor that checkpoints, models and the
Hugging Face importer share (it imports nothing else of zoo but ``zoo.errors``).

    state = read_safetensors(Path("checkpoints/titans-mqar/model.safetensors"))
    load_state_checked(model, state, "checkpoints/titans-mqar")     # CheckpointError naming every misfit
"""
from __future__ import annotations

from pathlib import Path

import torch

from zoo.errors import CheckpointError

__all__ = ["file_size", "load_state_checked", "read_ckpt", "read_safetensors", "state_mismatches"]

SHOWN_KEYS = 5


def file_size(path: Path) -> str:
    """``path``'s size for an error message, e.g. "1,024 bytes"."""
    return f"{path.stat().st_size:,} bytes"


def read_ckpt(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; give a training checkpoint such as "
                              f"{path / 'last.ckpt'}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for the same kinds of damage
        text = str(error)
        if "Unsupported global" in text or "Unsupported operand" in text:
            raise CheckpointError(f"checkpoint {path} holds Python objects zoo does not load "
                                  f"(written by another program?)") from None
        raise CheckpointError(f"checkpoint {path} ({file_size(path)}) is truncated or corrupted") from None


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict:
    """The tensors of a ``.safetensors`` file, with a one-line error for a damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path} ({file_size(path)}) is truncated or corrupted: header unreadable "
                              f"({str(error).splitlines()[0][:80]})") from None


def _listed(keys: list[str]) -> str:
    """The first few keys, and how many there are when some are left out."""
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")


def state_mismatches(own: dict, saved: dict, unexpected: list[str] | None = None) -> list[str]:
    """What keeps ``saved`` from loading into a model whose state is ``own``: missing keys, unexpected keys (default:
    every saved key the model lacks) and shape mismatches, the first five of each; empty when it fits."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own] if unexpected is None else unexpected
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (saved vs model): {'; '.join(shapes[:SHOWN_KEYS])}")
    return parts


def load_state_checked(model: torch.nn.Module, state: dict, source: str, config_diff: str = "") -> None:
    """``load_state_dict(strict=True)`` whose failure lists missing/unexpected keys and shape mismatches in one line.

    Tensors are cast to the dtype of the parameter they load into (an fp16 file into an fp32 model).
    """
    parts = state_mismatches(model.state_dict(), state)
    if parts:
        if config_diff:
            parts.append(f"config differs: {config_diff}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)

"""Export directories (``config.json`` + ``model.safetensors``) and loading them back, with one-line errors.

``.ckpt`` files are for resuming only; everything that loads a model for use reads an export directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from zoo.config import Config, from_dict, to_dict
from zoo.errors import CheckpointError



def _size(path: Path) -> str:
    return f"{path.stat().st_size:,} bytes"


def read_ckpt(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for the same kinds of damage
        text = str(error)
        if "Unsupported global" in text or "Unsupported operand" in text:
            raise CheckpointError(f"checkpoint {path} holds Python objects zoo does not load "
                                  f"(written by another program?)") from None
        raise CheckpointError(f"checkpoint {path} ({_size(path)}) is truncated or corrupted") from None


def config_from_ckpt(checkpoint: dict, path: Path) -> Config:
    """The run config stored in a training checkpoint's hyper-parameters."""
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams:
        raise CheckpointError(f"checkpoint {path} has no zoo config in its hyper-parameters (not written by zoo train?)")
    return from_dict(hparams["config"])


def model_state_from_ckpt(checkpoint: dict) -> dict:
    """The model's state dict from a LightningModule checkpoint (``model.`` prefix stripped)."""
    state = checkpoint.get("state_dict", {})
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def state_mismatches(own: dict, saved: dict, unexpected: list[str] | None = None) -> list[str]:
    """What keeps ``saved`` from loading into a model whose state is ``own``: missing keys, unexpected keys (default:
    every saved key the model lacks) and shape mismatches, the first five of each; empty when it fits."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own] if unexpected is None else unexpected
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if shapes:
        parts.append(f"shape mismatches (saved vs model): {'; '.join(shapes[:5])}")
    return parts


def load_state_checked(model: torch.nn.Module, state: dict, source: str, config_diff: str = "") -> None:
    """``load_state_dict(strict=True)`` whose failure lists missing/unexpected keys and shape mismatches in one line."""
    own = model.state_dict()
    parts = state_mismatches(own, state)
    if parts:
        if config_diff:
            parts.append(f"config differs: {config_diff}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def export_model(model: torch.nn.Module, config: Config, out: str | Path) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` atomically (temporary sibling, then rename)."""
    from safetensors.torch import save_model

    import zoo

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        payload = {"architecture": type(model).__name__, "zoo_version": zoo.__version__, **to_dict(config)}
        (tmp / "config.json").write_text(json.dumps(payload, indent=2) + "\n")
        metadata = {"format": "pt", "zoo_version": zoo.__version__, "architecture": type(model).__name__}
        save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_from_ckpt(ckpt_path: str | Path, out: str | Path) -> Path:
    """``zoo export``: rebuild the model from a training checkpoint and write an export directory."""
    from zoo.models import build_model

    ckpt_path = Path(ckpt_path)
    checkpoint = read_ckpt(ckpt_path)
    config = config_from_ckpt(checkpoint, ckpt_path)
    model = build_model(config)
    load_state_checked(model, model_state_from_ckpt(checkpoint), f"checkpoint {ckpt_path}")
    return export_model(model, config, out)


def read_export_config(path: str | Path) -> Config:
    """The ``Config`` of an export directory, with one-line errors for missing pieces."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (not a directory); zoo list shows shipped checkpoints")
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name} (found: {found})")
    try:
        data = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path / 'config.json'} ({_size(path / 'config.json')}) is not valid JSON") from None
    data.pop("architecture", None)
    data.pop("zoo_version", None)
    return from_dict(data)


def load_export(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``zoo.load``: build the model from ``config.json`` and load ``model.safetensors`` (strict)."""
    from zoo.hf_import import foreign_format, load_foreign
    from zoo.models import build_model

    path = Path(path)
    if path.is_dir() and foreign_format(path):  # Hugging Face / mamba_ssm Mamba directories
        return load_foreign(path, device)
    config = read_export_config(path)
    state = read_export_state(path, device)
    model = build_model(config).to(device)
    load_state_checked(model, state, f"{path / 'model.safetensors'}")
    model.eval()
    return model


def read_export_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The weights of an export directory, with one-line errors for a missing or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_export_config(path)
    weights = Path(path) / "model.safetensors"
    try:
        return load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{weights} ({_size(weights)}) is truncated or corrupted: header unreadable "
                              f"({str(error).splitlines()[0][:80]})") from None


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """``init_from=DIR``: initialise ``model`` from an export's weights before training.

    A model with a ``load_init_state(state, source)`` method decides what it takes (an embedder takes an LM's
    backbone without its head); any other model loads the export strictly.
    """
    source = f"init_from={path}"
    if not Path(path).is_dir():
        raise CheckpointError(f"{source}: no export directory there; run the training that writes it first "
                              f"(a config with init_from names it in its comments), or set init_from=null")
    state = read_export_state(path)
    if hasattr(model, "load_init_state"):
        model.load_init_state(state, source)
    else:
        load_state_checked(model, state, source)

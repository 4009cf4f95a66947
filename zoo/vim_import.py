"""Read hustvl Vision Mamba (Vim) ``.pth`` checkpoints into zoo's ``VisionClassifier``.

A Vim checkpoint is a dict with ``model`` (the state dict) and ``args`` (the training script's argparse
``Namespace``: ``model`` names the architecture, ``input_size`` the image side). It is read with
``torch.load(weights_only=True)`` allowing exactly one class besides tensors and containers, ``argparse.Namespace``
(never an unrestricted unpickle). Sizes come from the weights: width and patch from ``patch_embed.proj``, depth from
the layers, the patch stride from the number of positions (the stride-8 models overlap 16-pixel patches); the model
name must say bimamba v2, a middle class token, absolute positions and averaged directions ("div2"), which is what
zoo's ``bimamba`` blocks compute (docs/interop.md#importing-fla-and-vim-checkpoints).

    model = zoo.load("vim_t_midclstok_76p1acc.pth")          # a zoo VisionClassifier
"""
from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

import torch

from zoo.errors import CheckpointError
from zoo.state_dict import load_state_checked

__all__ = ["is_vim_checkpoint", "load_vim"]

REQUIRED_NAME_PARTS = {"bimambav2": "bidirectional Mamba v2 blocks", "midclstok": "a middle class token",
                       "abs_pos_embed": "absolute position embeddings", "div2": "averaged directions"}


def is_vim_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a ``.pth`` file (the form Vim's checkpoints take)."""
    return Path(path).is_file() and Path(path).suffix == ".pth"


def read_vim(path: Path) -> tuple[dict, argparse.Namespace]:
    """(state dict, args) of a Vim checkpoint, unpickling tensors, containers and ``argparse.Namespace`` only."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else "unpickling failed"
        raise CheckpointError(f"{path} holds objects other than tensors, containers and argparse.Namespace, which "
                              f"zoo does not unpickle ({first[:120]})") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({str(error).splitlines()[0][:120]})") \
            from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "args" not in checkpoint:
        found = ", ".join(sorted(map(str, checkpoint))) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a Vim checkpoint (a dict with 'model' and 'args'; found: {found})")
    if not isinstance(checkpoint["args"], argparse.Namespace):
        raise CheckpointError(f"{path}: 'args' is a {type(checkpoint['args']).__name__}, not Vim's argparse Namespace")
    return checkpoint["model"], checkpoint["args"]


def _model_config(state: dict, args: argparse.Namespace, path: Path):
    """The zoo ``ModelConfig`` of a Vim checkpoint, with a one-line refusal naming what zoo cannot express."""
    from zoo.config import MambaConfig, ModelConfig, VisionConfig

    name = str(getattr(args, "model", ""))
    for part, what in REQUIRED_NAME_PARTS.items():
        if part not in name:
            raise CheckpointError(f"{path}: args.model={name!r} lacks '{part}' ({what}); zoo's VisionClassifier "
                                  f"reads Vim models with {', '.join(REQUIRED_NAME_PARTS)}")
    if "rope" in name:
        raise CheckpointError(f"{path}: args.model={name!r} uses rotary positions, which zoo's VisionClassifier lacks")
    try:
        patch = state["patch_embed.proj.weight"]                      # (D, C, p, p)
        positions = state["pos_embed"].shape[1] - 1                   # M patches (+ the class token)
        in_proj, A_log = state["layers.0.mixer.in_proj.weight"], state["layers.0.mixer.A_log"]
        conv, dt_proj = state["layers.0.mixer.conv1d.weight"], state["layers.0.mixer.dt_proj.weight"]
        classes = state["head.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"{path}: the state dict has no {error.args[0]} (not a Vim model?)") from None
    if "layers.0.norm.bias" in state:
        raise CheckpointError(f"{path}: the blocks use LayerNorm (rms_norm=False); zoo's blocks use RMSNorm")
    dim, image = patch.shape[0], int(getattr(args, "input_size", 224))
    side = math.isqrt(positions)
    if side * side != positions or side < 1:
        raise CheckpointError(f"{path}: pos_embed holds {positions} patch positions, not a square grid")
    stride = patch.shape[2] if side == 1 else (image - patch.shape[2]) // (side - 1)
    if (image - patch.shape[2]) != stride * (side - 1):
        raise CheckpointError(f"{path}: args.input_size={image} with {patch.shape[2]}-pixel patches does not give the "
                              f"{side}x{side} positions of pos_embed")
    depth = len({key.split(".")[1] for key in state if key.startswith("layers.")})
    config = ModelConfig(architecture="vision", dim=dim, depth=depth, pattern=["bimamba"], mlp="none",
                         norm_eps=float(getattr(args, "norm_epsilon", 1e-5)))
    config.mamba = MambaConfig(d_state=A_log.shape[1], d_conv=conv.shape[-1], expand=in_proj.shape[0] // (2 * dim),
                               dt_rank=dt_proj.shape[1])
    config.vision = VisionConfig(image_size=image, channels=patch.shape[1], patch_size=patch.shape[2],
                                 patch_stride=None if stride == patch.shape[2] else stride, num_classes=classes)
    return config


def _map_keys(state: dict) -> dict:
    """Vim keys -> zoo ``VisionClassifier`` keys."""
    fixed = {"patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias",
             "cls_token": "class_token", "pos_embed": "position", "norm_f.weight": "norm.weight"}
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith("layers."):
            index, _, rest = key[len("layers."):].partition(".")
            out[f"blocks.{index}.{'mixer_norm.weight' if rest == 'norm.weight' else rest}"] = value
        else:
            out[key] = value  # head.*; anything else is reported by the check
    return out


def load_vim(path: str | Path, device: str | torch.device = "cpu"):
    """Load a hustvl Vim ``.pth`` checkpoint as a zoo ``VisionClassifier`` (fp32, eval mode)."""
    from zoo.models import build_model

    path = Path(path)
    state, args = read_vim(path)
    state = {key: value.float() for key, value in state.items()}
    config = _model_config(state, args, path)
    model = build_model(config, device=device)
    load_state_checked(model, _map_keys(state), str(path))
    model.eval()
    return model

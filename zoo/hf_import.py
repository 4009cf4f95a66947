"""Read Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` and ``mamba_ssm`` checkpoints into zoo's LM.

Detection is by ``config.json``: ``model_type`` "mamba" / "mamba2" (Hugging Face), or ``d_model`` + ``ssm_cfg``
(``mamba_ssm``'s ``MambaLMHeadModel``). Weights come from ``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``. The zoo's Mamba mixers use the same parameter names, so
the per-layer key map is the identity under ``backbone.layers.{i}.mixer.``; only the block norm, the embedding
(``embeddings`` in HF, ``embedding`` in mamba_ssm), the final norm and the head move. Every shape is checked.

    model = zoo.load("path/to/mamba-130m-hf")       # a zoo LanguageModel: mixer-only blocks, model.mlp=none
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from zoo.errors import CheckpointError
from zoo.state_dict import file_size, load_state_checked, read_ckpt, read_safetensors

__all__ = ["foreign_format", "load_foreign"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} ({file_size(path)}) is not valid JSON") from None


def foreign_format(path: str | Path) -> str | None:
    """"hf", "mamba_ssm" or "unknown" when ``path/config.json`` is not a zoo export config, else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    data = _read_json(config_file)
    if not isinstance(data, dict):
        return None
    if data.get("model_type") == "zoo":
        return None  # a zoo export that transformers reads too (zoo.hf)
    if "model_type" in data or "architectures" in data:
        return "hf"
    if "d_model" in data and "ssm_cfg" in data:
        return "mamba_ssm"
    if "model" not in data:
        return "unknown"  # not the zoo schema either: load_foreign names the fields found
    return None


# ---------------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------------
def _refuse(config_file: Path, field: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{config_file}: {field}={value!r} is not supported ({why})")


def _json_float(value) -> float:
    """A float from config.json, including transformers' ``{"__float__": "Infinity"}`` encoding."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _check_common_hf(data: dict, config_file: Path) -> None:
    if data.get("use_bias", False):
        raise _refuse(config_file, "use_bias", data["use_bias"], "zoo's Mamba projections have no bias")
    if not data.get("use_conv_bias", True):
        raise _refuse(config_file, "use_conv_bias", data["use_conv_bias"], "zoo's Mamba conv has a bias")
    if data.get("hidden_act", "silu") != "silu":
        raise _refuse(config_file, "hidden_act", data["hidden_act"], "zoo's Mamba uses silu")
    if not data.get("rms_norm", True):
        raise _refuse(config_file, "rms_norm", data["rms_norm"], "zoo's blocks use RMSNorm")
    limit = [_json_float(v) for v in (data.get("time_step_limit") or (0.0, float("inf")))]
    if len(limit) != 2 or limit[0] != 0.0 or not (math.isinf(limit[1]) and limit[1] > 0):
        raise _refuse(config_file, "time_step_limit", list(limit), "zoo does not clamp Δ; only (0, inf)")


def _model_config_hf(data: dict, config_file: Path):
    """(ModelConfig, mixer name, block-norm eps) from a Hugging Face config."""
    from zoo.config import Mamba2Config, MambaConfig, ModelConfig

    kind = data.get("model_type")
    if kind not in ("mamba", "mamba2"):
        archs = data.get("architectures")
        raise CheckpointError(f"{config_file}: model_type {kind!r} (architectures {archs}) is not supported; zoo.load "
                              f"reads zoo exports and Hugging Face MambaForCausalLM / Mamba2ForCausalLM")
    _check_common_hf(data, config_file)
    try:
        dim, depth, vocab = int(data["hidden_size"]), int(data["num_hidden_layers"]), int(data["vocab_size"])
        expand = int(data.get("expand", 2))
        eps = float(data.get("layer_norm_epsilon", 1e-5))
        tied = bool(data.get("tie_word_embeddings", kind == "mamba"))
        config = ModelConfig(vocab_size=vocab, dim=dim, depth=depth, pattern=[kind], mlp="none",
                             tie_embeddings=tied, norm_eps=eps)
        if kind == "mamba":
            rank = data.get("time_step_rank", "auto")
            config.mamba = MambaConfig(d_state=int(data.get("state_size", 16)), d_conv=int(data.get("conv_kernel", 4)),
                                       expand=expand, dt_rank=None if rank == "auto" else int(rank))
        else:
            heads, headdim = int(data.get("num_heads", 128)), int(data.get("head_dim", 64))
            if heads * headdim != expand * dim:
                raise CheckpointError(f"{config_file}: num_heads*head_dim ({heads}*{headdim}) must equal "
                                      f"expand*hidden_size ({expand}*{dim})")
            chunk = int(data.get("chunk_size", 64))
            config.mamba2 = Mamba2Config(d_state=int(data.get("state_size", 128)), headdim=headdim,
                                         ngroups=int(data.get("n_groups", 1)),
                                         chunk_size=chunk if chunk & (chunk - 1) == 0 else 64,
                                         expand=expand, d_conv=int(data.get("conv_kernel", 4)))
    except KeyError as error:
        raise CheckpointError(f"{config_file} lacks field {error.args[0]!r} (found: {', '.join(sorted(data))})") from None
    return config, kind, eps


def _model_config_mamba_ssm(data: dict, config_file: Path):
    """(ModelConfig, mixer name, eps) from a mamba_ssm ``MambaLMHeadModel`` config."""
    from zoo.config import Mamba2Config, MambaConfig, ModelConfig

    ssm = dict(data.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise _refuse(config_file, "ssm_cfg.layer", layer, "zoo reads Mamba1 and Mamba2")
    if data.get("attn_layer_idx"):
        raise _refuse(config_file, "attn_layer_idx", data["attn_layer_idx"], "hybrid mamba_ssm models are not read")
    if int(data.get("d_intermediate", 0) or 0) > 0:
        raise _refuse(config_file, "d_intermediate", data["d_intermediate"], "zoo reads mixer-only blocks")
    if not data.get("rms_norm", True):
        raise _refuse(config_file, "rms_norm", data["rms_norm"], "zoo's blocks use RMSNorm")
    for field, good in (("bias", False), ("conv_bias", True), ("norm_before_gate", False), ("rmsnorm", True)):
        if field in ssm and bool(ssm[field]) != good:
            raise _refuse(config_file, f"ssm_cfg.{field}", ssm[field], f"zoo supports {good} only")
    try:
        dim, depth, vocab = int(data["d_model"]), int(data["n_layer"]), int(data["vocab_size"])
    except KeyError as error:
        raise CheckpointError(f"{config_file} lacks field {error.args[0]!r} (found: {', '.join(sorted(data))})") from None
    multiple = int(data.get("pad_vocab_size_multiple", 1) or 1)
    padded = vocab + (-vocab % multiple)
    expand = int(ssm.get("expand", 2))
    config = ModelConfig(vocab_size=padded, dim=dim, depth=depth, mlp="none",
                         tie_embeddings=bool(data.get("tie_embeddings", True)), norm_eps=1e-5)
    if layer == "Mamba1":
        rank = ssm.get("dt_rank", "auto")
        config.pattern = ["mamba"]
        config.mamba = MambaConfig(d_state=int(ssm.get("d_state", 16)), d_conv=int(ssm.get("d_conv", 4)),
                                   expand=expand, dt_rank=None if rank == "auto" else int(rank))
    else:
        if ssm.get("d_ssm") is not None and int(ssm["d_ssm"]) != expand * dim:
            raise _refuse(config_file, "ssm_cfg.d_ssm", ssm["d_ssm"], f"zoo needs d_ssm = d_inner = {expand * dim}")
        config.pattern = ["mamba2"]
        chunk = int(ssm.get("chunk_size", 64))
        config.mamba2 = Mamba2Config(d_state=int(ssm.get("d_state", 128)), headdim=int(ssm.get("headdim", 64)),
                                     ngroups=int(ssm.get("ngroups", 1)),
                                     chunk_size=chunk if chunk & (chunk - 1) == 0 else 64, expand=expand,
                                     d_conv=int(ssm.get("d_conv", 4)))
    return config, config.pattern[0], 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------------
def _read_weights(path: Path) -> dict:
    """All tensors of a HF/mamba_ssm directory: safetensors, sharded safetensors, or pytorch_model.bin."""
    single = path / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing")
            state.update(read_safetensors(path / shard))
        return state
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        state = read_ckpt(binary)
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary} does not hold a state dict")
        return state
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise CheckpointError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                          f"(found: {found})")


def _map_keys(state: dict, tied: bool) -> dict:
    """HF / mamba_ssm keys -> zoo ``LanguageModel`` keys."""
    out = {}
    for key, value in state.items():
        if key in ("backbone.embeddings.weight", "backbone.embedding.weight"):
            out["embed.weight"] = value
        elif key == "backbone.norm_f.weight":
            out["norm.weight"] = value
        elif key == "lm_head.weight":
            if not tied:
                out["lm_head.weight"] = value
        elif key.startswith("backbone.layers."):
            index, _, rest = key[len("backbone.layers."):].partition(".")
            if rest == "norm.weight":
                out[f"blocks.{index}.mixer_norm.weight"] = value
            elif rest.startswith("mixer."):
                out[f"blocks.{index}.{rest}"] = value
            else:
                out[key] = value  # unexpected: reported by the check
        else:
            out[key] = value
    return out


def load_foreign(path: str | Path, device: str | torch.device = "cpu"):
    """Load a Hugging Face Mamba/Mamba2 or mamba_ssm directory as a zoo ``LanguageModel`` (fp32, eval mode)."""
    from zoo.models import build_model

    path = Path(path)
    config_file = path / "config.json"
    data = _read_json(config_file)
    kind = foreign_format(path)
    if kind == "hf":
        model_config, mixer, eps = _model_config_hf(data, config_file)
    elif kind == "mamba_ssm":
        model_config, mixer, eps = _model_config_mamba_ssm(data, config_file)
    else:
        raise CheckpointError(f"{config_file} is neither a zoo export nor a Hugging Face / mamba_ssm Mamba config "
                              f"(fields found: {', '.join(sorted(data)) or 'none'})")
    state = _read_weights(path)
    tied = model_config.tie_embeddings
    if not tied and "lm_head.weight" not in state:
        raise CheckpointError(f"{path}: the config says untied embeddings but the weights have no lm_head.weight")
    if mixer == "mamba2":
        model_config.mamba2.norm_eps = eps
    model = build_model(model_config, device=device)
    load_state_checked(model, _map_keys(state, tied), str(path))
    model.eval()
    return model

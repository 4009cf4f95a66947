"""``zoo export format=hf``: a pure Mamba / Mamba-2 zoo LM as a Hugging Face ``MambaForCausalLM`` /
``Mamba2ForCausalLM`` directory, the inverse of ``zoo.hf_import`` (same mixer parameter names; docs/interop.md).

    from zoo.hf.export import export_hf
    export_hf(zoo.load("runs/mamba/model"), "exported/mamba-hf")   # transformers.AutoModelForCausalLM reads it
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from zoo.errors import CheckpointError

__all__ = ["export_hf", "export_hf_from", "hf_config"]


def _refuse(model_config, why: str) -> CheckpointError:
    return CheckpointError(f"format=hf holds only pure Mamba / Mamba-2 LMs (pattern [mamba] or [mamba2], "
                           f"mlp=none, no HMT); this model ({model_config.architecture}, pattern "
                           f"{model_config.pattern}, mlp={model_config.mlp}) {why}: export it with format=zoo")


def hf_config(model_config):
    """The transformers ``MambaConfig`` / ``Mamba2Config`` of a pure Mamba / Mamba-2 ``ModelConfig``."""
    import transformers

    if model_config.architecture != "lm" or model_config.pattern not in (["mamba"], ["mamba2"]):
        raise _refuse(model_config, "has other blocks")
    if model_config.mlp != "none":
        raise _refuse(model_config, "has MLPs in its blocks, which HF Mamba blocks lack")
    common = dict(vocab_size=model_config.vocab_size, hidden_size=model_config.dim,
                  num_hidden_layers=model_config.depth, layer_norm_epsilon=model_config.norm_eps,
                  tie_word_embeddings=model_config.tie_embeddings, use_bias=False, use_conv_bias=True,
                  hidden_act="silu", residual_in_fp32=True)
    if model_config.pattern == ["mamba"]:
        mamba = model_config.mamba
        rank = mamba.dt_rank or math.ceil(model_config.dim / 16)
        return transformers.MambaConfig(state_size=mamba.d_state, expand=mamba.expand, conv_kernel=mamba.d_conv,
                                        time_step_rank=rank, **common)
    mamba2 = model_config.mamba2
    if mamba2.norm_eps != model_config.norm_eps:
        raise _refuse(model_config, f"has mamba2.norm_eps={mamba2.norm_eps} != model.norm_eps="
                                    f"{model_config.norm_eps} (HF Mamba2 has one epsilon)")
    inner = mamba2.expand * model_config.dim
    return transformers.Mamba2Config(num_heads=inner // mamba2.headdim, head_dim=mamba2.headdim,
                                     state_size=mamba2.d_state, expand=mamba2.expand, conv_kernel=mamba2.d_conv,
                                     n_groups=mamba2.ngroups, chunk_size=mamba2.chunk_size, rms_norm=True,
                                     time_step_limit=(0.0, float("inf")), **common)


def hf_state_dict(model) -> dict:
    """zoo ``LanguageModel`` keys -> HF ``Mamba(2)ForCausalLM`` keys (the inverse of ``zoo.hf_import``'s map)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "embed.weight":
            out["backbone.embeddings.weight"] = value
        elif key == "norm.weight":
            out["backbone.norm_f.weight"] = value
        elif key == "lm_head.weight":
            out["lm_head.weight"] = value
        else:
            index, _, rest = key[len("blocks."):].partition(".")
            out[f"backbone.layers.{index}." + ("norm.weight" if rest == "mixer_norm.weight" else rest)] = value
    return {key: value.detach().contiguous() for key, value in out.items()}


def export_hf(model, out: str | Path) -> Path:
    """Write ``out/config.json`` + ``out/model.safetensors`` for transformers; ``out`` must be missing or empty."""
    from safetensors.torch import save_file

    from zoo.models import LanguageModel

    if not isinstance(model, LanguageModel):
        raise CheckpointError(f"format=hf holds only pure Mamba / Mamba-2 LMs; {type(model).__name__} is "
                              f"not one: export it with format=zoo")
    config = hf_config(model.config)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"out={out} exists and is not an empty directory; choose another out=DIR")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.", dir=parent))
    try:
        config.architectures = ["MambaForCausalLM" if config.model_type == "mamba" else "Mamba2ForCausalLM"]
        config.save_pretrained(tmp)
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf_from(source: str | Path, out: str | Path) -> Path:
    """``zoo export format=hf``: ``source`` is a training checkpoint (``.ckpt``) or a zoo export directory."""
    from zoo.checkpoint import config_from_ckpt, load_export, model_state_from_ckpt
    from zoo.models import build_model
    from zoo.state_dict import load_state_checked, read_ckpt

    source = Path(source)
    if source.is_file() and source.suffix == ".ckpt":
        checkpoint = read_ckpt(source)
        model = build_model(config_from_ckpt(checkpoint, source))
        load_state_checked(model, model_state_from_ckpt(checkpoint), f"checkpoint {source}")
    else:
        model = load_export(source)
    return export_hf(model, out)

"""Read flash-linear-attention (fla) ``GatedDeltaNetForCausalLM`` and ``MomForCausalLM`` directories into zoo's LM.

Detection is by ``config.json``'s ``model_type`` ("gated_deltanet", "mom"). fla's blocks are zoo's pre-norm blocks
(``attn_norm`` → mixer, ``mlp_norm`` → SwiGLU ``mlp.{gate,up,down}_proj``), so the import maps names and checks every
field zoo cannot express (docs/interop.md#importing-fla-and-vim-checkpoints). fla's kernels need a GPU; zoo runs the
imported model anywhere.

    model = zoo.load("path/to/Gated-Deltanet-340M")       # a zoo LanguageModel with pattern [gdn]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from zoo.errors import CheckpointError
from zoo.state_dict import load_state_checked

__all__ = ["FLA_MODEL_TYPES", "fla_format", "load_fla"]

FLA_MODEL_TYPES = {"gated_deltanet": "gdn", "mom": "mom"}
CONV_SIZE = 4   # zoo's short convs have 4 taps (zoo.layers.mom.CONV_SIZE)


def fla_format(path: str | Path) -> str | None:
    """fla's ``model_type`` of ``path/config.json`` when it is one zoo imports, else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text())
    except ValueError:  # not UTF-8 or not JSON: the other readers name the problem
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    return kind if kind in FLA_MODEL_TYPES else None


def _refuse(config_file: Path, field: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{config_file}: {field}={value!r} is not supported ({why})")


def _check(data: dict, config_file: Path, kind: str) -> None:
    """One-line refusals for fla configurations zoo's layers cannot express."""
    fixed = [("attn", None, "hybrid attention layers are not imported"),
             ("attnres_block_size", None, "zoo's blocks use plain residuals"),
             ("use_short_conv", True, "zoo's memories always have short convs"),
             ("conv_size", CONV_SIZE, f"zoo's short convs have {CONV_SIZE} taps"),
             ("allow_neg_eigval", False, "zoo's write strength is sigmoid(x W_b) in [0, 1]")]
    if kind == "mom":
        fixed += [("mom_backend", "gated_deltanet", "zoo's memories are gated-delta memories"),
                  ("single_kv_proj", False, "zoo's memories have their own key/value projections"),
                  ("expand_v", 1.0, "zoo's MoM values are as wide as its keys")]
    for field, good, why in fixed:
        if field in data and data[field] != good:
            raise _refuse(config_file, field, data[field], why)
    if data.get("hidden_act", "swish") not in ("swish", "silu"):
        raise _refuse(config_file, "hidden_act", data["hidden_act"], "zoo's MLP is SwiGLU")
    if data.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise _refuse(config_file, "output_gate_activation", data["output_gate_activation"],
                      "zoo's output gate is SiLU")


def _model_config(data: dict, config_file: Path, state: dict):
    """The zoo ``ModelConfig`` of an fla config (the MLP width is read from the weights, exact)."""
    from zoo.config import GDNConfig, MoMConfig, ModelConfig

    kind = data["model_type"]
    _check(data, config_file, kind)
    try:
        dim, depth, vocab = int(data["hidden_size"]), int(data["num_hidden_layers"]), int(data["vocab_size"])
        heads, head_dim, eps = int(data["num_heads"]), int(data["head_dim"]), float(data.get("norm_eps", 1e-6))
    except KeyError as error:
        raise CheckpointError(f"{config_file} lacks field {error.args[0]!r} (found: {', '.join(sorted(data))})") from None
    gate = state.get("model.layers.0.mlp.gate_proj.weight")
    if gate is None:
        raise CheckpointError(f"{config_file.parent}: no model.layers.0.mlp.gate_proj.weight (fla's blocks have an "
                              f"MLP)")
    config = ModelConfig(vocab_size=vocab, dim=dim, depth=depth, pattern=[FLA_MODEL_TYPES[kind]], mlp="swiglu",
                         mlp_hidden=int(gate.shape[0]), tie_embeddings=bool(data.get("tie_word_embeddings", False)),
                         norm_eps=eps)
    if kind == "gated_deltanet":
        value_heads = data.get("num_v_heads")
        config.gdn = GDNConfig(heads=heads, head_dim=head_dim, expand_v=float(data.get("expand_v", 2.0)),
                               value_heads=None if value_heads is None else int(value_heads),
                               use_gate=bool(data.get("use_gate", True)), norm_eps=eps)
    else:
        config.mom = MoMConfig(heads=heads, head_dim=head_dim, num_memories=int(data.get("num_memories", 4)),
                               topk=int(data.get("topk", 2)), shared_memory=bool(data.get("shared_mem", False)),
                               aux_loss_scale=float(data.get("aux_loss_scale", 0.01)),
                               use_gate=bool(data.get("use_output_gate", True)), norm_eps=eps)
    return config


MIXER_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "a_proj": "a_proj", "b_proj": "b_proj",
               "g_proj": "gate_proj", "o_proj": "o_proj", "q_conv1d": "conv_q", "k_conv1d": "conv_k",
               "v_conv1d": "conv_v", "gate": "router", "A_log": "A_log", "dt_bias": "dt_bias", "o_norm": "o_norm"}
SHARED = {"shared_k": "k_proj", "shared_v": "v_proj", "shared_b": "b_proj", "shared_a": "a_proj"}


def _map_keys(state: dict, config) -> dict:
    """fla keys -> zoo ``LanguageModel`` keys; MoM's per-memory projections stack into (M', out, D), the shared
    memory's last."""
    out, stacks = {}, {}
    for key, value in state.items():
        if key == "model.embeddings.weight":
            out["embed.weight"] = value
        elif key == "model.norm.weight":
            out["norm.weight"] = value
        elif key == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = value
        elif key.startswith("model.layers."):
            index, _, rest = key[len("model.layers."):].partition(".")
            block = f"blocks.{index}"
            parts = rest.split(".")
            if rest in ("attn_norm.weight", "mlp_norm.weight"):
                out[f"{block}.{'mixer_norm' if parts[0] == 'attn_norm' else 'mlp_norm'}.weight"] = value
            elif parts[0] == "mlp" and parts[1] in ("gate_proj", "up_proj", "down_proj"):
                stacks.setdefault((block, "mlp"), {})[parts[1]] = value
            elif parts[0] == "attn" and parts[1] in SHARED:
                stacks.setdefault((block, SHARED[parts[1]]), {})["shared"] = value
            elif parts[0] == "attn" and len(parts) == 4 and parts[2].isdigit():                # MoM k_proj.{m}
                stacks.setdefault((block, MIXER_NAMES.get(parts[1], parts[1])), {})[int(parts[2])] = value
            elif parts[0] == "attn" and parts[1] in MIXER_NAMES:
                name = MIXER_NAMES[parts[1]]
                value = value[:, 0] if parts[1].endswith("conv1d") else value                 # (C, 1, w) -> (C, w)
                out[f"{block}.mixer.{'.'.join([name, *parts[2:]])}"] = value
            else:
                out[key] = value  # unexpected: reported by the check
        else:
            out[key] = value
    for (block, name), pieces in stacks.items():
        if name == "mlp":
            if set(pieces) == {"gate_proj", "up_proj", "down_proj"}:
                out[f"{block}.mlp.w_in.weight"] = torch.cat([pieces["gate_proj"], pieces["up_proj"]])
                out[f"{block}.mlp.w_out.weight"] = pieces["down_proj"]
            else:
                out.update({f"{block}.mlp.{part}.weight": value for part, value in pieces.items()})
            continue
        order = sorted(k for k in pieces if k != "shared") + (["shared"] if "shared" in pieces else [])
        out[f"{block}.mixer.{name}"] = torch.stack([pieces[k] for k in order])                 # (M', out, D)
    return out


def load_fla(path: str | Path, device: str | torch.device = "cpu"):
    """Load an fla GatedDeltaNet / MoM directory as a zoo ``LanguageModel`` (fp32, eval mode)."""
    from zoo.hf_import import _read_json, _read_weights
    from zoo.models import build_model

    path = Path(path)
    config_file = path / "config.json"
    data = _read_json(config_file)
    state = {key: value.float() for key, value in _read_weights(path).items()}
    config = _model_config(data, config_file, state)
    if not config.tie_embeddings and "lm_head.weight" not in state:
        raise CheckpointError(f"{path}: the config says untied embeddings but the weights have no lm_head.weight")
    model = build_model(config, device=device)
    load_state_checked(model, _map_keys(state, config), str(path))
    model.eval()
    return model

"""fla GatedDeltaNet / MoM directories written by fla's own classes load into zoo with equal logits.

The reference forward is composed from the saved weights alone: fla's pure-torch recurrence
``fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule`` for every memory, plain torch for the rest
(embedding, RMSNorms, depthwise causal conv + SiLU, ℓ2 norm, gates, routing, gated output norm, SwiGLU MLP, head).
fla's own forward needs a GPU driver, so it cannot be the reference on CPU.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.errors import CheckpointError
from zoo.state_dict import read_safetensors

fla_models = pytest.importorskip("fla.models")
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, vocab_size=50, fuse_norm=False,
             fuse_swiglu=False, fuse_cross_entropy=False)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def conv_silu(x, weight):
    """Depthwise causal conv (weight (C, 1, w)) of x (B, T, C), then SiLU."""
    y = F.conv1d(x.transpose(1, 2), weight, padding=weight.shape[-1] - 1, groups=x.shape[-1])[..., :x.shape[1]]
    return F.silu(y).transpose(1, 2)


def l2(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def memory(x, W, q, k, v, b, a, key_dim, value_dim):
    """One gated-delta memory over x (B, T, D): q/k/v/b/a name the weights; returns o (B, T, H_v, d_v)."""
    qs = conv_silu(x @ W[q].T, W["q_conv1d.weight"]).unflatten(-1, (-1, key_dim))
    ks = conv_silu(x @ W[k].T, W["k_conv1d.weight"]).unflatten(-1, (-1, key_dim))
    vs = conv_silu(x @ W[v].T, W["v_conv1d.weight"]).unflatten(-1, (-1, value_dim))
    groups = vs.shape[2] // qs.shape[2]
    qs, ks = (z.repeat_interleave(groups, dim=2) for z in (qs, ks))
    g = -W["A_log"].exp() * F.softplus(x @ W[a].T + W["dt_bias"])
    o, _ = naive_recurrent_gated_delta_rule(l2(qs), l2(ks), vs, (x @ W[b].T).sigmoid(), g)
    return o


def reference_logits(directory, ids):
    """Logits of an fla directory from its config and weights (module docstring)."""
    config = json.loads((directory / "config.json").read_text())
    state = read_safetensors(directory / "model.safetensors")
    eps, d = config["norm_eps"], config["head_dim"]
    d_v = int(d * config.get("expand_v", 1.0))
    h = state["model.embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        W = {k[len(prefix) + 5:]: v for k, v in state.items() if k.startswith(prefix + "attn.")}
        x = rms(h, state[prefix + "attn_norm.weight"], eps)
        if config["model_type"] == "gated_deltanet":
            o = memory(x, W, "q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight", "a_proj.weight",
                       d, d_v)
        else:
            o = mom_memories(x, W, config, d)
        o = rms(o, W["o_norm.weight"], eps)
        if "g_proj.weight" in W:
            o = o * F.silu(x @ W["g_proj.weight"].T).unflatten(-1, (-1, d_v))
        h = h + o.flatten(2) @ W["o_proj.weight"].T
        x = rms(h, state[prefix + "mlp_norm.weight"], eps)
        mlp = {name: state[f"{prefix}mlp.{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj")}
        h = h + (F.silu(x @ mlp["gate_proj"].T) * (x @ mlp["up_proj"].T)) @ mlp["down_proj"].T
    h = rms(h, state["model.norm.weight"], eps)
    head = state["model.embeddings.weight"] if config["tie_word_embeddings"] else state["lm_head.weight"]
    return h @ head.T


def mom_memories(x, W, config, d):
    """MoM: each token's top-k memories (weights renormalised) see only the tokens routed to them, in time order;
    the shared memory sees every token."""
    B, T, _ = x.shape
    probs = (x @ W["gate.weight"].T).softmax(-1)
    weights, chosen = probs.topk(config["topk"], dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = x.new_zeros(B, T, config["num_heads"], d)
    for b in range(B):
        for m in range(config["num_memories"]):
            hit = (chosen[b] == m)                                          # (T, k)
            where = hit.any(-1).nonzero()[:, 0]
            if len(where) == 0:
                continue
            o = memory(x[b:b + 1, where], W, "q_proj.weight", f"k_proj.{m}.weight", f"v_proj.{m}.weight",
                       f"b_proj.{m}.weight", f"a_proj.{m}.weight", d, d)[0]
            out[b, where] += (weights[b][hit].reshape(-1))[:, None, None] * o
    if config["shared_mem"]:
        out = out + memory(x, W, "q_proj.weight", "shared_k.weight", "shared_v.weight", "shared_b.weight",
                           "shared_a.weight", d, d)
    return out


def save_fla(tmp_path, name, config_class, model_class, **fields):
    torch.manual_seed(0)
    model = model_class(config_class(**{**SMALL, **fields}))
    with torch.no_grad():                    # fla initialises some norms to ones: random gains test the mapping
        for key, value in model.named_parameters():
            if key.endswith("norm.weight"):
                value.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fields", [
    dict(expand_v=2, num_v_heads=4, intermediate_size=40),                 # grouped value heads, an odd MLP width
    dict(expand_v=1, use_gate=False, tie_word_embeddings=True, norm_eps=1e-5),
], ids=["gva-expand2", "nogate-tied"])
def test_gated_deltanet_logits_equal_reference(tmp_path, fields):
    directory = save_fla(tmp_path, "gdn", fla_models.GatedDeltaNetConfig, fla_models.GatedDeltaNetForCausalLM,
                         **fields)
    model = zoo.load(directory)
    assert model.config.pattern == ["gdn"]
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
        assert rel_err(logits, reference_logits(directory, ids)) < 1e-4


@pytest.mark.parametrize("fields", [dict(num_memories=3, topk=2, shared_mem=True),
                                    dict(num_memories=2, topk=1, shared_mem=False, use_output_gate=False)],
                         ids=["shared", "top1-nogate"])
def test_mom_logits_equal_reference(tmp_path, fields):
    directory = save_fla(tmp_path, "mom", fla_models.MomConfig, fla_models.MomForCausalLM, **fields)
    model = zoo.load(directory)
    assert model.config.pattern == ["mom"]
    ids = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(ids)
        assert rel_err(logits, reference_logits(directory, ids)) < 1e-4


@pytest.mark.parametrize("field, value", [("allow_neg_eigval", True), ("conv_size", 3), ("use_short_conv", False),
                                          ("hidden_act", "gelu"), ("attn", {"layers": [0], "num_heads": 2})])
def test_inexpressible_fla_config_is_one_line_naming_the_field(tmp_path, field, value):
    directory = save_fla(tmp_path, "gdn", fla_models.GatedDeltaNetConfig, fla_models.GatedDeltaNetForCausalLM)
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        zoo.load(directory)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and f"{field}=" in message, message


def test_mom_with_wider_values_is_refused(tmp_path):
    directory = save_fla(tmp_path, "mom", fla_models.MomConfig, fla_models.MomForCausalLM, expand_v=2)
    with pytest.raises(CheckpointError, match="expand_v=2"):
        zoo.load(directory)


def test_zoo_eval_and_generate_use_an_imported_directory_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.helpers import KJV_FIXTURE, run_zoo

    directory = save_fla(tmp_path, "gdn", fla_models.GatedDeltaNetConfig, fla_models.GatedDeltaNetForCausalLM)
    words = ["<eos>", "[UNK]", "the", "and", "of", "God", "earth", "In", "beginning", "created", "heaven"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    assert run_zoo("generate", f"checkpoint={directory}", "prompt=In the beginning", "max_new_tokens=4",
                   "temperature=0") == 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == ["In", "the", "beginning"] and set(printed) <= set(words) - {"<eos>"}
    assert run_zoo("eval", f"checkpoint={directory}", "data.name=text", f"data.path={KJV_FIXTURE}",
                   "data.seq_len=8", "data.eval_batch_size=2", "eval.max_batches=1") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and result["checkpoint"] == str(directory)

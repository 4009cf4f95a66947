"""``zoo.load`` of Hugging Face Mamba / Mamba2 and mamba_ssm directories: equal logits and greedy generations."""
from __future__ import annotations

import json
import os

import pytest
import torch

import zoo
from tests.helpers import rel_err
from zoo.errors import CheckpointError, ZooError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _perturb(model: torch.nn.Module) -> None:
    """Move D, the norms and the dt bias off their init so that a wrong mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".D", "norm.weight", "norm_f.weight", "dt_bias", "dt_proj.bias")):
                param.add_(0.1 * torch.randn_like(param))


def _hf_mamba():
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=100, expand=2)
    model = transformers.MambaForCausalLM(config).eval()
    _perturb(model)
    return model


def _hf_mamba2():
    torch.manual_seed(0)
    config = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=2,
                                       state_size=16, chunk_size=16, vocab_size=100, expand=2)
    model = transformers.Mamba2ForCausalLM(config).eval()
    _perturb(model)
    return model


@pytest.mark.parametrize("make", [_hf_mamba, _hf_mamba2], ids=["mamba", "mamba2"])
def test_hf_logits_match(make, tmp_path):
    hf = make()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
    model = zoo.load(tmp_path)
    with torch.no_grad():
        logits, _ = model(ids)
    assert logits.shape == expected.shape
    assert rel_err(logits, expected) < 1e-4
    prompt = ids[:1, :8]
    # an explicit mask: HF would otherwise mask prompt tokens equal to its pad id; it may stop early at its eos id
    hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    zoo_tokens = model.generate(prompt, 12)
    assert hf_tokens.shape[1] > prompt.shape[1]
    assert torch.equal(zoo_tokens[:, :hf_tokens.shape[1]], hf_tokens)


def test_mamba_ssm_directory(tmp_path):
    """A mamba_ssm-format dir: hand-written config.json, .bin with ``embedding.`` keys, vocab 97 padded to 104."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=104, expand=2)
    hf = transformers.MambaForCausalLM(config).eval()
    _perturb(hf)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 64, "n_layer": 2, "vocab_size": 97, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = zoo.load(tmp_path)(ids)
    assert logits.shape == (2, 40, 104)
    assert rel_err(logits, expected) < 1e-4


def test_load_errors(tmp_path):
    hf = _hf_mamba()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def one_line(match):
        with pytest.raises(ZooError) as info:
            zoo.load(tmp_path)
        assert "\n" not in str(info.value) and match in str(info.value), str(info.value)

    (tmp_path / "config.json").write_text(json.dumps({**config, "use_bias": True}))
    one_line("use_bias")
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    one_line("model_type 'llama'")
    (tmp_path / "config.json").write_text(json.dumps({**config, "state_size": 4}))
    one_line("shape mismatches (saved vs model): blocks.0.mixer.A_log (128, 8) vs (128, 4)")
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    one_line("missing keys: blocks.2.")
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    one_line("fields found: foo")
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    one_line("truncated")
    weights.unlink()
    one_line("has no model.safetensors")
    assert issubclass(CheckpointError, ZooError)

"""zoo LMs in transformers (docs/interop.md): AutoModelForCausalLM reads zoo exports, generate() on zoo's state."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

import zoo
from tests.helpers import rel_err
from tests.hf.conftest import FAMILIES, VOCAB
from zoo.models.state import select_rows

transformers = pytest.importorskip("transformers")

RECURRENT = ["mamba", "mamba2", "gdn", "hmt_mamba"]


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_auto_model_logits_and_greedy_equal_zoo(name, exported):
    model, out = exported(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "ZooForCausalLM" and not hf.training
    ids = _ids(2, 19)
    with torch.no_grad():
        expected, _ = zoo.load(out)(ids)
        logits = hf(ids).logits
    assert rel_err(logits, expected) < 1e-4
    tokens = hf.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, model.generate(ids[:, :5], 6))


@pytest.mark.parametrize("name", ["attention", "titans_mac", "mom", "hmt_attention"] + RECURRENT)
def test_sampling_and_beam_search_with_the_state_equal_full_recompute(name, exported):
    """use_cache=False recomputes the whole prefix each step: the zoo state (and its beam reordering) must agree."""
    _, out = exported(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    prompt = _ids(2, 4, seed=3)
    for options in ({"do_sample": True, "top_k": 10, "temperature": 0.9}, {"num_beams": 3, "do_sample": False}):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(5)
            runs.append(hf.generate(prompt, max_new_tokens=7, use_cache=use_cache, **options))
        assert runs[0].shape == (2, 11) and torch.equal(*runs), options


def test_eos_token_id_and_max_new_tokens(exported):
    model, out = exported("mamba2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    prompt = _ids(1, 5)
    greedy = model.generate(prompt, 8)
    assert hf.generate(prompt, max_new_tokens=8, do_sample=False).shape == (1, 13)
    eos = int(greedy[0, 8])  # the fourth new token
    stopped = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(stopped[0, :9], greedy[0, :9]) and stopped.shape[1] <= 9


@pytest.mark.skipif("attention_mask" not in inspect.signature(zoo.models.LanguageModel.forward).parameters,
                    reason="padding inside the mixers (LanguageModel.forward(attention_mask=)) is another branch's")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_left_padded_batch_generate_equals_each_row_alone(name, exported):
    _, out = exported(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    long, short = _ids(1, 6, seed=7), _ids(1, 3, seed=8)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])   # (2, 6)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    tokens = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens[0], hf.generate(long, max_new_tokens=5, do_sample=False)[0])
    assert torch.equal(tokens[1, 3:], hf.generate(short, max_new_tokens=5, do_sample=False)[0])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_select_rows_continues_the_selected_rows(name, exported):
    model, _ = exported(name)
    prompt, step = _ids(3, 9), _ids(3, 1, seed=2)
    index = torch.tensor([2, 0, 2])
    with torch.no_grad():
        _, state = model(prompt)
        logits, _ = model(step[index], select_rows(state, index))
        _, fresh = model(prompt[index])
        expected, _ = model(step[index], fresh)
    assert rel_err(logits, expected) < 1e-5


def test_select_rows_refuses_bad_index_and_mixed_batches():
    state = (torch.zeros(3, 2), [torch.zeros(3)], None, 4, torch.tensor(1.0))
    chosen = select_rows(state, torch.tensor([1]))
    assert chosen[0].shape == (1, 2) and chosen[1][0].shape == (1,) and chosen[3] == 4 and chosen[4].dim() == 0
    with pytest.raises(ValueError, match=r"3 rows \(0..2\)"):
        select_rows(state, torch.tensor([3]))
    with pytest.raises(ValueError, match="1-d integer tensor"):
        select_rows(state, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="batch-first"):
        select_rows((torch.zeros(3), torch.zeros(2)), torch.tensor([0]))


def test_from_zoo_and_save_pretrained_round_trip(exported, tmp_path):
    from zoo.hf.modeling import ZooForCausalLM

    model, _ = exported("hybrid")
    wrapper = ZooForCausalLM.from_zoo(model)
    assert wrapper.model is model
    wrapper.save_pretrained(tmp_path / "saved")
    data = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert data["model_type"] == "zoo" and data["architectures"] == ["ZooForCausalLM"]
    ids = _ids(2, 7)
    with torch.no_grad():
        expected, _ = model(ids)
        assert torch.equal(zoo.load(tmp_path / "saved")(ids)[0], expected)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        assert torch.equal(again(ids).logits, expected)
    with pytest.raises(ValueError, match="options safe_serialization are not supported"):
        wrapper.save_pretrained(tmp_path / "other", safe_serialization=True)


def test_labels_give_the_shifted_cross_entropy(exported):
    model, out = exported("attention")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = _ids(2, 8)
    logits, _ = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert rel_err(hf(ids, labels=ids).loss, expected) < 1e-5


@pytest.mark.parametrize("name", ["hmt-kjv", "memoryformer-kjv", "mom-mqar", "titans-kjv", "titans-mqar",
                                  "transformer-mqar"])
def test_shipped_lm_checkpoints_load_in_transformers(name):
    path = f"checkpoints/{name}"
    ids = _ids(1, 12)
    with torch.no_grad():
        expected, _ = zoo.load(path)(ids)
        logits = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits
    assert torch.equal(logits, expected)


def test_a_non_lm_zoo_config_is_refused_by_zoo_for_causal_lm():
    from zoo.config import Config
    from zoo.hf.modeling import ZooConfig, ZooForCausalLM

    config = Config()
    config.model.architecture = "vision"
    with pytest.raises(ValueError, match="model.architecture=vision is not a causal language model"):
        ZooForCausalLM(ZooConfig.from_zoo(config, "VisionClassifier"))


def test_import_zoo_stays_light_and_registers_when_transformers_loads():
    code = ("import sys, zoo; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; "
            "from transformers import AutoConfig; print(AutoConfig.for_model('zoo').__class__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ZooConfig"


def test_peft_lora_trains_three_steps_and_merges(exported):
    peft = pytest.importorskip("peft")
    _, out = exported("attention")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in hf.named_modules()
                      if isinstance(module, torch.nn.Linear)})
    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    trainable = [param for param in lora.parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name, param in lora.named_parameters() if param.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids(2, 12)
    losses = []
    lora.train()
    for _ in range(3):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()
        assert type(merged).__name__ == "ZooForCausalLM"
        assert rel_err(merged(ids).logits, adapted) < 1e-4

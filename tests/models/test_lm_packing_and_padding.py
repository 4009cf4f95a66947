"""LanguageModel of each family with packed documents (``cu_seqlens``) and left-padded batches (``attention_mask``):
packed == the documents one by one, batched generation of prompts of different lengths == one prompt at a time."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err
from tests.layers.test_mixer_contract import CAUSAL, model_config
from tests.layers.test_packing_and_padding import document_lengths
from zoo.models import LanguageModel

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def language_model(name: str, dtype: torch.dtype) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(model_config(name, "model.depth=2", "model.dropout=0.0")).to(dtype)


def logits_and_gradients(model: LanguageModel, run) -> list[torch.Tensor]:
    logits = run()
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits * weight).sum(), params, allow_unused=True)
    return [logits] + [g for g in grads if g is not None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CAUSAL)
def test_packed_language_model_equals_documents_one_by_one(name, dtype):
    model = language_model(name, dtype)
    lengths = document_lengths(40)
    ids = torch.randint(0, 258, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    packed = logits_and_gradients(model, lambda: model(ids, cu_seqlens=cu_seqlens)[0])
    separate = logits_and_gradients(model, lambda: torch.cat([model(doc)[0] for doc in ids.split(lengths, 1)], 1))
    assert len(packed) == len(separate)
    for got, want in zip(packed, separate):
        assert rel_err(got, want) < TOL[dtype], f"{name}: packed vs separate {rel_err(got, want):.2e}"


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention_mask (B, T) of 0/1) of prompts left-padded to the longest."""
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([p.new_full((T - len(p),), pad_id), p]) for p in prompts])
    mask = torch.stack([torch.arange(T) >= T - len(p) for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CAUSAL)
def test_batched_generation_of_different_lengths_equals_one_by_one(name, dtype):
    model = language_model(name, dtype).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 258, (n,), generator=gen) for n in (5, 3, 10)]  # off the chunk and segment grids
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, 6, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt.unsqueeze(0), 6)
        assert torch.equal(batched[row, -6:], alone[0, -6:]), f"{name}: row {row} batched vs alone"
    logits, _ = model(ids, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone, _ = model(prompt.unsqueeze(0))
        real = mask[row].bool()
        assert rel_err(logits[row, real], alone[0]) < TOL[dtype], f"{name}: row {row} logits"


def test_language_model_names_a_bad_mask_or_cu_seqlens_in_one_error():
    model = language_model("mamba", torch.float64)
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="LanguageModel: attention_mask: mask must be left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    with pytest.raises(ValueError, match="LanguageModel: cu_seqlens needs the sequences packed along time with batch "
                                         "size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="LanguageModel: cu_seqlens must increase strictly"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 3, 3, 6]))
    with pytest.raises(ValueError, match="LanguageModel: attention_mask must hold 0/1"):
        model(ids, attention_mask=torch.full((2, 6), 2))

"""LanguageModel.generate's options: top-p, repetition penalty, stop sequences, streamer, validation."""
from __future__ import annotations

import pytest
import torch

from zoo.config import ModelConfig
from zoo.models import LanguageModel
from zoo.models.hmt import HMT
from zoo.models.lm import sample_next


def tiny_model() -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=1, pattern=["mamba"], dropout=0.0)
    return LanguageModel(cfg).eval()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.cat([sample_next(logits, 1.0, None, torch.Generator().manual_seed(i), top_p=0.75)
                       for i in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}                  # 0.5 < 0.75 <= 0.5 + 0.3
    top = torch.cat([sample_next(logits, 1.0, None, torch.Generator().manual_seed(i), top_p=0.4)
                     for i in range(50)])
    assert set(top.flatten().tolist()) == {0}


def test_repetition_penalty_changes_greedy_choice_of_seen_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 258, (1, 6), generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompt, 12)
    penalised = model.generate(prompt, 12, repetition_penalty=1e6)
    new = penalised[0, 6:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(prompt[0].tolist())   # nothing repeats
    assert not torch.equal(plain, penalised)


def test_stop_sequences_finish_rows_and_eos_fills_them():
    model = tiny_model()
    prompt = torch.randint(0, 258, (2, 4), generator=torch.Generator().manual_seed(2))
    free = model.generate(prompt, 10)
    stop = free[0, 4:6].tolist()                                  # row 0's first two new tokens
    out = model.generate(prompt, 10, stop=[stop], eos_id=257)
    assert out[0, 4:6].tolist() == stop and bool((out[0, 6:] == 257).all())
    row1 = free[1, 4:].tolist()
    end = next((j + 2 for j in range(len(row1) - 1) if row1[j:j + 2] == stop), len(row1))
    assert out[1, 4:4 + end].tolist() == row1[:end] and bool((out[1, 4 + end:] == 257).all())
    only_row0 = model.generate(prompt[:1], 10, stop=[stop])
    assert only_row0.shape[1] == 6                                # ends when every row has stopped


def test_streamer_gets_each_new_token_row_then_end():
    model = tiny_model()

    class Recorder:
        def __init__(self):
            self.rows, self.ended = [], False

        def put(self, tokens):
            self.rows.append(tokens.clone())

        def end(self):
            self.ended = True

    prompt = torch.randint(0, 258, (2, 3), generator=torch.Generator().manual_seed(3))
    recorder, seen = Recorder(), []
    out = model.generate(prompt, 5, streamer=recorder)
    assert recorder.ended and torch.equal(torch.stack(recorder.rows, dim=1), out[:, 3:])
    model.generate(prompt, 2, streamer=seen.append)
    assert len(seen) == 2 and seen[0].shape == (2,)


@pytest.mark.parametrize("options, message", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"stop": [[]]}, "stop"),
    ({"stop": ["ab"]}, "stop"), ({"streamer": 3}, "streamer"), ({"eos_id": -1}, "eos_id"),
    ({"attention_mask": torch.ones(1, 3)}, "attention_mask"), ({"attention_mask": torch.ones(2, 2)}, "attention_mask"),
    ({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, "left padding")])
def test_generate_rejects_bad_options_in_one_line(options, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.ones(2, 3, dtype=torch.long), 2, **options)


def tiny_hmt():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=1, pattern=["attention"], dropout=0.0, architecture="hmt")
    cfg.attention.heads = 2
    cfg.hmt.segment_len, cfg.hmt.sensory_len, cfg.hmt.cache_size = 4, 1, 3
    return HMT.from_config(cfg).double().eval()


def test_hmt_refuses_cu_seqlens_and_a_mask_that_is_not_left_padding():
    hmt, ids = tiny_hmt(), torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="HMT: cu_seqlens is not supported"):
        hmt(ids[:1], cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="left padding"):
        hmt(ids, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]))


def test_hmt_left_padded_rows_equal_each_row_alone():
    hmt = tiny_hmt()
    prompts = [torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 3, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])  # (3, 9)
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts])
    with torch.no_grad():
        logits, _ = hmt(ids, attention_mask=mask)
        batched = hmt.generate(ids, 7, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone, _ = hmt(prompt[None])
            assert torch.allclose(logits[row, width - len(prompt):], alone[0], atol=1e-12)
            assert torch.equal(batched[row, width - len(prompt):], hmt.generate(prompt[None], 7)[0])

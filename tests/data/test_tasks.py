"""Synthetic memory tasks (docs/tasks.md#conventions): layouts, seeding, scoring."""
import re

import pytest
import torch

from zoo.data.tasks import (IGNORE_INDEX, InductionConfig, MQARConfig, NIAHConfig, SelectiveCopyConfig,
                            example_seed)


def test_mqar_layout_keys_values_and_queries():
    task = MQARConfig(seq_len=64, num_kv_pairs=6, vocab_size=128)
    for i in range(20):
        x, y = task.example(i, "train", seed=0)
        D, V = 6, 128
        keys, values = x[0:2 * D:2], x[1:2 * D:2]
        assert len(set(keys.tolist())) == D and len(set(values.tolist())) == D
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        scored = (y != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == D and (scored >= 2 * D).all() and (scored % 2 == 0).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())      # each key queried exactly once
        for position in scored.tolist():
            assert y[position] == pairs[int(x[position])]               # label = the key's value
        others = torch.ones(64, dtype=torch.bool)
        others[:2 * D] = False
        others[scored] = False
        assert (x[others] == 0).all()                                   # no random filler by default


def test_mqar_power_law_puts_most_queries_early():
    task = MQARConfig(seq_len=256, num_kv_pairs=8, vocab_size=512)
    gaps = []
    for i in range(200):
        _, y = task.example(i, "train")
        gaps += (((y != IGNORE_INDEX).nonzero().flatten() - 16) // 2).tolist()
    assert sum(g < 60 for g in gaps) > 0.6 * len(gaps)


def test_examples_depend_only_on_task_seed_split_index():
    task = MQARConfig()
    a = task.example(5, "train", seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a, task.example(5, "train", seed=0)))
    assert not torch.equal(a[0], task.example(5, "test", seed=0)[0])
    assert not torch.equal(a[0], task.example(5, "train", seed=1)[0])
    torch.manual_seed(123)                                               # the global RNG plays no part
    assert torch.equal(a[0], task.example(5, "train", seed=0)[0])
    assert example_seed("mqar", 0, "train", 5) == example_seed("mqar", 0, "train", 5) < 2 ** 63


def test_selective_copy_layout():
    task = SelectiveCopyConfig(seq_len=64, num_tokens=8, vocab_size=10)
    x, y = task.example(3, "train")
    blank, copy = 8, 9
    assert x[64 - 8 - 1] == copy and (x[64 - 8:] == blank).all()
    content = x[:64 - 8 - 1][x[:64 - 8 - 1] != blank]
    assert torch.equal(y[64 - 8:], content) and (y[:64 - 8] == IGNORE_INDEX).all()


def test_induction_trigger_twice_and_target():
    task = InductionConfig(seq_len=64, vocab_size=16)
    for i in range(10):
        x, y = task.example(i, "test")
        trigger = 15
        where = (x == trigger).nonzero().flatten()
        assert len(where) == 2 and where[-1] == 63
        assert y[63] == x[where[0] + 1] and (y[:63] == IGNORE_INDEX).all()


def test_niah_answer_is_scored_under_teacher_forcing():
    task = NIAHConfig(seq_len=1024)
    x, y = task.example(0, "test")
    text = bytes(int(t) for t in x if t < 256).decode()
    value = text.split("is: ")[1][:7]
    assert text.endswith(f" {value}") and f"magic numbers for" in text
    scored = (y != IGNORE_INDEX).nonzero().flatten()
    assert len(scored) == 8                                              # " " + 7 digits
    assert bytes(y[scored].tolist()).decode() == f" {value}"
    assert torch.equal(x[scored + 1], y[scored])                         # label t is input t+1 (aligned)


@pytest.mark.parametrize("task, message", [
    (MQARConfig(seq_len=31), "must be even"),
    (MQARConfig(seq_len=32, num_kv_pairs=9), "4*num_kv_pairs (36) must be <= seq_len (32)"),
    (SelectiveCopyConfig(seq_len=20, num_tokens=10), "must be > 2*num_tokens + 1"),
    (NIAHConfig(seq_len=200), "holds no haystack line"),
])
def test_invalid_task_parameters_name_the_bound(task, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task.validate()


def test_saved_config_with_the_removed_induction_eval_lengths_still_loads():
    from zoo.config import Config, from_dict, to_dict

    saved = to_dict(Config())
    saved["data"]["induction"]["eval_lengths"] = [64, 128]
    assert to_dict(from_dict(saved)) == to_dict(Config())
    assert saved["data"]["induction"]["eval_lengths"] == [64, 128]  # the caller's dict is left as it was

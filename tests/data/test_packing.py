"""``data.pack=true``: whole documents packed into training windows with their boundaries; the loss never scores a
token of one document as the continuation of another (docs/training.md#packed-documents)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import KJV_FIXTURE, TINY_TEXT, run_zoo, train_losses
from zoo.config import DataConfig, parse_args
from zoo.data.loader import build_data, collate
from zoo.data.text import PackedWindowDataset
from zoo.errors import ConfigError
from zoo.eval.metrics import IGNORE_INDEX
from zoo.train.module import LanguageModelTask

EOS = 257


def test_windows_hold_whole_documents_and_never_score_across_a_boundary():
    docs = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate([3, 5, 9, 1, 4, 20, 2])]
    data = PackedWindowDataset(docs, seq_len=8, pad_id=EOS)
    pieces = []
    for i in range(len(data)):
        ids, labels, lengths = data[i]
        assert ids.shape == labels.shape == (8,) and int(lengths.sum()) == 8
        start = 0
        for n in lengths.tolist():
            doc, target = ids[start:start + n], labels[start:start + n]
            start += n
            if bool((target == IGNORE_INDEX).all()) and bool((doc == EOS).all()):  # the padding document
                assert start == 8, "only the end of a window is padding"
                continue
            assert torch.equal(target[:-1], doc[1:]) and int(target[-1]) == IGNORE_INDEX
            pieces.append(doc.tolist())
    expected = [docs[0], docs[1], docs[2][:8], docs[2][8:], docs[3], docs[4], docs[5][:8], docs[5][8:16],
                docs[5][16:], docs[6]]
    assert pieces == [piece.tolist() for piece in expected]


def test_packed_batch_loss_equals_the_documents_run_one_by_one():
    config = parse_args([*TINY_TEXT, "data.pack=true", "model.pattern=[mamba,attention]"]).config
    data = build_data(config.data)
    torch.manual_seed(0)
    task = LanguageModelTask(config, data)
    batch = collate([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 32) and int(batch["cu_seqlens"][-1]) == 64
    logits, _ = task.logits(batch)
    ids, bounds = batch["input_ids"].reshape(-1), batch["cu_seqlens"].tolist()
    separate = torch.cat([task.model(ids[a:b].unsqueeze(0))[0][0] for a, b in zip(bounds[:-1], bounds[1:])])
    assert torch.allclose(logits.reshape(64, -1), separate, atol=1e-5)
    loss, _, _ = task.task_loss(batch)
    expected = F.cross_entropy(separate, batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_training_with_packed_documents_runs(tmp_path):
    assert run_zoo("train", *TINY_TEXT, "data.pack=true", "model.pattern=[gdn]", f"run.root={tmp_path}",
                   "run.name=packed", "trainer.max_steps=3") == 0
    assert sorted(train_losses(tmp_path / "packed")) == [1, 2, 3]


@pytest.mark.parametrize("override, message", [("data.name=mqar", "not text data"),
                                               ("model.architecture=hmt", "takes unpacked windows")])
def test_pack_outside_text_language_models_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*TINY_TEXT, "data.pack=true", override])


def test_build_data_packs_only_the_training_windows():
    data = build_data(DataConfig(name="text", path=str(KJV_FIXTURE), seq_len=64, pack=True))
    assert len(data.train[0]) == 3 and len(data.test[0]) == 2

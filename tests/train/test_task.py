"""The shared task scaffolding: the backbone's auxiliary loss reaches the training loss of every task."""
from typing import NamedTuple

import pytest
import torch

from zoo.models.vision import VisionClassifier
from zoo.train.contrastive import EmbeddingTask
from zoo.train.hmt import HMTTask
from zoo.train.module import LanguageModelTask
from zoo.train.vision import VisionClassificationTask
from tests.helpers import KJV_FIXTURE, TINY_MQAR, read_metrics, run_zoo
from tests.train.test_contrastive import TINY_EMBED

# A MoM backbone returns its load-balance loss as the aux_loss of its state (scaled up to be clearly visible).
TINY_MOM = ["model.pattern=[mom]", "model.mom.heads=2", "model.mom.head_dim=16", "model.mom.num_memories=4",
            "model.mom.topk=2", "model.mom.aux_loss_scale=0.1"]

TINY_HMT = ["model.architecture=hmt", "model.dim=32", "model.depth=1", "model.hmt.segment_len=16",
            "model.hmt.sensory_len=4", "model.hmt.cache_size=4", "model.hmt.summary_fraction=0.5",
            "model.hmt.recall=true", "data.name=text", f"data.path={KJV_FIXTURE}", "data.seq_len=48",
            "data.batch_size=2", "data.eval_batch_size=4", "trainer.limit_val_batches=1", "eval.max_batches=1"]

TINY_VISION = ["config=vim.yaml", "model.depth=1", "model.dim=32", "data.batch_size=16", "data.eval_batch_size=64",
               "trainer.limit_val_batches=1", "trainer.stop_at_accuracy=null"]

TASKS = {
    "lm": (LanguageModelTask, [*TINY_MQAR, *TINY_MOM]),
    "hmt": (HMTTask, [*TINY_HMT, *TINY_MOM]),
    "embedding": (EmbeddingTask, [*TINY_EMBED, *TINY_MOM, "model.depth=1", "model.embedding.bidirectional=false",
                                  f"data.path={KJV_FIXTURE}", "eval.max_batches=1"]),
    "vision": (VisionClassificationTask, TINY_VISION),
}


class AuxState(NamedTuple):
    aux_loss: torch.Tensor


def return_an_aux_loss(monkeypatch) -> None:
    """VisionClassifier returns no state (no non-causal mixer has an auxiliary loss): give it one."""
    forward = VisionClassifier.forward

    def with_aux(self, images, state=None):
        logits, _ = forward(self, images, state)                                       # (B, classes)
        return logits, (AuxState(0.01 * logits.float().square().mean()),)

    monkeypatch.setattr(VisionClassifier, "forward", with_aux)


@pytest.mark.parametrize("name", TASKS)
def test_aux_loss_of_the_backbone_reaches_the_training_loss(name, tmp_path, monkeypatch):
    task_class, args = TASKS[name]
    task_losses = []
    original = task_class.task_loss

    def spy(self, batch):
        loss, state, metrics = original(self, batch)
        task_losses.append(float(loss.detach()))
        return loss, state, metrics

    monkeypatch.setattr(task_class, "task_loss", spy)
    if name == "vision":
        return_an_aux_loss(monkeypatch)
    assert run_zoo("train", *args, f"run.root={tmp_path}", "run.name=a", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.log_every_n_steps=1") == 0
    rows = [r for r in read_metrics(tmp_path / "a" / "metrics.csv") if r.get("train/loss")]
    assert len(rows) == len(task_losses) == 2
    for row, task_loss in zip(rows, task_losses):
        aux = float(row["train/aux_loss"])
        assert aux > 0
        assert float(row["train/loss"]) == pytest.approx(task_loss + aux, rel=1e-6, abs=1e-7)

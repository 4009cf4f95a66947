"""The task for image classification (``model.architecture=vision``): a classification loss and accuracy on the
``zoo.train.task.Task`` scaffolding (optimizer, schedule, NaN guard, resumable loader and checkpoint hooks).

Batches are ``{"input_ids": images (B, C, H, W), "labels": (B,)}`` (``zoo.data.loader.collate`` of image pairs).
"""
from __future__ import annotations

import torch.nn.functional as F

from zoo.eval.metrics import Tally
from zoo.train.task import Task, accuracy_values


class VisionClassificationTask(Task):
    """Trains ``zoo.models.vision.VisionClassifier``: cross-entropy on the class logits.

    Logs ``train/loss``, ``train/accuracy``, ``train/lr``, ``train/grad_norm``; after validation ``val/loss``,
    ``val/accuracy`` (and ``val/exact_match``, equal to it). AdamW with warmup + cosine (``zoo.train.task.lr_lambda``)
    and the NaN/Inf guard come from ``Task``.
    """

    def task_loss(self, batch: dict):
        logits, state = self._forward(batch["input_ids"])                             # (B, classes)
        labels = batch["labels"]                                                      # (B,)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, state, {"accuracy": (logits.argmax(-1) == labels).float().mean()}

    def validation_step(self, batch, batch_idx):
        logits, _ = self._forward(batch["input_ids"])
        # one scored position per image: the task tally gives accuracy and loss
        self._val_tally.add(logits.unsqueeze(1), batch["labels"].unsqueeze(1))

    def validation_values(self, tally: Tally) -> dict:
        return accuracy_values(tally)

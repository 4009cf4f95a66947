"""The LightningModule for image classification (``model.architecture=vision``): the LM module's optimizer, schedule,
NaN guard, resumable loader and checkpoint hooks, with a classification loss and accuracy.

Batches are ``{"input_ids": images (B, C, H, W), "labels": (B,)}`` (``zoo.data.loader.collate`` of image pairs).
"""
from __future__ import annotations

import torch.nn.functional as F

from zoo.train.module import LanguageModelTask


class VisionClassificationTask(LanguageModelTask):
    """Trains ``zoo.models.vision.VisionClassifier``: cross-entropy on the class logits.

    Logs ``train/loss``, ``train/accuracy``, ``train/lr``, ``train/grad_norm``; after validation ``val/loss``,
    ``val/accuracy`` (and ``val/exact_match``, equal to it). AdamW with warmup + cosine (``zoo.train.module.lr_lambda``)
    and the NaN/Inf guard come from ``LanguageModelTask``.
    """

    def training_step(self, batch, batch_idx):
        logits, _ = self._forward(batch["input_ids"])                                 # (B, classes)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        if self.train_loader is not None:
            self.train_loader.mark_consumed()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(-1) == labels).float().mean())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        logits, _ = self._forward(batch["input_ids"])
        # one scored position per image: the task tally gives accuracy and loss
        self._val_tally.add(logits.unsqueeze(1), batch["labels"].unsqueeze(1))

"""The task for language modelling and synthetic tasks: next-token cross-entropy on aligned (input_ids, labels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.config import Config
from zoo.eval.metrics import IGNORE_INDEX, Tally
from zoo.train.task import Task, accuracy_values

__all__ = ["LanguageModelTask"]


class LanguageModelTask(Task):
    """Trains ``zoo.models.LanguageModel`` on aligned (input_ids, labels) batches.

    Logs ``train/loss``, ``train/lr``, ``train/grad_norm`` and, after validation, ``val/loss`` with ``val/bpb``
    (text) or ``val/accuracy`` and ``val/exact_match`` (synthetic tasks).
    """

    def __init__(self, config: Config, data=None, last_checkpoint: str | None = None):
        super().__init__(config, data, last_checkpoint)
        token_bytes = [] if data is None or self.is_task else data.tokenizer.token_bytes()
        self.register_buffer("token_bytes", torch.tensor(token_bytes, dtype=torch.long), persistent=False)

    def training_labels(self, batch: dict) -> torch.Tensor:
        """The labels (B, T) the training loss scores."""
        return batch["labels"]

    def logits(self, batch: dict):
        """(logits (B, T, V), state) of the batch; packed rows (``cu_seqlens``) run end to end as one sequence."""
        input_ids = batch["input_ids"]                                                # (B, T)
        if "cu_seqlens" not in batch:
            return self._forward(input_ids)
        logits, state = self._forward(input_ids.reshape(1, -1), cu_seqlens=batch["cu_seqlens"])  # (1, B·T, V)
        return logits.reshape(*input_ids.shape, -1), state

    def task_loss(self, batch: dict):
        logits, state = self.logits(batch)                                            # (B, T, V)
        labels = self.training_labels(batch)                                          # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return loss, state, {}

    def validation_step(self, batch, batch_idx):
        logits, _ = self._forward(batch["input_ids"])
        self._val_tally.add(logits, batch["labels"], None if self.is_task else self.token_bytes)

    def validation_values(self, tally: Tally) -> dict:
        if self.is_task:
            return accuracy_values(tally)
        metrics = tally.language_model_metrics()
        return {"val/loss": metrics["loss"], "val/bpb": metrics["bpb"]}

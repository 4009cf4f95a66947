"""Evaluate a model on the held-out split of its data: the numbers ``zoo eval`` prints and writes as JSON."""
from __future__ import annotations

import torch

from zoo.data.loader import DataBundle, eval_batches
from zoo.eval.metrics import Tally


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int, max_batches: int | None = None,
             data_name: str = "") -> dict:
    """Held-out metrics: loss, perplexity and bits per byte for text; accuracy and exact match for tasks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tally = Tally()
    token_bytes = None if data.is_task else torch.tensor(data.tokenizer.token_bytes(), dtype=torch.long)
    for batch in eval_batches(data.test, batch_size, max_batches):
        logits, _ = model(batch["input_ids"].to(device))
        labels = batch["labels"].to(device)
        if logits.dim() == 2:  # a classifier (VisionClassifier): one scored position per example
            logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
        tally.add(logits, labels, token_bytes)
    model.train(was_training)
    if tally.positions == 0:
        raise ValueError("the held-out set has no scored positions")
    metrics = tally.task_metrics() if data.is_task else tally.language_model_metrics()
    return {"task": data_name, **metrics}

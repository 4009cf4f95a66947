"""Evaluate a model on the held-out split of its data: the numbers ``zoo eval`` prints and writes as JSON."""
from __future__ import annotations

import torch

from zoo.data.loader import DataBundle, eval_batches
from zoo.eval.metrics import Tally


def is_retrieval(model: torch.nn.Module, data: DataBundle) -> bool:
    """Whether to score retrieval: a model of an architecture that ``ARCHITECTURES`` marks ``retrieval`` (the
    embedding model) with retrieval data (either alone is a mismatch)."""
    from zoo.registry import ARCHITECTURES, resolve

    retrievers = [entry for entry in ARCHITECTURES.values() if entry.retrieval]
    embedder = isinstance(model, tuple(resolve(entry.model) for entry in retrievers))
    pairs = getattr(data, "corpus", None) is not None
    if embedder != pairs:
        names = " or ".join(name for entry in retrievers for name in entry.data)
        raise ValueError(f"an embedding model is evaluated on retrieval data (data.name={names}) and other "
                         f"models on text or tasks; the model and data.name do not match")
    return embedder


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int, max_batches: int | None = None,
             data_name: str = "") -> dict:
    """Held-out metrics: loss, perplexity and bits per byte for text; accuracy and exact match for tasks; recall@k
    and MRR for an embedding model on retrieval data (``zoo.eval.retrieval``)."""
    if is_retrieval(model, data):
        from zoo.eval.retrieval import evaluate_retrieval

        return evaluate_retrieval(model, data, batch_size, max_batches)
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


def harness_results(model_dir: str, tasks: list[str], include: str | None, batch_size: int,
                    limit: int | None = None) -> dict:
    """lm-evaluation-harness ``tasks`` on the model directory (``zoo.eval.harness.run_harness``), for ``zoo eval
    harness_tasks=...``; needs the ``memzoo[eval]`` extra."""
    try:
        from zoo.eval.harness import run_harness
    except ImportError as error:
        if error.name is None or not error.name.startswith("lm_eval"):
            raise
        raise ImportError("harness_tasks= needs lm-evaluation-harness: pip install 'memzoo[eval]'") from None
    return run_harness(model_dir, tasks, include, batch_size, limit)

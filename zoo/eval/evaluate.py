"""Evaluate a model on the held-out split of its data: the numbers ``zoo eval`` prints and writes as JSON."""
from __future__ import annotations

import torch

from zoo.data.loader import DataBundle, eval_batches
from zoo.eval.metrics import IGNORE_INDEX, Tally


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


def segment_length(model: torch.nn.Module) -> int | None:
    """The segment length C of a segmented model (its first sub-module with an integer ``segment_len``, e.g. a
    TitansMAC mixer), or None when it has none."""
    for module in model.modules():
        length = getattr(module, "segment_len", None)
        if isinstance(length, int) and not isinstance(length, bool):
            return length
    return None


def recall_distance(input_ids: torch.Tensor, labels: torch.Tensor, segment_len: int):
    """Near and far recall positions of MQAR-style batches: (near (B, T), far (B, T)) bools.

    A scored query's key is the first earlier occurrence of the query token; the query is near when that key lies
    in the query's segment of ``segment_len`` tokens (attention inside the segment can answer it), far when it lies in
    an earlier segment (only a memory carried across segments can). Scored positions without an earlier occurrence
    are neither.
    """
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device)
    earlier = positions[None, :] < positions[:, None]                                # (T, T): key s before query t
    same = (input_ids[:, :, None] == input_ids[:, None, :]) & earlier                  # (B, T, T)
    found = same.any(dim=-1) & (labels != IGNORE_INDEX)                              # (B, T)
    key = same.int().argmax(dim=-1)                                                  # (B, T): first earlier match
    near = found & (key // segment_len == positions // segment_len)
    return near, found & ~near


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataBundle, batch_size: int, max_batches: int | None = None,
             data_name: str = "") -> dict:
    """Held-out metrics: loss, perplexity and bits per byte for text; accuracy and exact match for tasks, and for a
    segmented model on MQAR the accuracy of near and far queries (``recall_distance``); recall@k and MRR for an
    embedding model on retrieval data (``zoo.eval.retrieval``)."""
    if is_retrieval(model, data):
        from zoo.eval.retrieval import evaluate_retrieval

        return evaluate_retrieval(model, data, batch_size, max_batches)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tally = Tally()
    token_bytes = None if data.is_task else torch.tensor(data.tokenizer.token_bytes(), dtype=torch.long)
    segment_len = segment_length(model) if data_name == "mqar" else None
    split = {"near": [0, 0], "far": [0, 0]}  # [correct, positions] of near and far queries
    for batch in eval_batches(data.test, batch_size, max_batches):
        input_ids = batch["input_ids"].to(device)
        logits, _ = model(input_ids)
        labels = batch["labels"].to(device)
        if logits.dim() == 2:  # a classifier (VisionClassifier): one scored position per example
            logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
        tally.add(logits, labels, token_bytes)
        if segment_len is not None:
            hit = logits.argmax(-1) == labels  # (B, T)
            for name, where in zip(("near", "far"), recall_distance(input_ids, labels, segment_len)):
                split[name][0] += int((hit & where).sum())
                split[name][1] += int(where.sum())
    model.train(was_training)
    if tally.positions == 0:
        raise ValueError("the held-out set has no scored positions")
    metrics = tally.task_metrics() if data.is_task else tally.language_model_metrics()
    if segment_len is not None:  # a segmented model on MQAR: accuracy by where the key lies
        metrics["segment_len"] = segment_len
        for name, (correct, positions) in split.items():
            metrics[f"{name}_accuracy"] = correct / max(positions, 1)
            metrics[f"{name}_positions"] = positions
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

"""Contrastive training of ``EmbeddingModel``: the InfoNCE loss and its Lightning task (NV-Embed, arXiv 2405.17428).

    loss_fn = ContrastiveLoss(temperature=0.05, num_hard_negatives=1)
    q, pos, neg = torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 1, 32)
    loss = loss_fn(q, pos, neg)                                    # scalar; 16 candidates per query
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ConfigError
from zoo.eval.metrics import Tally
from zoo.train.task import Task


class ContrastiveLoss(nn.Module):
    """InfoNCE over cosine similarities with temperature τ: mean cross-entropy of each query against its positive.

    ``forward(q (B, D), pos (B, D), neg (B, h, D) | None, group_ids (B,) | None) -> scalar``. Inputs are
    L2-normalised here (idempotent for unit vectors).

    - in-batch negatives on: candidates ``[pos_0 .. pos_{B-1}; neg flattened to B·h]``, logits (B, B(1+h)), target
      of row i = i. With ``group_ids``, candidates of row i's group other than its own positive are masked to -inf
      (duplicates and false negatives): the positives of other rows, and hard negatives whose group is given by the
      keyword extension ``negative_group_ids`` (B, h).
    - in-batch negatives off: logits_i = [q_i·pos_i, q_i·neg_i1 .. q_i·neg_ih] / τ, (B, 1+h), target 0; groups do
      not apply.
    - with ``num_hard_negatives = h > 0`` every call needs ``neg`` with ``neg.shape[1] == h``.
    """

    def __init__(self, temperature: float = 0.05, use_in_batch_negatives: bool = True, num_hard_negatives: int = 0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ContrastiveLoss: temperature must be > 0, got {temperature}")
        if num_hard_negatives < 0:
            raise ValueError(f"ContrastiveLoss: num_hard_negatives must be >= 0, got {num_hard_negatives}")
        self.temperature = temperature
        self.use_in_batch_negatives = use_in_batch_negatives
        self.num_hard_negatives = num_hard_negatives

    def check_inputs(self, q, pos, neg, group_ids, negative_group_ids) -> None:
        """Raise ``ValueError`` naming the argument whose shape is wrong."""
        if q.dim() != 2 or q.shape[0] == 0:
            raise ValueError(f"ContrastiveLoss: q must be a non-empty (B, D) batch, got shape {tuple(q.shape)}")
        if pos.shape != q.shape:
            raise ValueError(f"ContrastiveLoss: pos has shape {tuple(pos.shape)}, expected q's {tuple(q.shape)}")
        h = self.num_hard_negatives
        if neg is None and h:
            raise ValueError(f"ContrastiveLoss: num_hard_negatives={h} but no neg given; pass neg (B, {h}, D)")
        if neg is not None and (neg.dim() != 3 or neg.shape[0] != q.shape[0] or neg.shape[2] != q.shape[1]
                                or neg.shape[1] != h):
            raise ValueError(f"ContrastiveLoss: neg has shape {tuple(neg.shape)}, expected (B, h, D) = "
                             f"{(q.shape[0], h, q.shape[1])} (h = num_hard_negatives)")
        if group_ids is not None and tuple(group_ids.shape) != (q.shape[0],):
            raise ValueError(f"ContrastiveLoss: group_ids has shape {tuple(group_ids.shape)}, expected ({q.shape[0]},)")
        if negative_group_ids is not None and (neg is None or negative_group_ids.shape != neg.shape[:2]):
            raise ValueError(f"ContrastiveLoss: negative_group_ids has shape {tuple(negative_group_ids.shape)}, "
                             f"expected neg's (B, h)")

    def logits_and_targets(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                           group_ids: torch.Tensor | None = None, *,
                           negative_group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, B(1+h)) or (B, 1+h), targets (B,)) as described in the class docstring."""
        self.check_inputs(q, pos, neg, group_ids, negative_group_ids)
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, pos = F.normalize(q.to(dtype), dim=-1), F.normalize(pos.to(dtype), dim=-1)           # (B, D)
        neg = None if neg is None or neg.shape[1] == 0 else F.normalize(neg.to(dtype), dim=-1)  # (B, h, D)
        B = q.shape[0]
        if not self.use_in_batch_negatives:
            candidates = pos.unsqueeze(1) if neg is None else torch.cat([pos.unsqueeze(1), neg], dim=1)
            logits = torch.einsum("bd,bcd->bc", q, candidates) / self.temperature                 # (B, 1+h)
            return logits, torch.zeros(B, dtype=torch.long, device=q.device)
        candidates = pos if neg is None else torch.cat([pos, neg.flatten(0, 1)])                  # (B(1+h), D)
        logits = q @ candidates.T / self.temperature                                              # (B, B(1+h))
        targets = torch.arange(B, device=q.device)
        if group_ids is not None:
            logits = logits.masked_fill(self.same_group_mask(group_ids, negative_group_ids, logits.shape[1]),
                                        float("-inf"))
        return logits, targets

    @staticmethod
    def same_group_mask(group_ids: torch.Tensor, negative_group_ids: torch.Tensor | None, columns: int):
        """(B, columns) bool: candidate c belongs to row i's group and is not row i's own positive."""
        B = group_ids.shape[0]
        same = torch.zeros(B, columns, dtype=torch.bool, device=group_ids.device)
        same[:, :B] = group_ids[:, None] == group_ids[None, :]                                   # other positives
        if negative_group_ids is not None:
            same[:, B:] = group_ids[:, None] == negative_group_ids.flatten()[None, :]             # hard negatives
        return same & ~torch.eye(B, columns, dtype=torch.bool, device=group_ids.device)

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                group_ids: torch.Tensor | None = None, *,
                negative_group_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits, targets = self.logits_and_targets(q, pos, neg, group_ids, negative_group_ids=negative_group_ids)
        return F.cross_entropy(logits, targets)


def contrastive_statistics(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict:
    """Top-1 accuracy, mean positive cosine and mean cosine of the (unmasked) negatives of a logits matrix."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, targets]                                                              # (B,)
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative[rows, targets] = False
    is_negative &= torch.isfinite(logits)
    negatives = torch.where(is_negative, logits, 0.0).sum() / is_negative.sum().clamp_min(1)
    return {"accuracy": (logits.argmax(dim=-1) == targets).float().mean(),
            "positive_cosine": positive.mean() * temperature, "negative_cosine": negatives * temperature}


class EmbeddingTask(Task):
    """Trains ``zoo.models.EmbeddingModel`` with ``ContrastiveLoss`` on retrieval pairs (``data.name=ict|needle``).

    Logs ``train/loss``, ``train/accuracy`` (in-batch top-1), ``train/positive_cosine``, ``train/negative_cosine``,
    ``train/lr``, ``train/grad_norm`` (and ``train/aux_loss`` when the backbone returns one); after validation
    ``val/loss``, ``val/accuracy`` over held-out pair batches and the held-out retrieval metrics ``val/recall@1``,
    ``val/recall@10``, ``val/mrr@10``. Optimizer, schedule, NaN guard, resumable loader state and checkpoint hooks
    come from ``Task``. In-batch negatives are the rows of the local batch (no gathering across devices).
    """

    def __init__(self, config, data=None, last_checkpoint: str | None = None):
        super().__init__(config, data, last_checkpoint)
        if data is not None and getattr(data, "corpus", None) is None:
            raise ConfigError(f"model.architecture=embedding trains on retrieval pairs; set data.name=ict or needle "
                             f"(got data.name={config.data.name})")
        settings = config.model.embedding
        self.loss_fn = ContrastiveLoss(settings.temperature, settings.in_batch_negatives,
                                       config.data.retrieval.hard_negatives)

    def collate(self, items: list) -> dict:
        """A padded batch of retrieval pairs (the data's ``PairCollator``)."""
        return self.data.collate(items)

    # ------------------------------------------------------------------------------------------------ steps
    def embed_batch(self, batch: dict):
        """(q (B, D), pos (B, D), neg (B, h, D) | None, block states of both passes).

        Queries go in one pass, positives and negatives in another.
        """
        q, query_state = self._forward(batch["input_ids"], batch["attention_mask"], batch["pool_mask"],
                                       return_state=True)
        B = q.shape[0]
        passage_ids, passage_mask = batch["positive_ids"], batch["positive_mask"]
        if "negative_ids" in batch:
            passage_ids = torch.cat([passage_ids, batch["negative_ids"].flatten(0, 1)])          # (B(1+h), Tp)
            passage_mask = torch.cat([passage_mask, batch["negative_mask"].flatten(0, 1)])
        passages, passage_state = self._forward(passage_ids, passage_mask, return_state=True)  # (B(1+h), D)
        neg = passages[B:].view(B, -1, passages.shape[-1]) if "negative_ids" in batch else None
        return q, passages[:B], neg, query_state + passage_state

    def batch_logits(self, batch: dict):
        """(logits, targets, block states of the embedding passes) of a batch of pairs."""
        q, pos, neg, state = self.embed_batch(batch)
        logits, targets = self.loss_fn.logits_and_targets(q, pos, neg, batch["group_ids"],
                                                          negative_group_ids=batch.get("negative_group_ids"))
        return logits, targets, state

    def task_loss(self, batch: dict):
        logits, targets, state = self.batch_logits(batch)
        loss = F.cross_entropy(logits.float(), targets)
        stats = contrastive_statistics(logits.detach(), targets, self.loss_fn.temperature)
        return loss, state, stats

    def validation_step(self, batch, batch_idx):
        logits, targets, _ = self.batch_logits(batch)
        # one scored position per query: the task tally gives accuracy and loss
        self._val_tally.add(logits.unsqueeze(1), targets.unsqueeze(1))

    def validation_values(self, tally: Tally) -> dict:
        from zoo.eval.retrieval import evaluate_corpus

        metrics = tally.task_metrics()
        values = {"val/loss": metrics["loss"], "val/accuracy": metrics["accuracy"]}
        metrics = evaluate_corpus(self.model, self.data.corpus, self.config.data.eval_batch_size, self.data.tokenizer)
        values.update({f"val/{key}": metrics[key] for key in ("recall@1", "recall@10", "mrr@10")})
        return values

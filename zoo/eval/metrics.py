"""Held-out metrics from logits and aligned labels: loss, perplexity, bits per byte, task accuracy.

Scores are accumulated as sums over batches (``Tally``), so results do not depend on the evaluation batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class Tally:
    """Running sums over scored positions."""

    nll: float = 0.0            # summed negative log-likelihood (nats) of scored positions
    positions: int = 0          # scored positions
    byte_nll: float = 0.0       # nll over positions whose target stands for bytes
    bytes: int = 0              # UTF-8 bytes of those targets
    correct: int = 0            # argmax-correct scored positions
    examples: int = 0           # examples with at least one scored position
    exact: int = 0              # examples whose scored positions are all correct
    extra: dict = field(default_factory=dict)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor | None = None) -> None:
        """Accumulate a batch: logits (B, T, V), labels (B, T) with -100 at unscored positions."""
        logits = logits.float()
        scored = labels != IGNORE_INDEX                                             # (B, T)
        safe = labels.clamp_min(0)
        nll = F.cross_entropy(logits.flatten(0, 1), safe.flatten(), reduction="none").view_as(labels)
        nll = nll * scored
        hit = (logits.argmax(-1) == labels) & scored                                 # (B, T)
        self.nll += float(nll.sum())
        self.positions += int(scored.sum())
        self.correct += int(hit.sum())
        has_scored = scored.any(dim=1)
        self.examples += int(has_scored.sum())
        self.exact += int(((hit | ~scored).all(dim=1) & has_scored).sum())
        if token_bytes is not None:
            nbytes = token_bytes.to(labels.device)[safe] * scored                    # (B, T)
            self.byte_nll += float((nll * (nbytes > 0)).sum())
            self.bytes += int(nbytes.sum())

    def language_model_metrics(self) -> dict:
        """loss (nats per scored token), perplexity and bits per byte."""
        loss = self.nll / max(self.positions, 1)
        bpb = self.byte_nll / (math.log(2) * self.bytes) if self.bytes else float("nan")
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": bpb,
                "scored_positions": self.positions, "scored_bytes": self.bytes}

    def task_metrics(self) -> dict:
        """accuracy (pooled over scored positions), exact_match (per example) and the loss."""
        return {"accuracy": self.correct / max(self.positions, 1), "exact_match": self.exact / max(self.examples, 1),
                "loss": self.nll / max(self.positions, 1), "examples": self.examples,
                "scored_positions": self.positions}

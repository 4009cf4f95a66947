"""The LightningModule for HMT (docs/hmt.md#training): BPTT over the segments of each text window.

Each training window of ``data.seq_len`` tokens holds several HMT segments and is unrolled in one forward, with
gradients through every segment and the cached memories. The two training options of ``model.hmt`` live here:
``loss_last_segments=s`` scores only the last s segments of each window (default 1, the reference's loss; null
scores every segment), and
``freeze_backbone`` trains only m0, T, Wq and Wk. Loss, validation and the scaffolding are ``LanguageModelTask``'s.
"""
from __future__ import annotations

import torch

from zoo.config import Config
from zoo.eval.metrics import IGNORE_INDEX
from zoo.train.module import LanguageModelTask


def last_segments_labels(labels: torch.Tensor, segment_len: int, segments: int | None) -> torch.Tensor:
    """labels (B, T) with every position before the last ``segments`` segments set to IGNORE_INDEX.

    Segments are aligned to the window start, as HMT cuts them; None keeps all labels.
    """
    if segments is None:
        return labels
    first_scored = max(0, labels.shape[1] - segments * segment_len)
    return torch.cat([torch.full_like(labels[:, :first_scored], IGNORE_INDEX), labels[:, first_scored:]], dim=1)


class HMTTask(LanguageModelTask):
    """Trains ``zoo.models.HMT`` on windows of several segments: mean cross-entropy over the scored text positions.

    Logs ``train/loss``, ``train/lr``, ``train/grad_norm`` and, when the backbone returns one, ``train/aux_loss``
    (``HMTState.aux_loss``); validation reports ``val/loss`` and ``val/bpb`` over all positions.
    """

    def __init__(self, config: Config, data=None, last_checkpoint: str | None = None):
        super().__init__(config, data, last_checkpoint)
        options = config.model.hmt
        if options.loss_last_segments is not None and options.loss_last_segments < 1:
            raise ValueError(f"model.hmt.loss_last_segments must be >= 1 or null, got {options.loss_last_segments}")
        self.loss_last_segments = options.loss_last_segments
        if options.freeze_backbone:
            self.model.backbone.requires_grad_(False)

    def training_labels(self, batch: dict) -> torch.Tensor:
        """The window's labels (B, T) with the segments before the last ``loss_last_segments`` unscored."""
        return last_segments_labels(batch["labels"], self.model.segment_len, self.loss_last_segments)

"""``DataBundle``: what training and evaluation take from the data, whatever its kind (text, task, images, pairs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataBundle:
    """What training and evaluation need from the data: datasets, tokenizer and how to score."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    tokenizer: object
    vocab_size: int
    is_task: bool

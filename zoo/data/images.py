"""Image data for the vision classifier: scikit-learn's bundled 8×8 digits (no download).

1,797 grey images, pixels 0–16 scaled by 1/16, 10 classes. Held out: the first round(0.2·1797) = 359 indices of
``randperm(1797, generator=seeded(data.seed))``; the rest train. Items are ``(image (1, 8, 8) float32, label int64)``.
"""
from __future__ import annotations

import torch

from zoo.data.bundle import DataBundle
from zoo.errors import DataError

HELD_OUT_FRACTION = 0.2


class ImageDataset(torch.utils.data.Dataset):
    """Map-style ``(image (C, H, W) float32, label () int64)`` pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images (N, 1, 8, 8) in [0, 1], labels (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data needs scikit-learn: pip install 'memzoo[vision]'") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)                          # (N,)
    return images, labels


def digits_datasets(seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, held-out) digits split by ``randperm(N, seeded(seed))``: the first round(0.2·N) indices are held out."""
    images, labels = load_digits_tensors()
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(HELD_OUT_FRACTION * n)
    test, train = perm[:n_test], perm[n_test:]
    return ImageDataset(images[train], labels[train]), ImageDataset(images[test], labels[test])


def digits_bundle(data_cfg):
    """The ``DataBundle`` of ``data.name=digits`` (classification: scored like a task, no tokenizer)."""
    train, test = digits_datasets(data_cfg.seed)
    return DataBundle(train, test, tokenizer=None, vocab_size=0, is_task=True)

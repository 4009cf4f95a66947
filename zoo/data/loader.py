"""Datasets for a config and the resumable, rank-sharded training loader."""
from __future__ import annotations

import torch

from zoo.data.bundle import DataBundle
from zoo.data.tokenizer import ByteTokenizer


class TaskDataset(torch.utils.data.Dataset):
    """Map-style view of a synthetic task: ``dataset[i] = task.example(i, split, seed)``."""

    def __init__(self, task, split: str, seed: int):
        self.task, self.split, self.seed = task, split, seed

    def __len__(self) -> int:
        return self.task.train_examples if self.split == "train" else self.task.test_examples

    def __getitem__(self, i: int):
        return self.task.example(i, self.split, self.seed)


def build_data(data_cfg) -> DataBundle:
    """Datasets for ``data_cfg`` (text windows, or a synthetic task's train/test streams)."""
    from zoo.config import task_config

    if data_cfg.name == "digits":
        from zoo.data.images import digits_bundle

        return digits_bundle(data_cfg)
    if data_cfg.name in ("ict", "needle"):
        from zoo.data.retrieval import retrieval_bundle

        return retrieval_bundle(data_cfg)
    task = task_config(data_cfg)
    if task is not None:
        return DataBundle(TaskDataset(task, "train", data_cfg.seed), TaskDataset(task, "test", data_cfg.seed),
                          ByteTokenizer(), task.vocab_size, True)
    from zoo.data.text import text_datasets

    train, test, tokenizer = text_datasets(data_cfg)
    return DataBundle(train, test, tokenizer, tokenizer.vocab_size, False)


def collate(items):
    """Stack (input_ids, labels) pairs into a batch dict; packed items (input_ids, labels, document lengths) add
    ``cu_seqlens``, the document boundaries of the batch's rows laid end to end (B·T tokens)."""
    input_ids = torch.stack([item[0] for item in items])
    labels = torch.stack([item[1] for item in items])
    batch = {"input_ids": input_ids, "labels": labels}
    if len(items[0]) == 3:
        lengths = torch.cat([item[2] for item in items])
        batch["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return batch


class ResumableLoader:
    """An endless, exactly resumable stream of training batches, sharded by rank.

    Epoch e visits ``randperm(len(dataset), generator=seeded(seed, e))``; position j of a global batch goes to rank
    ``j mod world_size``; an incomplete last global batch is dropped. ``state_dict() = {epoch, batches_consumed}``
    counts the batches training has *used* (``mark_consumed``), not those prefetched, so a resumed run sees
    exactly the batches it would have seen. ``collate_fn`` turns a list of items into a batch (default ``collate``).
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, collate_fn=collate):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.collate_fn = collate_fn
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"the training set has {len(dataset)} examples, fewer than one global batch "
                             f"({batch_size} x {world_size} devices); lower data.batch_size")
        self.consumed = 0

    def state_dict(self) -> dict:
        epoch, offset = divmod(self.consumed, self.batches_per_epoch)
        return {"epoch": epoch, "batches_consumed": offset}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["epoch"]) * self.batches_per_epoch + int(state["batches_consumed"])

    def mark_consumed(self) -> None:
        """Called once per training batch actually used."""
        self.consumed += 1

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def batch_indices(self, global_batch: int) -> list[int]:
        """Dataset indices of this rank's part of global batch number ``global_batch``."""
        epoch, b = divmod(global_batch, self.batches_per_epoch)
        span = self.batch_size * self.world_size
        chunk = self._permutation(epoch)[b * span:(b + 1) * span]
        return chunk[self.rank::self.world_size].tolist()

    def __iter__(self):
        batch = self.consumed
        while True:
            yield self.collate_fn([self.dataset[i] for i in self.batch_indices(batch)])
            batch += 1


def eval_batches(dataset, batch_size: int, max_batches: int | None = None):
    """The held-out set in order, in batches (the last may be short); optionally capped."""
    n = len(dataset)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, n))])

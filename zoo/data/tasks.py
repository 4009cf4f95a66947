"""Synthetic memory tasks generated from a seed: MQAR, selective copying, induction heads, S-NIAH.

Each task is a config dataclass with ``example(index, split, seed) -> (input_ids, labels)``, both int64 of shape (L,).
Labels are aligned with inputs: ``labels[t]`` is the target of the model output at position t, -100 elsewhere.
Example i of split s draws everything from its own ``torch.Generator`` seeded from
``blake2b(f"{task}|{seed}|{split}|{i}")``, so the data depends only on the task parameters, ``data.seed``, the
split and the index (never on batch size, workers, world size or the training seed).

The dataclasses are part of the torch-free config schema; torch is imported inside the generators only.
"""
from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = -100
SPLITS = ("train", "test")


def example_seed(task: str, seed: int, split: str, index: int) -> int:
    """The 63-bit seed of one example (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{task}|{seed}|{split}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(task: str, seed: int, split: str, index: int):
    import torch

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return torch.Generator().manual_seed(example_seed(task, seed, split, index))


@dataclass
class MQARConfig:
    """Multi-query associative recall in Zoology's layout (arXiv 2312.04927): ``k1 v1 ... kD vD`` then queries."""

    seq_len: int = 128
    num_kv_pairs: int = 8
    vocab_size: int = 512
    power_a: float = 0.01
    random_filler: bool = False
    train_examples: int = 100_000
    test_examples: int = 3_000

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and bound that is violated."""
        if self.seq_len % 2:
            raise ValueError(f"mqar: seq_len ({self.seq_len}) must be even")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"mqar: 4*num_kv_pairs ({4 * self.num_kv_pairs}) must be <= seq_len ({self.seq_len})")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"mqar: num_kv_pairs ({self.num_kv_pairs}) must be <= vocab_size/2 - 1 "
                             f"({self.vocab_size // 2 - 1})")
        _check_counts("mqar", self)

    def example(self, index: int, split: str, seed: int = 0):
        """One example: (input_ids (L,), labels (L,)); the label of a query key is its value."""
        import torch

        g = _generator("mqar", seed, split, index)
        L, D, V = self.seq_len, self.num_kv_pairs, self.vocab_size
        keys = 1 + torch.randperm(V // 2 - 1, generator=g)[:D]                       # (D,) in [1, V/2)
        values = V // 2 + torch.randperm(V - V // 2, generator=g)[:D]                # (D,) in [V/2, V)
        slots = (L - 2 * D) // 2
        weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)  # (S,)
        gaps = torch.multinomial(weights, D, replacement=False, generator=g)         # (D,) slot of key j
        if self.random_filler:
            input_ids = torch.randint(0, V, (L,), generator=g)
        else:
            input_ids = torch.zeros(L, dtype=torch.long)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        input_ids[0:2 * D:2] = keys
        input_ids[1:2 * D:2] = values
        query_positions = 2 * D + 2 * gaps                                           # (D,)
        input_ids[query_positions] = keys
        labels[query_positions] = values
        if self.random_filler:  # the slot after each query is filler too; keep it off the scored positions
            input_ids[2 * D + 1::2] = torch.randint(0, V, ((L - 2 * D) // 2,), generator=g)
        return input_ids, labels


@dataclass
class SelectiveCopyConfig:
    """Selective copying (Mamba Sec. 4.1, MAD): copy the content tokens, scattered among blanks, after ``copy``."""

    seq_len: int = 256
    num_tokens: int = 16
    vocab_size: int = 16
    train_examples: int = 12_800
    test_examples: int = 1_280

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and bound that is violated."""
        if self.seq_len <= 2 * self.num_tokens + 1:
            raise ValueError(f"selective_copy: seq_len ({self.seq_len}) must be > 2*num_tokens + 1 "
                             f"({2 * self.num_tokens + 1})")
        if self.vocab_size < 3:
            raise ValueError(f"selective_copy: vocab_size ({self.vocab_size}) must be >= 3")
        _check_counts("selective_copy", self)

    def example(self, index: int, split: str, seed: int = 0):
        """One example; content ids in [0, V-2), blank = V-2, copy = V-1."""
        import torch

        g = _generator("selective_copy", seed, split, index)
        L, D, V = self.seq_len, self.num_tokens, self.vocab_size
        blank, copy = V - 2, V - 1
        content = torch.randint(0, V - 2, (D,), generator=g)                         # (D,)
        positions = torch.sort(torch.randperm(L - D - 1, generator=g)[:D]).values     # (D,)
        input_ids = torch.full((L,), blank, dtype=torch.long)
        input_ids[positions] = content
        input_ids[L - D - 1] = copy
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        labels[L - D:] = content
        return input_ids, labels


@dataclass
class InductionConfig:
    """Induction heads (Mamba Sec. 4.1): after the second ``trigger``, predict the token that followed the first."""

    seq_len: int = 256
    vocab_size: int = 16
    train_examples: int = 100_000
    test_examples: int = 1_000

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and bound that is violated."""
        if self.seq_len < 4:
            raise ValueError(f"induction: seq_len ({self.seq_len}) must be >= 4")
        if self.vocab_size < 3:
            raise ValueError(f"induction: vocab_size ({self.vocab_size}) must be >= 3")
        _check_counts("induction", self)

    def example(self, index: int, split: str, seed: int = 0, seq_len: int | None = None):
        """One example of length ``seq_len`` (default the config's); ``trigger = V-1`` occurs exactly twice."""
        import torch

        g = _generator("induction", seed, split, index)
        L, V = seq_len or self.seq_len, self.vocab_size
        x = torch.randint(0, V - 1, (L,), generator=g)                               # (L,)
        p = int(torch.randint(0, L - 2, (), generator=g))
        trigger = V - 1
        x[p] = trigger
        x[L - 1] = trigger
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.long)
        labels[L - 1] = x[p + 1]
        return x, labels


HAYSTACK_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
PROMPT = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
          "about the number afterwards.\n{context}\nWhat is the special magic number for {key} mentioned in the "
          "provided text? The special magic number for {key} mentioned in the provided text is")


def _words(name: str) -> list[str]:
    return (importlib.resources.files("zoo.data") / "words" / f"{name}.txt").read_text().split()


@dataclass
class NIAHConfig:
    """Single needle in a haystack (RULER niah_single_1) over the byte tokenizer."""

    seq_len: int = 1024
    value_digits: int = 7
    depth: Optional[float] = None
    train_examples: int = 20_000
    test_examples: int = 500
    vocab_size: int = 258

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and bound that is violated."""
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"niah: depth ({self.depth}) must be in [0, 1] or null")
        if self.value_digits < 1:
            raise ValueError("niah: value_digits must be >= 1")
        if self.vocab_size != 258:
            raise ValueError("niah: vocab_size must be 258 (the byte tokenizer)")
        longest = len(PROMPT.format(context=NEEDLE.format(key="x" * 30, value="9" * self.value_digits),
                                    key="x" * 30)) + 1 + self.value_digits
        if longest + len(HAYSTACK_LINE) + 1 > self.seq_len:
            raise ValueError(f"niah: seq_len ({self.seq_len}) holds no haystack line; use at least "
                             f"{longest + len(HAYSTACK_LINE) + 1} (512 is a safe minimum)")
        _check_counts("niah", self)

    def example(self, index: int, split: str, seed: int = 0):
        """One example: prompt + answer bytes, right-padded with ``<pad>`` (257); labels on the answer only."""
        import torch

        from zoo.data.tokenizer import PAD_ID

        g = _generator("niah", seed, split, index)
        adjectives, nouns = _words("adjectives"), _words("nouns")
        key = (f"{adjectives[int(torch.randint(len(adjectives), (), generator=g))]}-"
               f"{nouns[int(torch.randint(len(nouns), (), generator=g))]}")
        low, high = 10 ** (self.value_digits - 1), 10 ** self.value_digits - 1
        value = str(int(torch.randint(low, high + 1, (), generator=g)))
        needle = NEEDLE.format(key=key, value=value)
        answer = f" {value}".encode()
        fixed = len(PROMPT.format(context="", key=key).encode()) + len(answer) + len(needle)
        lines = max(0, (self.seq_len - fixed) // (len(HAYSTACK_LINE) + 1))
        if self.depth is None:
            at = int(torch.randint(0, lines + 1, (), generator=g))
        else:
            at = round(self.depth * lines)
        context_lines = [HAYSTACK_LINE] * lines
        context_lines.insert(at, needle)
        prompt = PROMPT.format(context="\n".join(context_lines), key=key).encode()
        ids = list(prompt) + list(answer)
        input_ids = torch.full((self.seq_len,), PAD_ID, dtype=torch.long)
        input_ids[:len(ids)] = torch.tensor(ids)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        # labels are aligned: the output at position t predicts input t+1, so the answer's bytes are the targets
        # of the positions just before them.
        start = len(prompt)
        labels[start - 1:start - 1 + len(answer)] = torch.tensor(list(answer))
        return input_ids, labels


def _check_counts(task: str, cfg) -> None:
    if cfg.train_examples < 1 or cfg.test_examples < 1:
        raise ValueError(f"{task}: train_examples and test_examples must be >= 1")


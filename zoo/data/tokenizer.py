"""Tokenizers: byte-level by default (ids 0..255 = UTF-8 bytes, 256 = <eos>, 257 = <pad>), or a local tokenizer.json.

A model directory carries its tokenizer (docs/interop.md#tokenizers): ``zoo_tokenizer.json`` records the byte
tokenizer's spec, ``tokenizer.json`` is a Hugging Face ``tokenizers`` file (copied into zoo exports, or the one of an
imported Hugging Face directory).

    from zoo.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer("checkpoints/titans-kjv")          # ByteTokenizer
    tokenizer.decode(tokenizer.encode("In the beginning"))         # 'In the beginning'
"""
from __future__ import annotations

import json
from pathlib import Path

EOS_ID = 256
PAD_ID = 257
BYTE_VOCAB = 258


class ByteTokenizer:
    """UTF-8 bytes plus two specials. ``decode`` drops specials and replaces invalid UTF-8."""

    vocab_size = BYTE_VOCAB
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for specials): the denominator of bits per byte."""
        return [1] * 256 + [0, 0]


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from a local ``tokenizer.json`` (needs the ``tokenizers`` package).

    The end-of-sequence token is ``eos_token`` when given (a Hugging Face directory's ``tokenizer_config.json``
    names it), else ``<eos>`` or ``<|endoftext|>``.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (data.tokenizer is 'bytes' or a tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        candidates = [eos_token] if eos_token else ["<eos>", "<|endoftext|>"]
        eos = next((self._tok.token_to_id(name) for name in candidates if self._tok.token_to_id(name) is not None),
                   None)
        if eos is None:
            raise ValueError(f"tokenizer {path} has no {' or '.join(candidates)} token")
        self.eos_id = eos
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = eos if pad is None else pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> list[int]:
        specials = {self.eos_id, self.pad_id}
        return [0 if i in specials else len(self._tok.decode([i]).encode("utf-8")) for i in range(self.vocab_size)]


RECORD_FILE = "zoo_tokenizer.json"   # the byte tokenizer's spec in a model directory
TOKENIZER_FILE = "tokenizer.json"     # a Hugging Face tokenizers file in a model directory


def load_tokenizer(spec: str | Path):
    """``'bytes'`` -> ``ByteTokenizer``; a ``tokenizer.json`` path -> ``FileTokenizer``; a model directory -> the
    tokenizer it carries (``model_tokenizer``)."""
    if spec == "bytes":
        return ByteTokenizer()
    return model_tokenizer(spec) if Path(spec).is_dir() else FileTokenizer(spec)


def model_tokenizer(model_dir: str | Path):
    """The tokenizer of a model directory: its ``zoo_tokenizer.json`` record, its ``tokenizer.json``, or (exports
    written before tokenizers were recorded) the ``data.tokenizer`` of its zoo ``config.json``."""
    model_dir = Path(model_dir)
    record, file = model_dir / RECORD_FILE, model_dir / TOKENIZER_FILE
    if record.is_file():
        return tokenizer_from_record(json.loads(record.read_text()), record)
    if file.is_file():
        return FileTokenizer(file, hf_eos_token(model_dir))
    config = model_dir / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    spec = data.get("data", {}).get("tokenizer") if isinstance(data.get("data"), dict) else None
    if spec == "bytes" or (spec and Path(spec).is_file()):
        return load_tokenizer(spec)
    raise FileNotFoundError(f"{model_dir} carries no tokenizer (no {RECORD_FILE} or {TOKENIZER_FILE}"
                            f"{f'; its data.tokenizer {spec} is missing' if spec else ''}); copy the model's "
                            f"tokenizer.json into it")


def tokenizer_record(spec: str) -> dict:
    """What ``zoo_tokenizer.json`` holds for the byte tokenizer (``spec == 'bytes'``)."""
    if spec != "bytes":
        raise ValueError(f"tokenizer_record: only the byte tokenizer has a record, got {spec!r}; a tokenizer.json "
                         f"is copied instead")
    return {"type": "bytes", "vocab_size": BYTE_VOCAB, "eos_id": EOS_ID, "pad_id": PAD_ID}


def tokenizer_from_record(record: dict, source: Path) -> ByteTokenizer:
    """The tokenizer a ``zoo_tokenizer.json`` record describes (the byte tokenizer, the only kind recorded)."""
    if record != tokenizer_record("bytes"):
        raise ValueError(f"{source}: not a byte tokenizer record {tokenizer_record('bytes')} (got {record}); "
                         f"a model with another tokenizer carries a tokenizer.json instead")
    return ByteTokenizer()


def hf_eos_token(model_dir: Path) -> str | None:
    """The ``eos_token`` a Hugging Face directory's ``tokenizer_config.json`` names (a string or an AddedToken
    dict), or None."""
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos

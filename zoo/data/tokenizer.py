"""Tokenizers: byte-level by default (ids 0..255 = UTF-8 bytes, 256 = <eos>, 257 = <pad>), or a local tokenizer.json."""
from __future__ import annotations

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
    """A Hugging Face ``tokenizers`` tokenizer from a local ``tokenizer.json`` (needs the ``tokenizers`` package)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (data.tokenizer is 'bytes' or a tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id("<eos>")
        if eos is None:
            eos = self._tok.token_to_id("<|endoftext|>")
        if eos is None:
            raise ValueError(f"tokenizer {path} has no <eos> or <|endoftext|> token")
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


def load_tokenizer(spec: str):
    """``'bytes'`` -> ``ByteTokenizer``; a path -> ``FileTokenizer``."""
    return ByteTokenizer() if spec == "bytes" else FileTokenizer(spec)

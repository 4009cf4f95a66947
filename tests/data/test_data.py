"""Text data, tokenizer and the resumable loader (docs/tasks.md#embedded-data, docs/training.md#exact-resume)."""
import json

import pytest
import torch

from zoo.config import DataConfig
from zoo.data.loader import ResumableLoader, TaskDataset, build_data
from zoo.data.tasks import MQARConfig
from zoo.data.text import load_documents
from zoo.data.tokenizer import ByteTokenizer
from zoo.errors import DataError
from tests.helpers import KJV_FIXTURE, run_zoo


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert tok.decode(ids + [256, 257]) == "héllo" and tok.vocab_size == 258
    assert tok.decode([0xff]) == "\ufffd"


def test_book_split_holds_out_the_last_books():
    train, test = load_documents(DataConfig(name="text", path=str(KJV_FIXTURE)))
    assert len(test) == 5 and all("James" not in d for d in train)       # James has 5 chapters
    assert test[0].startswith("James, a servant of God")
    fraction = load_documents(DataConfig(name="text", path=str(KJV_FIXTURE), split="fraction", val_fraction=0.1))
    assert len(fraction[1]) == 3 and len(fraction[0]) + len(fraction[1]) == 33


def test_text_windows_are_shifted_by_one():
    data = build_data(DataConfig(name="text", path=str(KJV_FIXTURE), seq_len=64))
    x, y = data.train[3]
    assert x.shape == y.shape == (64,) and torch.equal(x[1:], y[:-1])
    assert data.vocab_size == 258 and not data.is_task


def test_missing_data_file_and_hub_id_errors():
    with pytest.raises(DataError, match="data file not found: nope/train.txt"):
        build_data(DataConfig(name="text", path="nope/train.txt"))
    with pytest.raises(DataError, match="'roneneldan/TinyStories' is not a local file; zoo runs offline"):
        build_data(DataConfig(name="text", path="roneneldan/TinyStories"))


def _first_batches(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        out.append(next(it)["input_ids"])
        loader.mark_consumed()
    return out


def test_loader_resumes_at_the_next_unconsumed_batch():
    data = TaskDataset(MQARConfig(seq_len=32, num_kv_pairs=4, vocab_size=64, train_examples=40), "train", 0)
    straight = _first_batches(ResumableLoader(data, 4, seed=0), 25)       # crosses two epoch boundaries
    first = ResumableLoader(data, 4, seed=0)
    it = iter(first)
    for _ in range(7):
        next(it)
        first.mark_consumed()
    next(it)                                                             # prefetched, never used
    state = first.state_dict()
    resumed = ResumableLoader(data, 4, seed=0)
    resumed.load_state_dict(state)
    rest = _first_batches(resumed, 18)
    assert all(torch.equal(a, b) for a, b in zip(straight[7:], rest))
    assert state == {"epoch": 0, "batches_consumed": 7}


def test_loader_shards_by_rank_without_overlap():
    data = TaskDataset(MQARConfig(seq_len=32, num_kv_pairs=4, vocab_size=64, train_examples=64), "train", 0)
    ranks = [ResumableLoader(data, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [set(idx for b in range(8) for idx in loader.batch_indices(b)) for loader in ranks]
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 64


def test_cli_missing_data_file_is_one_line(capsys, tmp_path):
    assert run_zoo("train", "data.name=text", f"data.path={tmp_path / 'nope.txt'}", f"run.root={tmp_path}") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"zoo: data file not found: {tmp_path / 'nope.txt'} (data.path)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("blank.jsonl", b"\n\n", "is empty"),
    ("binary.txt", b"abc\n\x00\x01\x02", "line 2: holds NUL bytes, so it is binary"),
    ("latin1.txt", "one\nh\xe9llo\n".encode("latin-1"), "line 2: not UTF-8 (byte 0xe9 at offset 5)"),
    ("latin1.jsonl", b'{"text": "\xff"}\n', "line 1: not UTF-8"),
    ("truncated.jsonl", b'{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON (Expecting ',' delimiter"),
    ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', "line 2: a list, expected a JSON object"),
    ("broken.parquet", b"PAR1 not really", "is not a readable parquet file (Parquet magic bytes"),
    ("empty.parquet", b"", "is empty"),
    ("broken.json", b'[{"text": "a"},', "cannot be read as json (ValueError:"),
    ("numbers.jsonl", b'{"text": "a"}\n{"text": 2}\n', "row 2: field 'text' is int 2, not text"),
])
def test_unreadable_data_file_is_one_line_naming_file_row_and_cause(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert run_zoo("train", "data.name=text", f"data.path={path}", f"run.root={tmp_path}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err, err


def test_a_directory_as_data_file_is_reported_as_a_directory(tmp_path):
    with pytest.raises(DataError, match=f"data.path {tmp_path} is a directory; give a .txt, .jsonl or .parquet file"):
        build_data(DataConfig(name="text", path=str(tmp_path)))


def test_records_without_the_text_field_are_counted_in_one_warning(tmp_path, capsys):
    path = tmp_path / "partial.jsonl"
    path.write_text('{"text": "in the beginning"}\n{"body": "x"}\n{"text": "was the word"}\n{"body": "y"}\n'
                    '{"text": "and the word"}\n')
    train, test = load_documents(DataConfig(name="text", path=str(path), split="fraction", val_fraction=0.3))
    assert len(train) + len(test) == 3
    assert capsys.readouterr().err == f"warning: 2 of 5 records in {path} have no 'text' field; they are skipped\n"


def _jsonl(path, texts, books=None):
    rows = [{"text": t, **({"book": b} if books else {})} for t, b in zip(texts, books or texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_split_messages_name_the_split_in_effect_and_do_not_advise_it_again(tmp_path):
    single_book = _jsonl(tmp_path / "book.jsonl", ["a b c", "d e f"], books=["A", "A"])
    with pytest.raises(DataError, match="data.split=book holds out the last 1 of 1 books, which leaves no training "
                                        "documents; use data.split=fraction"):
        build_data(DataConfig(name="text", path=single_book))
    one = _jsonl(tmp_path / "one.jsonl", ["hello world"])
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name="text", path=one, split="fraction"))
    assert "data.split=fraction (data.val_fraction=0.01) holds out 1 of 1 documents" in str(info.value)
    assert "use data.split=fraction" not in str(info.value)
    everything = _jsonl(tmp_path / "ten.jsonl", ["word " * 50] * 10)
    with pytest.raises(DataError, match=r"data.split=fraction \(data.val_fraction=1.0\) holds out 10 of 10 documents, "
                                        r"which leaves no training documents; lower data.val_fraction"):
        build_data(DataConfig(name="text", path=everything, split="fraction", val_fraction=1.0))


@pytest.mark.parametrize("split", ["book", "fraction"])
def test_a_held_out_split_too_short_for_a_window_says_it_is_the_held_out_split(tmp_path, split):
    path = _jsonl(tmp_path / "ten.jsonl", ["word " * 50] * 10)
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name="text", path=path, split=split, seq_len=512))
    message = str(info.value)
    assert message.startswith("the held-out split holds 251 tokens, fewer than data.seq_len + 1 (513)")
    assert "(data.val_fraction=0.01) holds out 1 of 10 documents; lower data.seq_len or raise data.val_fraction" \
        in message and "use data.split=fraction" not in message

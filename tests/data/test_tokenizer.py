"""A local tokenizer.json (Hugging Face tokenizers) round-trips text and counts bytes per token."""
import pytest


def test_tokenizer_json_roundtrip(tmp_path, kjv_fixture):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = [l for l in kjv_fixture.read_text().splitlines()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    from zoo.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(str(path))
    ids = loaded.encode("In the beginning God created")
    assert loaded.decode(ids) == "In the beginning God created" and len(ids) < 28
    counts = loaded.token_bytes()
    assert counts[loaded.eos_id] == 0 and sum(counts[i] for i in ids) == len("In the beginning God created")

"""Building blocks: ShortConv state, RMSNorm, SwiGLU, tokenizer.json, CLI data errors, bf16 training."""
import pytest
import torch

from zoo.layers.conv import ShortConv
from zoo.layers.mlp import SwiGLU, swiglu_hidden
from zoo.layers.norm import RMSNorm
from tests.helpers import TINY_MQAR, check_decode_equals_full, check_stream_split, rel_err, run_zoo


class ConvAsMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ShortConv(6, size=4, bias=True).double()

    def forward(self, x, state=None):
        return self.conv(x, state)


def test_short_conv_is_a_causal_depthwise_filter():
    torch.manual_seed(0)
    conv = ShortConv(3, size=3).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y, state = conv(x)
    w = conv.weight                                                      # (C, size); last tap multiplies x_t
    expected = sum(w[:, 2 - j] * torch.nn.functional.pad(x, (0, 0, j, 0))[:, :7] for j in range(3))
    assert rel_err(y, expected) < 1e-12 and torch.equal(state, x[:, -2:])


def test_short_conv_streams_and_decodes():
    torch.manual_seed(1)
    mixer = ConvAsMixer()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    check_stream_split(mixer, x, splits=[1, 2, 3, 8], tol=1e-13)
    check_decode_equals_full(mixer, x, tol=1e-13)


def test_norms_and_swiglu():
    x = torch.randn(2, 3, 8)
    norm = RMSNorm(8)
    assert torch.allclose(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt(), atol=1e-6)
    assert swiglu_hidden(96, 8 / 3) == 256 and SwiGLU(8, 32)(x).shape == x.shape


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


def test_cli_missing_data_file_is_one_line(capsys, tmp_path):
    assert run_zoo("train", "data.name=text", f"data.path={tmp_path / 'nope.txt'}", f"run.root={tmp_path}") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"zoo: data file not found: {tmp_path / 'nope.txt'} (data.path)"
    assert not (tmp_path / "run").exists()


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=bf16", "trainer.max_steps=2",
                   "trainer.precision=bf16-mixed") == 0
    assert (tmp_path / "bf16" / "model" / "model.safetensors").is_file()

"""The CLI's option checks and messages: every bad input is one line on stderr with exit code 2."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from tests.helpers import run_zoo
from zoo.checkpoint import export_model, read_export_config
from zoo.errors import CheckpointError
from zoo.config import from_dict
from zoo.models import build_model
from zoo.strict_json import dumps_strict

VISION = "checkpoints/vim-digits"
EMBEDDING = "checkpoints/nv-embed-ict"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """An export directory of an untrained two-block LM."""
    config = from_dict({"model": {"dim": 32, "depth": 1, "attention": {"heads": 2}}})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lm") / "model"
    export_model(build_model(config), config, out)
    return out


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


@pytest.mark.parametrize("option, named", [
    ("max_new_tokens=-5", "max_new_tokens=-5"), ("max_new_tokens=abc", "max_new_tokens=abc"),
    ("max_new_tokens=2.5", "max_new_tokens=2.5"), ("temperature=-1", "temperature=-1"),
    ("temperature=nan", "temperature=nan"), ("temperature=inf", "temperature=inf"),
    ("temperature=hot", "temperature=hot"), ("top_k=0", "top_k=0"), ("top_k=-3", "top_k=-3"),
    ("top_k=many", "top_k=many"), ("seed=x", "seed=x")])
def test_generate_rejects_a_bad_option_in_one_line_naming_it(tiny_lm, capsys, option, named):
    assert run_zoo("generate", f"checkpoint={tiny_lm}", "prompt=ab", option) == 2
    assert named in one_line_error(capsys)


@pytest.mark.parametrize("option", ["max_new_tokens=0", "temperature=0", "top_k=null", "top_k=1"])
def test_generate_accepts_the_edges_of_each_option(tiny_lm, capsys, option):
    assert run_zoo("generate", f"checkpoint={tiny_lm}", "prompt=ab", "max_new_tokens=3", option) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize("checkpoint, architecture", [(VISION, "vision"), (EMBEDDING, "embedding")])
def test_generate_on_a_model_that_does_not_generate_names_the_ones_that_do(capsys, checkpoint, architecture):
    assert run_zoo("generate", f"checkpoint={checkpoint}", "prompt=ab") == 2
    err = one_line_error(capsys)
    assert f"model.architecture={architecture}" in err and "lm, hmt" in err


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": -1}, {"max_new_tokens": 2.0}, {"temperature": float("nan")},
                                    {"temperature": -0.5}, {"top_k": 0}])
def test_language_model_generate_rejects_bad_arguments(kwargs):
    config = from_dict({"model": {"dim": 32, "depth": 1, "attention": {"heads": 2}}})
    model = build_model(config)
    arguments = {"max_new_tokens": 2, "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        model.generate(torch.tensor([[1, 2]]), **arguments)


@pytest.mark.parametrize("verb", ["eval", "generate"])
def test_a_training_checkpoint_given_to_eval_or_generate_points_at_zoo_export(tmp_path, capsys, verb):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    assert run_zoo(verb, f"checkpoint={ckpt}") == 2
    assert f"{ckpt} is a training checkpoint; export it with zoo export checkpoint={ckpt} out=DIR" in \
        one_line_error(capsys)


def test_zoo_load_of_a_training_checkpoint_points_at_zoo_export(tmp_path):
    import zoo

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="is a training checkpoint; export it with zoo export checkpoint="):
        zoo.load(ckpt)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"{not json", b"[1, 2]"])
def test_a_garbage_config_json_is_one_checkpoint_error(tiny_lm, tmp_path, capsys, content):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_lm, broken)
    (broken / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{broken / 'config.json'}"):
        read_export_config(broken)
    assert run_zoo("generate", f"checkpoint={broken}") == 2
    assert "config.json" in one_line_error(capsys)


def test_a_directory_given_where_a_file_is_expected_is_reported_as_a_directory(tmp_path, capsys):
    assert run_zoo("export", f"checkpoint={tmp_path}", f"out={tmp_path / 'out'}") == 2
    assert f"{tmp_path} is a directory, not a checkpoint file; give a training checkpoint such as " \
           f"{tmp_path / 'last.ckpt'}" in one_line_error(capsys)
    assert run_zoo("train", f"config={tmp_path}") == 2
    assert f"config={tmp_path} is a directory; give a .yaml file" in one_line_error(capsys)


def test_strict_json_writes_null_for_non_finite_values_with_a_warning(capsys):
    text = dumps_strict({"loss": float("nan"), "scores": [1.0, float("inf")], "n": 3}, "eval.json")
    assert json.loads(text) == {"loss": None, "scores": [1.0, None], "n": 3}
    assert capsys.readouterr().err == "warning: eval.json: non-finite values written as null: loss=nan, scores[1]=inf\n"


def test_zoo_eval_of_a_model_with_nan_weights_prints_strict_json(tmp_path, capsys):
    config = from_dict({"model": {"dim": 32, "depth": 1, "vocab_size": 64, "attention": {"heads": 2}},
                        "data": {"name": "mqar", "eval_batch_size": 8,
                                 "mqar": {"seq_len": 32, "num_kv_pairs": 4, "vocab_size": 64, "test_examples": 8}}})
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    export_model(model, config, tmp_path / "nan")
    capsys.readouterr()
    assert run_zoo("eval", f"checkpoint={tmp_path / 'nan'}", f"eval.out={tmp_path / 'eval.json'}") == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert printed["loss"] is None and "non-finite values written as null: loss=nan" in captured.err


def test_an_export_config_json_is_strict_json(tmp_path, capsys):
    config = from_dict({"model": {"dim": 32, "depth": 1, "attention": {"heads": 2}}})
    config.optim.lr = float("nan")
    export_model(build_model(config), config, tmp_path / "model")
    text = (tmp_path / "model" / "config.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name))["optim"]["lr"] is None
    assert "optim.lr=nan" in capsys.readouterr().err


def _failing_train(error: BaseException):
    def train(*args, **kwargs):
        raise error
    return train


def _wrapped_disk_full() -> RuntimeError:
    """What torch.save raises on a full disk: a RuntimeError raised from the OSError."""
    error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    error.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/last.ckpt")
    return error


@pytest.mark.parametrize("error, where", [
    (OSError(errno.ENOSPC, "No space left on device"), os.path.join("runs-root", "r")),
    (OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/metrics.csv"), "/data/runs/r/metrics.csv"),
    (_wrapped_disk_full(), "/data/runs/r/last.ckpt")])
def test_a_full_disk_names_the_path_and_says_resume_auto_completes_the_run(monkeypatch, capsys, error, where):
    from zoo.train import fit

    monkeypatch.setattr(fit, "train", _failing_train(error))
    assert run_zoo("train", "run.root=runs-root", "run.name=r") == 1
    err = one_line_error(capsys)
    assert f"no space left on device writing {where}; free space there" in err
    assert "resume=auto to complete the run" in err


def test_a_permission_error_is_one_line_naming_the_path(monkeypatch, capsys):
    from zoo.train import fit

    monkeypatch.setattr(fit, "train", _failing_train(PermissionError(errno.EACCES, "Permission denied", "/ro/runs/r")))
    assert run_zoo("train", "run.name=r") == 2
    err = one_line_error(capsys)
    assert err.startswith("zoo: permission denied: /ro/runs/r; make it writable") and "Traceback" not in err


def test_a_full_disk_outside_training_does_not_mention_resume(tiny_lm, monkeypatch, capsys):
    from zoo import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/config.json")

    monkeypatch.setattr(checkpoint, "export_from_ckpt", full)
    assert run_zoo("export", "checkpoint=last.ckpt", "out=/data/out") == 1
    err = one_line_error(capsys)
    assert "no space left on device writing /data/out/config.json; free space there, then rerun it" in err
    assert "resume" not in err


def test_a_truncated_last_ckpt_blocking_a_fresh_start_says_how_to_proceed(tmp_path, capsys):
    from tests.helpers import TINY_MQAR

    run = tmp_path / "r"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"")
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=r") == 2
    err = one_line_error(capsys)
    assert f"{run} already holds a run whose checkpoint {run / 'last.ckpt'}" in err
    assert "is truncated or corrupted, so it cannot be resumed; pass run.name=NAME for a new run, or move" in err
    assert (run / "last.ckpt").exists()


def test_loading_an_export_with_nan_weights_warns_naming_the_tensors(tiny_lm, tmp_path, capsys):
    import zoo

    config = from_dict({"model": {"dim": 32, "depth": 1, "attention": {"heads": 2}}})
    model = build_model(config)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    export_model(model, config, tmp_path / "nan")
    capsys.readouterr()
    zoo.load(tmp_path / "nan")
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / 'nan' / 'model.safetensors'}: 1 of ") and "(norm.weight)" in err
    zoo.load(tiny_lm)
    assert capsys.readouterr().err == ""


def test_a_directory_given_as_resume_is_reported_as_a_directory(tmp_path, capsys):
    from tests.helpers import TINY_MQAR

    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=r", f"resume={tmp_path}") == 2
    assert f"resume={tmp_path} is a directory; give its checkpoint file ({tmp_path / 'last.ckpt'})" in \
        one_line_error(capsys)


@pytest.mark.parametrize("option, named", [("top_p=0", "top_p=0"), ("top_p=1.5", "top_p=1.5"),
                                           ("repetition_penalty=0", "repetition_penalty=0"),
                                           ("repetition_penalty=nan", "repetition_penalty=nan"),
                                           ("stream=yes", "stream=yes"), ("stop=", "stop= is empty"),
                                           ("prompts=missing.txt", "prompts=missing.txt")])
def test_generate_rejects_bad_sampling_stop_and_stream_options(tiny_lm, capsys, option, named):
    assert run_zoo("generate", f"checkpoint={tiny_lm}", "prompt=ab", option) == 2
    assert named in one_line_error(capsys)


def test_generate_batches_prompts_of_different_lengths_like_one_by_one(tiny_lm, capsys, tmp_path):
    common = [f"checkpoint={tiny_lm}", "max_new_tokens=5", "temperature=0", "top_p=0.9", "repetition_penalty=1.3"]
    alone = []
    for prompt in ("ab", "a longer prompt"):
        assert run_zoo("generate", *common, f"prompt={prompt}") == 0
        alone.append(capsys.readouterr().out)
    assert run_zoo("generate", *common, "prompt=ab", "prompt=a longer prompt") == 0
    assert capsys.readouterr().out == "".join(alone)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\na longer prompt\n")
    assert run_zoo("generate", *common, f"prompts={prompts}") == 0
    assert capsys.readouterr().out == "".join(alone)


def test_generate_streams_tokens_and_stops_at_a_stop_string(tiny_lm, capsys):
    common = [f"checkpoint={tiny_lm}", "prompt=ab", "max_new_tokens=8", "temperature=0"]
    assert run_zoo("generate", *common) == 0
    full = capsys.readouterr().out
    assert run_zoo("generate", *common, "stream=true") == 0
    assert capsys.readouterr().out == full
    stop = full[4:6]                                   # the 3rd and 4th new characters (byte tokens)
    assert run_zoo("generate", *common, f"stop={stop}") == 0
    assert capsys.readouterr().out.rstrip("\n") == full[:full.index(stop, 2) + len(stop)]
    assert run_zoo("generate", *common, "stream=true", "prompt=cd") == 2
    assert "stream=true prints one row" in one_line_error(capsys)

"""Faults during training and what survives them: killed or failing checkpoint writes, a full disk, signals, a
missing or foreign TMPDIR, and what export, eval and a fresh start may overwrite (README "What zoo guarantees")."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MQAR, run_zoo, train_losses


class Killed(BaseException):
    """The writer's process dying mid-write: no ``except Exception`` handler runs."""


def faulty_save(monkeypatch, fail_on_call: int, fault):
    """Replace ``torch.save`` with one that, on call ``fail_on_call``, writes half of the checkpoint then raises."""
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) != fail_on_call:
            return real_save(obj, handle, *args, **kwargs)
        real_save(obj, tmp := Path(tempfile.mkdtemp()) / "full.ckpt")
        data = tmp.read_bytes()
        handle.write(data[: len(data) // 2])
        raise fault

    monkeypatch.setattr(torch, "save", save)


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def stray_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def args(tmp_path, name, *extra):
    return [*TINY_MQAR, f"run.root={tmp_path}", f"run.name={name}", "trainer.checkpoint_every_n_steps=2", *extra]


def test_eval_never_overwrites_the_checkpoints_eval_json(tmp_path, capsys):
    assert run_zoo("train", *args(tmp_path, "v", "trainer.max_steps=2")) == 0
    model = tmp_path / "v" / "model"
    reference = '{"accuracy": 0.9932, "examples": 3000}\n'
    (model / "eval.json").write_text(reference)
    capsys.readouterr()
    assert run_zoo("eval", f"checkpoint={model}", "eval.max_batches=1") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (model / "eval.json").read_text() == reference
    out = tmp_path / "result.json"
    assert run_zoo("eval", f"checkpoint={model}", "eval.max_batches=1", f"eval.out={out}") == 0
    assert json.loads(out.read_text()) == printed and (model / "eval.json").read_text() == reference

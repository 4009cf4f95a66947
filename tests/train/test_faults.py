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
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import TINY_MQAR, run_zoo, train_losses
from zoo.checkpoint import write_atomically


class Killed(BaseException):
    """The writer's process dying mid-write: no ``except Exception`` handler runs."""


def faulty_save(monkeypatch, fail_on_call: int, fault, scratch: Path):
    """Replace ``torch.save`` with one that, on call ``fail_on_call``, writes half of the checkpoint then raises
    (``scratch``: a directory for the complete file it halves)."""
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) != fail_on_call:
            return real_save(obj, handle, *args, **kwargs)
        real_save(obj, scratch / "full.ckpt")
        data = (scratch / "full.ckpt").read_bytes()
        handle.write(data[: len(data) // 2])
        raise fault

    monkeypatch.setattr(torch, "save", save)


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def stray_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def args(tmp_path, name, *extra):
    return [*TINY_MQAR, f"run.root={tmp_path}", f"run.name={name}", "trainer.checkpoint_every_n_steps=2", *extra]


def test_killed_checkpoint_write_keeps_the_last_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    assert run_zoo("train", *args(tmp_path, "straight", "trainer.max_steps=6")) == 0
    with monkeypatch.context() as patch:
        faulty_save(patch, fail_on_call=2, fault=Killed(), scratch=tmp_path)  # dies writing the step-4 checkpoint
        with pytest.raises(Killed):
            run_zoo("train", *args(tmp_path, "killed", "trainer.max_steps=6"))
    run = tmp_path / "killed"
    assert ckpt_step(run / "last.ckpt") == 2 and stray_files(run) == []
    assert run_zoo("train", *args(tmp_path, "killed", "trainer.max_steps=6"), "resume=auto") == 0
    assert train_losses(run) == train_losses(tmp_path / "straight")


def test_killed_copy_from_a_foreign_filesystem_tmpdir_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A TMPDIR on another filesystem (tmpfs /tmp, Docker volumes): a rename out of it fails with EXDEV, so a file
    staged there is copied into place in a truncating copy; the process is killed halfway through any such copy."""
    foreign = tmp_path / "tmpfs"
    foreign.mkdir()
    run = tmp_path / "x"
    real_rename, real_replace = os.rename, os.replace

    def across_filesystems(real):
        def rename(src, dst, *a, **kw):
            if Path(src).resolve().parent != Path(dst).resolve().parent and foreign in Path(src).resolve().parents:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst, *a, **kw)
        return rename

    def killed_copy(dst_fd, src_fd, offset, count):
        os.write(dst_fd, os.pread(src_fd, 1000, 0))
        raise Killed()

    assert run_zoo("train", *args(tmp_path, "x", "trainer.max_steps=2")) == 0
    with monkeypatch.context() as patch:
        patch.setenv("TMPDIR", str(foreign))
        patch.setattr(tempfile, "tempdir", str(foreign))
        patch.setattr(os, "rename", across_filesystems(real_rename))
        patch.setattr(os, "replace", across_filesystems(real_replace))
        patch.setattr(os, "sendfile", killed_copy)
        with contextlib.suppress(Killed):                                  # zoo never copies across filesystems
            run_zoo("train", *args(tmp_path, "x", "trainer.max_steps=4"), "resume=auto")
    assert ckpt_step(run / "last.ckpt") in (2, 4)                          # loads: never a torn file
    assert run_zoo("train", *args(tmp_path, "x", "trainer.max_steps=4"), "resume=auto") == 0
    assert ckpt_step(run / "last.ckpt") == 4


def test_torn_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    assert run_zoo("train", *args(tmp_path, "t", "trainer.max_steps=5")) == 0
    run = tmp_path / "t"
    assert ckpt_step(run / "last.ckpt") == 5 and ckpt_step(run / "previous.ckpt") == 4
    data = (run / "last.ckpt").read_bytes()
    (run / "last.ckpt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert run_zoo("train", *args(tmp_path, "t", "trainer.max_steps=6"), "resume=auto") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "previous.ckpt" in line]
    assert warnings == [f"warning: checkpoint {run / 'last.ckpt'} ({len(data) // 3:,} bytes) is truncated or "
                        f"corrupted; resuming from {run / 'previous.ckpt'} (step 4)"]
    assert ckpt_step(run / "last.ckpt") == 6


def test_a_torn_last_checkpoint_never_replaces_the_previous_one(tmp_path):
    last, previous = tmp_path / "last.ckpt", tmp_path / "previous.ckpt"
    torch.save({"global_step": 4}, previous)
    last.write_bytes(previous.read_bytes()[:100])
    write_atomically(last, lambda handle: torch.save({"global_step": 6}, handle))
    assert ckpt_step(previous) == 4 and ckpt_step(last) == 6
    write_atomically(last, lambda handle: torch.save({"global_step": 8}, handle))
    assert ckpt_step(previous) == 6 and ckpt_step(last) == 8


def test_disk_full_in_the_run_directory_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    run = tmp_path / "full"
    with monkeypatch.context() as patch:
        faulty_save(patch, fail_on_call=2, fault=OSError(errno.ENOSPC, "No space left on device"),
                    scratch=tmp_path)
        capsys.readouterr()
        assert run_zoo("train", *args(tmp_path, "full", "trainer.max_steps=6")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "last.ckpt") in err[0] and "resume=auto" in err[0], err
    assert ckpt_step(run / "last.ckpt") == 2 and stray_files(run) == []
    assert run_zoo("train", *args(tmp_path, "full", "trainer.max_steps=6"), "resume=auto") == 0
    assert ckpt_step(run / "last.ckpt") == 6


def test_disk_full_inside_torch_save_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    """torch.save's zip writer turns a full disk into "RuntimeError: ... unexpected pos"; the line still names the
    file and says how to continue."""
    import zoo.checkpoint

    run = tmp_path / "full"
    with monkeypatch.context() as patch:
        faulty_save(patch, fail_on_call=2, fault=RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                               "unexpected pos 13888 vs 13782"), scratch=tmp_path)
        patch.setattr(zoo.checkpoint.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
        capsys.readouterr()
        assert run_zoo("train", *args(tmp_path, "full", "trainer.max_steps=6")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(run / "last.ckpt") in err[0], err
    assert "resume=auto" in err[0] and ckpt_step(run / "last.ckpt") == 2 and stray_files(run) == []


def test_missing_tmpdir_does_not_stop_checkpoints(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-tmp"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    assert run_zoo("train", *args(tmp_path, "m", "trainer.max_steps=3")) == 0
    assert run_zoo("train", *args(tmp_path, "m", "trainer.max_steps=4"), "resume=auto") == 0
    assert ckpt_step(tmp_path / "m" / "last.ckpt") == 4 and not missing.exists()


def test_checkpoints_are_never_staged_in_a_foreign_tmpdir(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign-fs"
    foreign.mkdir()
    monkeypatch.setenv("TMPDIR", str(foreign))
    monkeypatch.setattr(tempfile, "tempdir", str(foreign))
    real_mkstemp, staged_in = tempfile.mkstemp, []

    def mkstemp(*a, dir=None, **kw):
        staged_in.append(Path(dir or tempfile.gettempdir()))
        return real_mkstemp(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert run_zoo("train", *args(tmp_path, "f", "trainer.max_steps=3")) == 0
    assert run_zoo("train", *args(tmp_path, "f", "trainer.max_steps=4"), "resume=auto") == 0
    assert staged_in and set(staged_in) == {tmp_path / "f"}
    assert list(foreign.iterdir()) == []


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_last_step_exits_non_zero_and_resume_is_bit_exact(tmp_path, signum, code):
    """The signal lands after step 3 with no periodic checkpoint written: the run saves the step it completed, exits
    128 + the signal, and resuming it ends bitwise where an uninterrupted run does."""
    run = tmp_path / "s"
    common = ["trainer.checkpoint_every_n_steps=1000", "optim.decay_steps=40"]
    command = [sys.executable, "-m", "zoo.cli", "train", *args(tmp_path, "s", "trainer.max_steps=100000"), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=Path(__file__).parents[2])
    for line in process.stdout:
        if line.startswith("step 3/"):
            break
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    step = ckpt_step(run / "last.ckpt")
    assert step >= 3 and f"saved step {step} to {run / 'last.ckpt'}" in err, err
    assert "interrupted at step" in err and "resume=auto" in err and stray_files(run) == []
    assert run_zoo("train", *args(tmp_path, "s", f"trainer.max_steps={step + 2}"), *common, "resume=auto") == 0
    assert run_zoo("train", *args(tmp_path, "straight", f"trainer.max_steps={step + 2}"), *common) == 0
    assert ckpt_step(run / "last.ckpt") == step + 2
    resumed, straight = final_weights(run), final_weights(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight), "resume after a signal is not exact"


def test_export_never_deletes_what_is_not_an_export(tmp_path, capsys, monkeypatch):
    assert run_zoo("train", *args(tmp_path, "e", "trainer.max_steps=2")) == 0
    run = tmp_path / "e"
    ckpt = run / "last.ckpt"
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for out in (user, run, tmp_path):
        before = sorted(p.name for p in out.iterdir())
        capsys.readouterr()
        assert run_zoo("export", f"checkpoint={ckpt}", f"out={out}") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"zoo: out={out} holds files that are not a zoo export (") and "out=DIR" in err, err
        assert sorted(p.name for p in out.iterdir()) == before
    monkeypatch.chdir(user)
    assert run_zoo("export", f"checkpoint={ckpt}", "out=.") == 2
    assert (user / "notes.txt").read_text() == "keep me" and ckpt_step(ckpt) == 2
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new", run / "model"):           # empty, missing, previous export
        assert run_zoo("export", f"checkpoint={ckpt}", f"out={out}") == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "zoo_tokenizer.json"]


def test_fresh_start_refuses_a_finished_run_without_checkpoint(tmp_path, capsys):
    assert run_zoo("train", *args(tmp_path, "r", "trainer.max_steps=2")) == 0
    run = tmp_path / "r"
    for name in ("last.ckpt", "previous.ckpt"):
        (run / name).unlink(missing_ok=True)
    before = {name: (run / name).read_bytes() for name in ("eval.json", "metrics.csv", "config.yaml", "run.json")}
    capsys.readouterr()
    assert run_zoo("train", *args(tmp_path, "r", "trainer.max_steps=2")) == 2
    refusal = (f"zoo: {run} already holds a finished run (model/, eval.json, metrics.csv, config.yaml, run.json) and "
               f"no checkpoint to resume; pass run.name=NAME for a new run, or move {run} aside")
    assert capsys.readouterr().err.strip() == refusal
    assert run_zoo("train", *args(tmp_path, "r", "trainer.max_steps=2"), "resume=auto") == 2   # nor does auto
    assert capsys.readouterr().err.strip() == refusal
    assert {name: (run / name).read_bytes() for name in before} == before


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


def test_run_json_keeps_every_start(tmp_path):
    assert run_zoo("train", *args(tmp_path, "h", "trainer.max_steps=2")) == 0
    first = json.loads((tmp_path / "h" / "run.json").read_text())
    assert run_zoo("train", *args(tmp_path, "h", "trainer.max_steps=4"), "resume=auto") == 0
    info = json.loads((tmp_path / "h" / "run.json").read_text())
    assert info["start_time"] == first["start_time"] and info["command"] == first["command"]
    assert [start["command"][-1] for start in info["starts"]] == ["trainer.max_steps=2", "resume=auto"]
    assert info["starts"][1]["resumed_from"] == str(tmp_path / "h" / "last.ckpt") and info["final_step"] == 4

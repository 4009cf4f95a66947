"""Training, resume, checkpoints, export and evaluation through the CLI (docs/training.md)."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from zoo.checkpoint import export_model, load_export
from zoo.config import parse_args
from zoo.models import build_model
from tests.helpers import TINY_MQAR, TINY_TEXT, read_metrics, run_zoo, train_losses


def test_resume_is_bit_exact(tmp_path):
    common = [*TINY_TEXT, "model.dropout=0.1", f"run.root={tmp_path}", "trainer.checkpoint_every_n_steps=5",
              "trainer.val_check_interval=7", "optim.decay_steps=20"]
    assert run_zoo("train", *common, "run.name=straight", "trainer.max_steps=20") == 0
    assert run_zoo("train", *common, "run.name=split", "trainer.max_steps=10") == 0
    assert run_zoo("train", *common, "run.name=split", "trainer.max_steps=20", "resume=auto") == 0
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(straight) == list(range(1, 21))
    assert straight == split                                             # identical at every step
    assert len(set(straight.values())) > 10                              # the losses are real, not constant


def test_ckpt_loads_weights_only(tmp_path):
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=w", "trainer.max_steps=3") == 0
    checkpoint = torch.load(tmp_path / "w" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and "zoo_loader" in checkpoint and "zoo_rng" in checkpoint


def test_fresh_start_refuses_existing_run(tmp_path, capsys):
    args = [*TINY_MQAR, f"run.root={tmp_path}", "run.name=r", "trainer.max_steps=2"]
    assert run_zoo("train", *args) == 0
    before = (tmp_path / "r" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert run_zoo("train", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"zoo: {tmp_path / 'r'} already holds a run (last.ckpt at step 2); pass resume=auto to continue, "
                   f"or run.name=NAME for a new run")
    assert (tmp_path / "r" / "last.ckpt").read_bytes() == before


def test_resume_with_changed_model_lists_the_difference(tmp_path, capsys):
    args = [*TINY_MQAR, f"run.root={tmp_path}", "run.name=r", "trainer.max_steps=2"]
    assert run_zoo("train", *args) == 0
    capsys.readouterr()
    assert run_zoo("train", *args, "model.dim=48", "resume=auto") == 2
    assert "model.dim 32 vs 48" in capsys.readouterr().err


def test_metrics_survive_resume(tmp_path):
    common = [*TINY_MQAR, f"run.root={tmp_path}", "run.name=m", "trainer.checkpoint_every_n_steps=4",
              "trainer.val_check_interval=3"]
    assert run_zoo("train", *common, "trainer.max_steps=6") == 0
    assert run_zoo("train", *common, "trainer.max_steps=12", "resume=auto") == 0
    rows = read_metrics(tmp_path / "m" / "metrics.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps))                                    # one row per step, none replayed twice
    losses = train_losses(tmp_path / "m")
    assert len(losses) == 12
    assert any(r.get("val/accuracy") for r in rows)
    for name in ("loss.png", "lr.png", "grad_norm.png", "throughput.png", "config.yaml", "run.json", "eval.json"):
        assert (tmp_path / "m" / name).is_file(), name
    assert (tmp_path / "m" / "logs" / "0").is_dir() and (tmp_path / "m" / "logs" / "1").is_dir()


def test_nan_loss_stops_with_step_and_ckpt(tmp_path, capsys, monkeypatch):
    from zoo.train import module

    original = module.LanguageModelTask.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 5 else loss

    monkeypatch.setattr(module.LanguageModelTask, "training_step", poisoned)
    args = [*TINY_MQAR, f"run.root={tmp_path}", "run.name=nan", "trainer.max_steps=10",
            "trainer.checkpoint_every_n_steps=4"]
    assert run_zoo("train", *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"loss became nan/inf at step 6; last good checkpoint: {tmp_path / 'nan' / 'last.ckpt'} (step 4)" in err
    checkpoint = torch.load(tmp_path / "nan" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_progress_lines_in_non_tty(tmp_path, capsys):
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=p", "trainer.max_steps=4",
                   "trainer.log_every_n_steps=2", "trainer.val_check_interval=4") == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("step ")]
    assert [l.split(" |")[0] for l in lines] == ["step 2/4", "step 4/4"]
    assert all(" | lr " in l and "tok/s" in l and "elapsed, eta" in l for l in lines)
    assert "val step 4 | loss" in out and "| acc " in out


def test_export_roundtrip_and_mode_0644(tmp_path, capsys):
    assert run_zoo("train", *TINY_TEXT, f"run.root={tmp_path}", "run.name=e", "trainer.max_steps=3") == 0
    run = tmp_path / "e"
    assert run_zoo("export", f"checkpoint={run / 'last.ckpt'}", f"out={tmp_path / 'x'}") == 0
    for path in (tmp_path / "x" / "config.json", tmp_path / "x" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755
    model = load_export(tmp_path / "x")
    end_of_training = load_export(run / "model")
    x = torch.randint(0, 258, (1, 16))
    assert torch.equal(model(x)[0], end_of_training(x)[0])
    capsys.readouterr()
    assert run_zoo("eval", f"checkpoint={run / 'model'}", "eval.max_batches=4", f"eval.out={tmp_path / 'e.json'}") == 0
    reported = json.loads((tmp_path / "e.json").read_text())
    final = json.loads((run / "eval.json").read_text())
    assert reported["bpb"] == pytest.approx(final["bpb"], rel=1e-6) and reported["bpb"] > 0
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "pt" and handle.metadata()["architecture"] == "LanguageModel"


def test_truncated_ckpt_one_line_error(tmp_path, capsys):
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=t", "trainer.max_steps=2") == 0
    ckpt = tmp_path / "t" / "last.ckpt"
    data = ckpt.read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run_zoo("export", f"checkpoint={broken}", f"out={tmp_path / 'y'}") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"zoo: checkpoint {broken} ({len(data) // 2:,} bytes) is truncated or corrupted"
    assert not (tmp_path / "y").exists()
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert run_zoo("export", f"checkpoint={empty}") == 2
    assert "is truncated or corrupted" in capsys.readouterr().err


def test_missing_and_incomplete_export_dirs(tmp_path, capsys):
    assert run_zoo("eval", f"checkpoint={tmp_path / 'nothing'}") == 2
    assert f"no checkpoint at {tmp_path / 'nothing'} (not a directory)" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    (tmp_path / "half" / "README.md").write_text("card")
    assert run_zoo("eval", f"checkpoint={tmp_path / 'half'}") == 2
    assert "has no model.safetensors (found: README.md, config.json)" in capsys.readouterr().err


def test_corrupt_safetensors_one_line_error(tmp_path, capsys):
    cfg = parse_args(TINY_TEXT).config
    export_model(build_model(cfg), cfg, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert run_zoo("eval", f"checkpoint={tmp_path / 'm'}") == 2
    assert "model.safetensors (24 bytes) is truncated or corrupted: header unreadable" in capsys.readouterr().err


def test_state_dict_mismatch_lists_keys(tmp_path, capsys):
    cfg = parse_args(TINY_TEXT).config
    export_model(build_model(cfg), cfg, tmp_path / "m")
    other = parse_args([*TINY_TEXT, "model.depth=1", "model.dim=48"]).config
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architecture": "LanguageModel",
                                                             **__import__("dataclasses").asdict(other)}))
    assert run_zoo("eval", f"checkpoint={tmp_path / 'm'}") == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "unexpected keys: blocks.1." in err
    assert "embed.weight (258, 32) vs (258, 48)" in err and err.count("\n") == 1


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_two_cpu_processes(tmp_path):
    common = [*TINY_MQAR, "data.batch_size=4", f"run.root={tmp_path}", "trainer.max_steps=12",
              "trainer.val_check_interval=12", "optim.lr=3e-3"]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "zoo.cli", "train", *common, "run.name=ddp", "trainer.strategy=ddp",
                          "trainer.devices=2", "trainer.accelerator=cpu"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "zoo.cli", "train", *common, "run.name=single",
                             "data.batch_size=8"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert len(a) == len(b) == 12
    # Same global batch (2 x 4 vs 1 x 8), same data order: the curves have the same shape and fall together.
    first, last = min(a), max(a)
    assert a[last] < a[first] and b[last] < b[first]
    assert abs(a[first] - b[first]) < 0.05 * b[first]


def test_compile_option_trains_through_torch_compile(tmp_path, monkeypatch):
    from zoo.train import module

    compiled = []
    original = module.LanguageModelTask.configure_model

    def spy(self):
        original(self)
        compiled.append(type(self._forward).__name__)

    monkeypatch.setattr(module.LanguageModelTask, "configure_model", spy)
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=c", "trainer.max_steps=2",
                   "trainer.compile=true") == 0
    assert compiled == ["OptimizedModule"]
    assert len(train_losses(tmp_path / "c")) == 2


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    assert run_zoo("train", *TINY_MQAR, f"run.root={tmp_path}", "run.name=bf16", "trainer.max_steps=2",
                   "trainer.precision=bf16-mixed") == 0
    assert (tmp_path / "bf16" / "model" / "model.safetensors").is_file()

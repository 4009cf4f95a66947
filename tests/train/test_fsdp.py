"""Sharded training and activation checkpointing: ``trainer.strategy=fsdp`` (FSDP2 on every block through Lightning)
trains like DDP on 2 CPU processes (gloo) and leaves a resumable full-state checkpoint; checkpointed blocks give the
same gradients."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MQAR, TINY_TEXT, train_losses
from zoo.config import parse_args
from zoo.models import build_model
from zoo.train.parallel import checkpoint_blocks

TWO_CPU = ["trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=4", "model.depth=2",
           "trainer.val_check_interval=5"]


def zoo_train(tmp_path, *args):
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "zoo.cli", "train", *TINY_MQAR, *TWO_CPU, f"run.root={tmp_path}",
                           *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups run on Linux")
def test_fsdp_matches_ddp_on_two_cpu_processes_and_resumes(tmp_path):
    zoo_train(tmp_path, "run.name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=5")
    zoo_train(tmp_path, "run.name=ddp", "trainer.strategy=ddp", "trainer.max_steps=5")
    fsdp, ddp = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "ddp")
    assert sorted(fsdp) == sorted(ddp) == [1, 2, 3, 4, 5]
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5), step
    state = torch.load(tmp_path / "fsdp" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["model.embed.weight"].shape == (64, 32)  # full tensors, not shards
    assert (tmp_path / "fsdp" / "model" / "model.safetensors").exists()
    zoo_train(tmp_path, "run.name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=7", "resume=auto")
    resumed = train_losses(tmp_path / "fsdp")
    assert len(resumed) == 7 and all(resumed[step] == fsdp[step] for step in fsdp)  # two more steps after step 5


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    cfg = parse_args([*TINY_TEXT, "model.dropout=0.1"]).config
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = build_model(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpoint_blocks(checkpointed) == cfg.model.depth
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    saved = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        torch.manual_seed(2)  # the same dropout masks
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            logits = model(tokens)[0]
        logits.float().pow(2).mean().backward()
        saved[name] = sum(count)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    assert saved["checkpointed"] < saved["plain"] / 2  # only the blocks' inputs stay saved

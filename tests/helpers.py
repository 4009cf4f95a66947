"""Helpers shared by the tests: tiny configs, running the CLI in-process, contract checks for mixers."""
from __future__ import annotations

import csv
from pathlib import Path

from tests.layers.contract import (check_decode_equals_full, check_future_does_not_leak,  # noqa: F401 (re-exported)
                                   check_stream_split, rel_err)
from zoo.cli import main

KJV_FIXTURE = Path(__file__).parent / "fixtures" / "kjv_fixture.jsonl"

TINY_MQAR = ["model.dim=32", "model.depth=1", "model.vocab_size=64", "model.attention.heads=2",
             "data.name=mqar", "data.mqar.seq_len=32", "data.mqar.num_kv_pairs=4", "data.mqar.vocab_size=64",
             "data.mqar.train_examples=2000", "data.mqar.test_examples=64", "data.batch_size=8",
             "data.eval_batch_size=32", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
             "optim.warmup_steps=2"]

TINY_TEXT = ["model.dim=32", "model.depth=2", "model.attention.heads=2", "data.name=text",
             f"data.path={KJV_FIXTURE}", "data.seq_len=32", "data.batch_size=4", "data.eval_batch_size=16",
             "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
             "eval.max_batches=4"]


def run_zoo(*args: str) -> int:
    """Run the ``zoo`` CLI in this process; returns the exit code."""
    return main(list(args))


def read_metrics(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def train_losses(run: Path) -> dict[int, float]:
    """step -> train/loss from a run's merged metrics.csv."""
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run / "metrics.csv") if r.get("train/loss")}

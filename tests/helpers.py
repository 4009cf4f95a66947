"""Helpers shared by the tests: tiny configs, running the CLI in-process, contract checks for mixers."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_stream_split(mixer, x: torch.Tensor, splits, tol: float) -> None:
    """``mixer(x[:, :t])`` then ``mixer(x[:, t:], state)`` equals ``mixer(x)`` for every split t."""
    full, _ = mixer(x)
    for t in splits:
        first, state = mixer(x[:, :t])
        second, _ = mixer(x[:, t:], state)
        err = rel_err(torch.cat([first, second], dim=1), full)
        assert err < tol, f"split at {t}: relative error {err:.2e}"


def check_decode_equals_full(mixer, x: torch.Tensor, tol: float) -> None:
    """Token-by-token decoding with the carried state equals one full call."""
    full, _ = mixer(x)
    state, outs = None, []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t:t + 1], state)
        outs.append(y)
    err = rel_err(torch.cat(outs, dim=1), full)
    assert err < tol, f"decode vs full: relative error {err:.2e}"


def check_future_does_not_leak(mixer, x: torch.Tensor, t: int) -> None:
    """Changing inputs after position t leaves outputs at positions <= t unchanged."""
    y1, _ = mixer(x)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y2, _ = mixer(x2)
    assert torch.equal(y1[:, :t + 1], y2[:, :t + 1]), "an output depends on a later input"
    assert not torch.allclose(y1[:, t + 1:], y2[:, t + 1:]), "the perturbation changed nothing (test is vacuous)"


def outputs_and_grads(fn, kwargs, seed=1):
    """(y, final_state, grads of every tensor input) for a loss on both y and the final state."""
    y, final = fn(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    wh = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.device, final.dtype)
    loss = (y * wy).sum() + (final * wh).sum()
    leaves = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if loss.requires_grad else ()
    return y, final, dict(zip(leaves, grads))

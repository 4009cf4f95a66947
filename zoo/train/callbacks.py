"""Callbacks: RNG states for exact resume, a save at an interruption, plain progress lines; the atomic checkpoint
writer."""
from __future__ import annotations

import random
import signal
import sys
import time

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def capture_rng_states() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors/ints/floats (safe for ``weights_only``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of ``capture_rng_states``."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.ckpt`` files with ``zoo.checkpoint.write_atomically``: a temporary file in the run directory,
    fsynced, then renamed; the checkpoint before stays as ``previous.ckpt``. Lightning's own writer stages the file
    in ``$TMPDIR`` and copies it in place when the rename crosses filesystems."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        from zoo.checkpoint import write_atomically

        write_atomically(path, lambda handle: torch.save(checkpoint, handle))


class ResumeState(pl.Callback):
    """Saves every rank's RNG states; restores them at the first resumed training batch (after loader creation)."""

    def __init__(self):
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        states = capture_rng_states()
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["zoo_rng"] = {"world_size": trainer.world_size, "ranks": gathered}
        else:
            checkpoint["zoo_rng"] = {"world_size": 1, "ranks": [states]}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        saved = checkpoint.get("zoo_rng")
        if saved is None:
            return
        if saved["world_size"] != trainer.world_size:
            print(f"warning: resuming a {saved['world_size']}-process run on {trainer.world_size} processes; "
                  f"the continuation is not bit-exact", file=sys.stderr, flush=True)
        self._pending = saved["ranks"][min(trainer.global_rank, len(saved["ranks"]) - 1)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


class SaveOnInterrupt(pl.Callback):
    """On SIGINT or SIGTERM, finishes the optimizer step under way, saves it to ``path`` (every rank takes part, as
    Lightning's ``save_checkpoint`` requires), prints the step saved, then stops the run: SIGINT as Lightning's
    graceful Ctrl-C shutdown, SIGTERM as its ``SIGTERMException``.

    The signals only set a flag, read at the end of each training batch: an exception inside ``optimizer.step`` would
    leave half the weights updated, and Lightning's own SIGTERM handling stops at the end of whatever batch is under
    way, before a save. A second Ctrl-C interrupts at once, keeping the checkpoints already written. A signal in
    the middle of gradient accumulation waits for the accumulation's optimizer step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path):
        self.path = path
        self.received = None  # the signal number, once one arrived
        self._previous_handlers: dict = {}
        self._step_at_batch_start = 0

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its SIGTERM handler at the start of fit: this one replaces it until the end
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:  # accumulating: no optimizer step completed yet
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"zoo: interrupted; saved step {trainer.global_step} to {self.path}", file=sys.stderr, flush=True)
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException


class ProgressLines(pl.Callback):
    """Plain progress lines on rank 0 for logs and CI; also logs ``train/tokens_per_s``.

    ``step 100/1000 | loss 2.3100 | lr 3.00e-04 | grad 0.84 | 5.2k tok/s | 1m23s elapsed, eta 12m00s``
    """

    def __init__(self, every: int, print_lines: bool):
        self.every, self.print_lines = max(1, every), print_lines
        self._start = self._last_time = None
        self._last_step = self._start_step = 0
        self._tokens = 0
        self._step_lr = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Remember the learning rate this step applies (the scheduler moves it on before the batch ends)."""
        self._step_lr = optimizer.param_groups[0]["lr"]

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last_time = time.perf_counter()
        self._last_step = self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += sum(batch[key].numel() for key in ("input_ids", "positive_ids", "negative_ids")
                            if key in batch) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step or step % self.every:
            return
        now = time.perf_counter()
        rate = self._tokens / max(now - self._last_time, 1e-9)
        self._tokens, self._last_time, self._last_step = 0, now, step
        pl_module.log("train/tokens_per_s", rate)
        if not (self.print_lines and trainer.is_global_zero):
            return
        elapsed = now - self._start
        max_steps = trainer.max_steps
        eta = elapsed / max(1, step - self._start_step) * (max_steps - step)
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        lr = self._step_lr
        grad = getattr(pl_module, "_last_grad_norm", None)
        grad_text = f" | grad {float(grad):.2f}" if grad is not None else ""
        print(f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e}{grad_text} | {rate / 1000:.1f}k tok/s | "
              f"{_format_duration(elapsed)} elapsed, eta {_format_duration(eta)}", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        values = getattr(pl_module, "last_val", None)
        if not (self.print_lines and trainer.is_global_zero and values) or trainer.sanity_checking:
            return
        parts = [f"loss {values['val/loss']:.4f}"]
        if "val/bpb" in values:
            parts.append(f"bpb {values['val/bpb']:.3f}")
        if "val/accuracy" in values:
            parts.append(f"acc {values['val/accuracy']:.3f}")
        print(f"val step {trainer.global_step} | " + " | ".join(parts), flush=True)

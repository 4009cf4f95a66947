"""``zoo train``: build data, model and Lightning Trainer from a config, fit, then export and evaluate.

Re-entrant: Lightning's DDP launcher re-runs the command line in each child process, so everything here derives from
the config and only global rank 0 writes the run directory's files.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from zoo.config import Config, ConfigError
from zoo.strict_json import dumps_strict
from zoo.train.run import (check_resume_config, finish_run_json, merge_metrics, next_log_version, plot_metrics,
                           resolve_resume, run_dir, write_run_start)


def quiet_lightning(verbose: bool) -> None:
    """Hide Lightning's INFO banners and the few-workers warning for in-memory data (``verbose=true`` keeps them)."""
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*is not resumable.*")
    warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def is_global_rank_zero() -> bool:
    """Rank 0 of the launch (before the Trainer exists): the launcher sets these variables in children only."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def use_progress_bar() -> bool:
    """True in an interactive terminal (stdout a TTY, not CI): Rich's progress bar instead of plain lines."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def progress_callbacks(cfg: Config, interactive: bool) -> list:
    """Lightning's ``RichProgressBar`` in a terminal, else ``ProgressLines`` printing; both log throughput."""
    from zoo.train.callbacks import ProgressLines

    lines = ProgressLines(cfg.trainer.log_every_n_steps, print_lines=not interactive)
    if not interactive:
        return [lines]
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(), lines]


def build_strategy(cfg: Config):
    """Lightning's strategy for ``trainer.strategy``: fsdp is FSDP2 through ``ModelParallelStrategy`` (every block
    sharded over all devices by ``Task.configure_model``; checkpoints hold full state dicts, so they resume and
    export like DDP's; runs on CPU with gloo too)."""
    if cfg.trainer.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=cfg.trainer.devices * cfg.trainer.num_nodes,
                                     tensor_parallel_size=1, save_distributed_checkpoint=False)
    return cfg.trainer.strategy


def build_trainer(cfg: Config, directory: Path, callbacks: list, progress_bar: bool):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from zoo.train.callbacks import AtomicCheckpointIO

    t = cfg.trainer
    checkpoint = ModelCheckpoint(dirpath=directory, filename="last", every_n_train_steps=t.checkpoint_every_n_steps,
                                 save_top_k=1, save_last=False, enable_version_counter=False)
    logger = CSVLogger(save_dir=str(directory), name="logs", version=str(next_log_version(directory)))
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg),
        precision=t.precision, max_steps=t.max_steps, max_epochs=-1,
        gradient_clip_val=t.gradient_clip_val or None, gradient_clip_algorithm="norm",
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0, enable_progress_bar=progress_bar, enable_model_summary=False,
        callbacks=[checkpoint, *callbacks], logger=logger, default_root_dir=str(directory),
        use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
    )


def task_class(cfg: Config):
    """The LightningModule class that trains ``cfg.model.architecture`` (its ``ARCHITECTURES`` entry's task)."""
    from zoo.registry import architecture, resolve

    return resolve(architecture(cfg.model.architecture).task)


def train(cfg: Config, argv: list[str], resume: str | None = None, verbose: bool = False) -> dict:
    """Run ``zoo train`` for a resolved config; returns the end-of-training evaluation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    directory = run_dir(cfg)
    checkpoint = resolve_resume(cfg, resume, launcher=is_global_rank_zero())
    if checkpoint is not None:
        check_resume_config(cfg, checkpoint)

    from zoo.data.loader import build_data

    data = build_data(cfg.data)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the vocabulary of data "
                          f"{cfg.data.name} ({data.vocab_size})")

    import lightning.pytorch as pl
    import torch

    quiet_lightning(verbose)  # after the import: lightning sets its loggers to INFO when imported

    from zoo.train.callbacks import ResumeState, SaveOnInterrupt
    pl.seed_everything(cfg.seed, verbose=False)
    if is_global_rank_zero():
        write_run_start(cfg, directory, argv, cfg.trainer.devices * cfg.trainer.num_nodes,
                        "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu",
                        resumed_from=checkpoint)
    module = task_class(cfg)(cfg, data, last_checkpoint=str(directory / "last.ckpt"))
    if cfg.init_from and checkpoint is None:
        from zoo.checkpoint import load_init_weights

        load_init_weights(module.model, cfg.init_from)
    interactive = use_progress_bar()
    callbacks = [ResumeState(), SaveOnInterrupt(directory / "last.ckpt"), *progress_callbacks(cfg, interactive)]
    trainer = build_trainer(cfg, directory, callbacks, interactive)
    try:
        trainer.fit(module, ckpt_path=str(checkpoint) if checkpoint else None)
    except SystemExit as stop:
        # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1), SIGTERM into SIGTERMException (exit 0),
        # after SaveOnInterrupt saved the last completed step. Either exits 128 + the signal's number, so no caller
        # takes it for success.
        if not trainer.interrupted:
            raise
        if trainer.is_global_zero:
            print(f"zoo: interrupted at step {trainer.global_step}; last checkpoint: {module.last_checkpoint_note()}; "
                  f"continue with: zoo train {' '.join(argv)} resume=auto", file=sys.stderr, flush=True)
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SystemExit(128 + (signal.SIGTERM if isinstance(stop, SIGTERMException) else signal.SIGINT)) from None
    trainer.save_checkpoint(directory / "last.ckpt")
    if cfg.trainer.strategy == "fsdp":  # every rank joins gathering the shards; rank 0 exports the plain copy
        from zoo.train.parallel import unsharded_model

        module.model = unsharded_model(module.model, cfg)
    if not trainer.is_global_zero:
        return {}
    return finish(cfg, module, data, directory)


def finish(cfg: Config, module, data, directory: Path) -> dict:
    """Rank 0 after fit: merged metrics, plots, the export in ``model/``, held-out evaluation in ``eval.json``."""
    from zoo.checkpoint import export_model
    from zoo.eval.evaluate import evaluate

    rows = merge_metrics(directory)
    plot_metrics(directory, rows, cfg.trainer.gradient_clip_val)
    model = module.model.float().cpu()
    export_model(model, cfg, directory / "model")
    result = evaluate(model, data, cfg.data.eval_batch_size, cfg.eval.max_batches, cfg.data.name)
    result["step"] = int(module.global_step)
    (directory / "eval.json").write_text(dumps_strict(result, str(directory / "eval.json")) + "\n")
    finish_run_json(directory, final_step=int(module.global_step), eval=result)
    return result

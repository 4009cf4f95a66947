"""The base LightningModule of every zoo training task: the step scaffolding a task's loss plugs into.

``Task`` owns the data position (resumable training loader, ``mark_consumed``, its state in checkpoints), the
validation loader, the training step (auxiliary losses of the backbone, ``train/loss``, ``train/lr``), the validation
tally, stop-at-accuracy, optimizer groups, the schedule and the NaN/Inf guard. A task supplies ``task_loss`` (its
loss and metrics), ``validation_step`` (what it adds to the tally), ``validation_values`` and, where batches are not
aligned (input_ids, labels) pairs, ``collate``.
"""
from __future__ import annotations

import abc
import math
from pathlib import Path

import lightning.pytorch as pl
import torch

from zoo.config import Config, to_dict
from zoo.layers.base import combine_aux_losses
from zoo.eval.metrics import Tally
from zoo.models import build_model


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def auxiliary_loss(state) -> torch.Tensor | None:
    """The ``aux_loss`` fields of the block states (MoM's load balance) as one loss (``combine_aux_losses``), or None
    when no block has one.

    This is the zoo's convention for auxiliary losses: a mixer returns them in its state, never through a global. A
    model whose state is one object (``HMTState``) carries the loss over its backbone calls in its own ``aux_loss``.
    """
    if hasattr(state, "aux_loss"):
        return state.aux_loss
    return combine_aux_losses([s.aux_loss for s in (state or ()) if getattr(s, "aux_loss", None) is not None])


def weight_decay_overrides(model: torch.nn.Module) -> dict[str, float]:
    """{parameter name: its own weight decay} from the ``weight_decay_overrides`` of the modules (MemoryFormer's hash
    tables); these parameters leave the ``optim.weight_decay`` and no-decay groups."""
    return {f"{module_name}.{name}" if module_name else name: decay
            for module_name, module in model.named_modules()
            for name, decay in getattr(module, "weight_decay_overrides", {}).items()}


def accuracy_values(tally: Tally) -> dict:
    """``val/loss``, ``val/accuracy`` and ``val/exact_match`` of a tally over scored positions."""
    metrics = tally.task_metrics()
    return {"val/loss": metrics["loss"], "val/accuracy": metrics["accuracy"], "val/exact_match": metrics["exact_match"]}


class Task(pl.LightningModule, abc.ABC):
    """Trains ``build_model(config)`` on ``data``; subclasses supply the loss, the validation tally and the collate.

    Logs ``train/loss`` (with the auxiliary loss of the backbone's state, also logged as ``train/aux_loss``),
    ``train/lr``, ``train/grad_norm`` and the task's ``train/<metric>``; after validation the task's ``val/...``.
    """

    def __init__(self, config: Config, data=None, last_checkpoint: str | None = None):
        super().__init__()
        self.config = config
        self.data = data
        self.is_task = bool(data is not None and data.is_task)
        self.save_hyperparameters({"config": to_dict(config), "is_task": self.is_task})
        self.model = build_model(config)
        self.train_loader = None
        self._loader_state: dict | None = None
        self.last_checkpoint = last_checkpoint
        self._val_tally = Tally()
        self._forward = self.model

    def configure_model(self) -> None:
        from zoo.train.parallel import checkpoint_blocks, shard_blocks

        if self.config.trainer.activation_checkpointing:
            checkpoint_blocks(self.model)
        if self.config.trainer.strategy == "fsdp" and self.device_mesh is not None:
            shard_blocks(self.model, self.device_mesh["data_parallel"])
        if self.config.trainer.compile and self._forward is self.model:
            self._forward = torch.compile(self.model)

    # ----------------------------------------------------------------------------------------- what a task supplies
    @abc.abstractmethod
    def task_loss(self, batch: dict) -> tuple[torch.Tensor, object, dict]:
        """(loss without auxiliaries, the model's returned state, {metric name: value} logged as ``train/<name>``)."""

    @abc.abstractmethod
    def validation_values(self, tally: Tally) -> dict:
        """The ``val/...`` values of a validation pass from the tally its ``validation_step`` filled."""

    def collate(self, items: list) -> dict:
        """A batch from a list of dataset items: aligned (input_ids, labels) pairs stacked."""
        from zoo.data.loader import collate

        return collate(items)

    # ------------------------------------------------------------------------------------------------ data
    def train_dataloader(self):
        from zoo.data.loader import ResumableLoader

        self.train_loader = ResumableLoader(self.data.train, self.config.data.batch_size, self.config.data.seed,
                                            rank=self.global_rank, world_size=self.trainer.world_size,
                                            collate_fn=self.collate)
        if self._loader_state is not None:
            self.train_loader.load_state_dict(self._loader_state)
        return self.train_loader

    def val_dataloader(self):
        # An explicit generator: creating an iterator must not draw from the global RNG (exact resume).
        return torch.utils.data.DataLoader(self.data.test, batch_size=self.config.data.eval_batch_size,
                                           shuffle=False, collate_fn=self.collate, generator=torch.Generator())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.train_loader is not None:
            checkpoint["zoo_loader"] = self.train_loader.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._loader_state = checkpoint.get("zoo_loader")

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        loss, state, metrics = self.task_loss(batch)
        aux = auxiliary_loss(state)
        if aux is not None:
            self.log("train/aux_loss", aux)
            loss = loss + aux
        if self.train_loader is not None:
            self.train_loader.mark_consumed()
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._last_loss = loss.detach()

    def on_validation_epoch_start(self) -> None:
        self._val_tally = Tally()

    def on_validation_epoch_end(self) -> None:
        if self._val_tally.positions == 0:
            return
        values = self.validation_values(self._val_tally)
        for key, value in values.items():
            self.log(key, value, sync_dist=True)
        self.last_val = values
        target = self.config.trainer.stop_at_accuracy
        accuracy = values.get("val/accuracy")
        if target is not None and accuracy is not None and accuracy >= target and not self.trainer.sanity_checking:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        optim = self.config.optim
        no_decay = self.model.no_weight_decay()
        own_decay = weight_decay_overrides(self.model)
        decay_params, plain_params, own_params = [], [], {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name in own_decay:
                own_params.setdefault(own_decay[name], []).append(param)
            else:
                (plain_params if name in no_decay else decay_params).append(param)
        groups = [{"params": decay_params, "weight_decay": optim.weight_decay},
                  {"params": plain_params, "weight_decay": 0.0}]
        groups += [{"params": params, "weight_decay": decay} for decay, params in sorted(own_params.items())]
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(optim.warmup_steps, optim.decay_steps or self.config.trainer.max_steps,
                                 optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Total gradient norm (before clipping), and the NaN/Inf guard: raise before weights change."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("train/grad_norm", norm)
        self._last_grad_norm = norm.detach()
        check_loss_only = self.config.trainer.precision == "16-mixed"
        loss_ok = bool(torch.isfinite(self._last_loss))
        if not loss_ok or (not check_loss_only and not bool(torch.isfinite(norm))):
            what = "loss" if not loss_ok else "gradient norm"
            step = self.global_step + 1
            raise FloatingPointError(f"{what} became nan/inf at step {step}; last good checkpoint: "
                                     f"{self.last_checkpoint_note()}")

    def last_checkpoint_note(self) -> str:
        """``runs/x/last.ckpt (step N)`` or a note that none was written yet."""
        path = Path(self.last_checkpoint) if self.last_checkpoint else None
        if path is None or not path.is_file():
            return "none yet"
        try:
            step = torch.load(path, map_location="cpu", weights_only=True).get("global_step")
        except Exception:
            step = "?"
        return f"{path} (step {step})"

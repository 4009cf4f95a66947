"""Export directories (``config.json`` + ``model.safetensors``) and loading them back, with one-line errors.

``.ckpt`` files are for resuming only; everything that loads a model for use reads an export directory.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from zoo.config import Config, from_dict, to_dict
from zoo.errors import CheckpointError, ConfigError
from zoo.state_dict import file_size, load_state_checked, read_ckpt, read_safetensors
from zoo.strict_json import dumps_strict
from zoo.version import __version__


def config_from_ckpt(checkpoint: dict, path: Path) -> Config:
    """The run config stored in a training checkpoint's hyper-parameters."""
    hparams = checkpoint.get("hyper_parameters", {})
    if "config" not in hparams:
        raise CheckpointError(f"checkpoint {path} has no zoo config in its hyper-parameters (not written by zoo train?)")
    return from_dict(hparams["config"])


def model_state_from_ckpt(checkpoint: dict) -> dict:
    """The model's state dict from a LightningModule checkpoint (``model.`` prefix stripped)."""
    state = checkpoint.get("state_dict", {})
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


EXPORT_FILES = ("config.json", "model.safetensors", "zoo_tokenizer.json", "tokenizer.json")


def check_export_target(out: Path) -> None:
    """``out`` may be missing, an empty directory or a previous export (its files only); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a directory; choose another out=DIR")
    entries = list(out.iterdir())
    foreign = sorted(p.name + "/" * p.is_dir() for p in entries if p.name not in EXPORT_FILES or not p.is_file())
    if entries and (foreign or not (out / "config.json").is_file()):
        names = ", ".join(foreign[:5]) + ", ..." * (len(foreign) > 5) if foreign else "model.safetensors alone"
        raise ConfigError(f"out={out} holds files that are not a zoo export ({names}); zoo export writes only into a "
                          f"missing or empty directory or over a previous export: choose another out=DIR")


def export_model(model: torch.nn.Module, config: Config, out: str | Path) -> Path:
    """Write ``out/config.json`` and ``out/model.safetensors`` atomically (temporary sibling, then rename).

    ``out`` must be missing, empty or a previous export (``check_export_target``); nothing else is ever deleted.
    """
    from safetensors.torch import save_model

    out = Path(out)
    check_export_target(out)
    parent = out.resolve().parent  # out=. has no name of its own: the temporary sibling goes beside the real path
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.", dir=parent))
    try:
        payload = {"architecture": type(model).__name__, "zoo_version": __version__, **transformers_fields(config),
                   **to_dict(config)}
        (tmp / "config.json").write_text(dumps_strict(payload, str(out / "config.json")) + "\n")
        metadata = {"format": "pt", "zoo_version": __version__, "architecture": type(model).__name__}
        save_model(model, str(tmp / "model.safetensors"), metadata=metadata)
        write_tokenizer(config, tmp)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.chmod(tmp, 0o755)
        replace_export(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_tokenizer(config: Config, directory: Path) -> None:
    """Record the tokenizer the model reads in ``directory`` (docs/interop.md#tokenizers): ``zoo_tokenizer.json``
    for the byte tokenizer, a copy of a ``tokenizer.json``; nothing for image data."""
    from zoo.data.tokenizer import RECORD_FILE, TOKENIZER_FILE, tokenizer_record

    spec = config.data.tokenizer
    if config.data.name == "digits":
        return
    if spec == "bytes":
        (directory / RECORD_FILE).write_text(json.dumps(tokenizer_record(spec)) + "\n")
        return
    if not Path(spec).is_file():
        raise CheckpointError(f"data.tokenizer={spec} is missing; the export copies the model's tokenizer: put the "
                              f"tokenizer.json back there")
    shutil.copyfile(spec, directory / TOKENIZER_FILE)


# What makes an export of a causal LM a transformers model directory too (zoo.hf.modeling.ZooForCausalLM); the
# loaders of zoo read past these keys.
TRANSFORMERS_KEYS = ("model_type", "architectures")


def transformers_fields(config: Config) -> dict:
    """``model_type`` "zoo" and ``architectures`` for an export of a generating architecture (lm, hmt), else nothing."""
    from zoo.registry import architecture

    if not architecture(config.model.architecture).generates:
        return {}
    return {"model_type": "zoo", "architectures": ["ZooForCausalLM"]}


def replace_export(new: Path, out: Path) -> None:
    """Rename the complete export ``new`` to ``out``, removing only the export files of a previous one."""
    if out.exists():
        check_export_target(out)
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
        out.rmdir()
    new.rename(out)


DISK_FULL_BYTES = 64 * 1024  # less free space than this after a failed checkpoint write: the disk filled up


def write_atomically(path: str | Path, write) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, fsync, then ``os.replace`` it.

    The temporary file lives in ``path``'s own directory (never ``$TMPDIR``), so the rename never crosses a
    filesystem; an existing complete ``path`` becomes ``previous_path(path)`` once the new file is complete. A failed
    write removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if zipfile.is_zipfile(path):  # a complete torch checkpoint; a torn one never replaces the previous
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException as error:
        # torch.save's zip writer reports a full disk as "RuntimeError: ... unexpected pos": read the free space
        # while the partial file still holds it
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC or (
            isinstance(error, RuntimeError) and shutil.disk_usage(path.parent).free < DISK_FULL_BYTES)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None  # the CLI names the file
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def previous_path(path: str | Path) -> Path:
    """``runs/x/previous.ckpt`` for ``runs/x/last.ckpt``: the checkpoint before the last, kept as a fallback."""
    path = Path(path)
    return path.with_name("previous" + path.suffix)


def export_from_ckpt(ckpt_path: str | Path, out: str | Path) -> Path:
    """``zoo export``: rebuild the model from a training checkpoint and write an export directory."""
    from zoo.models import build_model

    ckpt_path = Path(ckpt_path)
    checkpoint = read_ckpt(ckpt_path)
    config = config_from_ckpt(checkpoint, ckpt_path)
    model = build_model(config)
    load_state_checked(model, model_state_from_ckpt(checkpoint), f"checkpoint {ckpt_path}")
    return export_model(model, config, out)


def read_export_config(path: str | Path) -> Config:
    """The ``Config`` of an export directory, with one-line errors for missing pieces."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        raise CheckpointError(f"{path} is a training checkpoint; export it with zoo export checkpoint={path} "
                              f"out=DIR, then pass checkpoint=DIR")
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not an export directory (config.json + model.safetensors); "
                              f"zoo list shows shipped checkpoints")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (not a directory); zoo list shows shipped checkpoints")
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name} (found: {found})")
    config_file = path / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{config_file} ({file_size(config_file)}) is not valid JSON; re-export the "
                              f"checkpoint (zoo export)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file} holds a JSON {type(data).__name__}, not a zoo config object; "
                              f"re-export the checkpoint (zoo export)")
    for key in ("architecture", "zoo_version", *TRANSFORMERS_KEYS):
        data.pop(key, None)
    return from_dict(data)


def load_export(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``zoo.load``: build the model from ``config.json`` and load ``model.safetensors`` (strict); imported formats
    (Hugging Face / mamba_ssm Mamba, fla GatedDeltaNet / MoM directories, Vim ``.pth`` files) go to their readers.

    ``path`` is a directory, or a hub id (``owner/name``) that is no local path: its snapshot in the local Hugging Face
    cache is read (never downloaded).
    """
    from zoo.fla_import import fla_format, load_fla
    from zoo.hf.hub import is_hub_id, resolve_hub_id
    from zoo.hf_import import foreign_format, load_foreign
    from zoo.models import build_model
    from zoo.vim_import import is_vim_checkpoint, load_vim

    if not Path(path).exists() and is_hub_id(str(path)):
        path = resolve_hub_id(str(path))
    path = Path(path)
    if is_vim_checkpoint(path):  # hustvl Vision Mamba .pth files
        return load_vim(path, device)
    if path.is_dir() and fla_format(path):  # fla GatedDeltaNet / MoM directories
        return load_fla(path, device)
    if path.is_dir() and foreign_format(path):  # Hugging Face / mamba_ssm Mamba directories
        return load_foreign(path, device)
    config = read_export_config(path)
    state = read_export_state(path, device)
    warn_non_finite(state, path / "model.safetensors")
    model = build_model(config, device=device)
    load_state_checked(model, state, f"{path / 'model.safetensors'}")
    model.eval()
    return model


def warn_non_finite(state: dict, source: Path) -> None:
    """One warning on stderr naming the tensors of ``state`` that hold NaN or infinite values."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        print(f"warning: {source}: {len(bad)} of {len(state)} tensors hold NaN or infinite values ({shown}); "
              f"the model's outputs will not be finite", file=sys.stderr, flush=True)


def read_export_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """The weights of an export directory, with one-line errors for a missing or damaged file."""
    read_export_config(path)
    return read_safetensors(Path(path) / "model.safetensors", device)


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """``init_from=DIR``: initialise ``model`` from an export's weights before training.

    A model with a ``load_init_state(state, source)`` method decides what it takes (an embedder takes an LM's
    backbone without its head); any other model loads the export strictly.
    """
    source = f"init_from={path}"
    if not Path(path).is_dir():
        raise CheckpointError(f"{source}: no export directory there; run the training that writes it first "
                              f"(a config with init_from names it in its comments), or set init_from=null")
    state = read_export_state(path)
    if hasattr(model, "load_init_state"):
        model.load_init_state(state, source)
    else:
        load_state_checked(model, state, source)

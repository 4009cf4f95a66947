"""The run directory ``runs/<name>/``: resolved config, run.json, merged metrics.csv, plots."""
from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from zoo.config import ConfigError, dump_yaml, to_dict
from zoo.errors import CheckpointError
from zoo.strict_json import dumps_strict

# Keys that may differ between the saved config and a resumed one.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.log_every_n_steps", "trainer.val_check_interval",
                     "trainer.limit_val_batches", "trainer.checkpoint_every_n_steps", "trainer.stop_at_accuracy")


def run_dir(cfg) -> Path:
    return Path(cfg.run.root) / cfg.run.name


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ, ignoring those a resume may change."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and not k.startswith("eval.")]


RUN_ARTIFACTS = ("model", "eval.json", "metrics.csv", "config.yaml", "run.json")


def run_artifacts(directory: Path) -> list[str]:
    """The run files in ``directory`` (``model/``, ``eval.json``, ..., ``*.ckpt``) that a fresh start would replace."""
    if not directory.is_dir():
        return []
    names = [name + "/" * (directory / name).is_dir() for name in RUN_ARTIFACTS if (directory / name).exists()]
    return names + sorted(p.name for p in directory.glob("*.ckpt"))


def _finished_without_checkpoint(found: list[str]) -> bool:
    """The run files ``run_artifacts`` found hold a finished run's results (``model/``, ``eval.json``) but no
    checkpoint: nothing can resume it, and a fresh start would replace the results."""
    return bool({"model/", "eval.json"} & set(found)) and not any(name.endswith(".ckpt") for name in found)


def resolve_resume(cfg, resume: str | None, launcher: bool = True) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; one-line errors for the refused cases.

    ``launcher``: this process started the run. The processes a multi-process launch spawns re-run the command after
    it has written its run files, so only the launcher refuses a fresh start into a directory holding a run.
    """
    directory = run_dir(cfg)
    last = directory / "last.ckpt"
    if resume in (None, "false"):
        if not launcher:
            return None
        if last.exists():
            from zoo.checkpoint import previous_path, read_ckpt

            try:
                note = f"at step {read_ckpt(last).get('global_step', '?')}"
            except CheckpointError as damaged:
                if not previous_path(last).exists():
                    raise ConfigError(f"{directory} already holds a run whose {damaged}, so it cannot be resumed; "
                                      f"pass run.name=NAME for a new run, or move {directory} aside to reuse its "
                                      f"name") from None
                note = "unreadable, previous.ckpt kept"
            raise ConfigError(f"{directory} already holds a run (last.ckpt {note}); pass resume=auto to continue, "
                              f"or run.name=NAME for a new run")
        if found := run_artifacts(directory):
            if _finished_without_checkpoint(found):
                raise ConfigError(f"{directory} already holds a finished run ({', '.join(found)}) and no checkpoint "
                                  f"to resume; pass run.name=NAME for a new run, or move {directory} aside")
            raise ConfigError(f"{directory} already holds a run ({', '.join(found)}); pass resume=auto to continue, "
                              f"or run.name=NAME for a new run")
        return None
    if resume in ("auto", "true"):
        checkpoint = readable_checkpoint(last)
        if checkpoint is not None:
            return checkpoint
        if resume == "true":
            raise ConfigError(f"no checkpoint to resume in {directory} (expected last.ckpt)")
        found = run_artifacts(directory)
        if launcher and _finished_without_checkpoint(found):
            raise ConfigError(f"{directory} already holds a finished run ({', '.join(found)}) and no checkpoint to "
                              f"resume; pass run.name=NAME for a new run, or move {directory} aside")
        print(f"resume=auto: no checkpoint in {directory}; starting fresh", flush=True)
        return None
    path = Path(resume)
    if path.is_dir():
        raise ConfigError(f"resume={resume} is a directory; give its checkpoint file ({path / 'last.ckpt'}), or "
                          f"resume=auto to continue the run named by run.root and run.name")
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file (use auto, true or a path to a .ckpt)")
    return path


def readable_checkpoint(last: Path) -> Path | None:
    """``last`` if it loads, else ``previous.ckpt`` beside it (with one line saying so), else None."""
    from zoo.checkpoint import previous_path, read_ckpt

    previous = previous_path(last)
    if not previous.exists():
        if not last.exists():
            return None
        read_ckpt(last)  # damaged with nothing to fall back on: its one-line CheckpointError
        return last
    try:
        read_ckpt(last)
        return last
    except CheckpointError as error:
        step = read_ckpt(previous).get("global_step", "?")
        print(f"warning: {error}; resuming from {previous} (step {step})", file=sys.stderr, flush=True)
        return previous


def check_resume_config(cfg, checkpoint_path: Path) -> None:
    """A resumed run must keep the saved config except for the keys in ``RESUMABLE_CHANGES``."""
    from zoo.checkpoint import read_ckpt

    saved = read_ckpt(checkpoint_path).get("hyper_parameters", {}).get("config")
    if saved is None:
        return
    diffs = config_differences(saved, to_dict(cfg))
    if diffs:
        raise ConfigError(f"the config differs from the run being resumed ({checkpoint_path}): " + "; ".join(diffs[:6]))


def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_start(cfg, directory: Path, argv: list[str], world_size: int, device: str,
                    resumed_from: Path | None = None) -> None:
    """config.yaml and run.json at the start of a run (rank 0 only).

    run.json keeps the first start's fields; every start, resumed ones included, is appended to its ``starts``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(dump_yaml(cfg))
    start = {"command": ["zoo", "train", *argv], "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "world_size": world_size, "device": device, "git_commit": _git_commit(),
             "resumed_from": None if resumed_from is None else str(resumed_from)}
    path = directory / "run.json"
    if resumed_from is not None and path.is_file():
        info = json.loads(path.read_text())
        info.setdefault("starts", [{key: info.get(key) for key in ("command", "start_time", "world_size", "device",
                                                                   "git_commit")} | {"resumed_from": None}])
        info["starts"].append(start)
    else:
        info = {
            "command": start["command"], "seed": cfg.seed, "data_seed": cfg.data.seed,
            "start_time": start["start_time"], "world_size": world_size, "device": device,
            "platform": platform.platform(),
            "versions": {"zoo": _version("memzoo"), "python": sys.version.split()[0], "torch": _version("torch"),
                         "lightning": _version("lightning"), "datasets": _version("datasets"),
                         "safetensors": _version("safetensors"), "triton": _version("triton")},
            "git_commit": start["git_commit"], "starts": [start],
        }
    path.write_text(dumps_strict(info, str(path)) + "\n")


def finish_run_json(directory: Path, **fields) -> None:
    path = directory / "run.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(fields, end_time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path.write_text(dumps_strict(info, str(path)) + "\n")


def next_log_version(directory: Path) -> int:
    """k for ``logs/<k>/`` of this start."""
    logs = directory / "logs"
    existing = [int(p.name) for p in logs.iterdir() if p.name.isdigit()] if logs.is_dir() else []
    return max(existing, default=-1) + 1


def merge_metrics(directory: Path) -> list[dict]:
    """Rebuild ``metrics.csv`` from every start's ``logs/<k>/metrics.csv``: one row per optimizer step.

    Lightning's CSV rows carry the number of optimizer steps completed *before* the logging batch, so the training
    loss of step 1 sits on row 0 and the validation after step 100 on row 99; ``step`` here is that plus one, the
    optimizer step the row belongs to (``global_step``). Rows of start k with a step at or beyond the step start k+1
    resumed from were replayed and are dropped.
    """
    parts = sorted((int(p.name), p / "metrics.csv") for p in (directory / "logs").iterdir()
                   if p.name.isdigit() and (p / "metrics.csv").is_file()) if (directory / "logs").is_dir() else []
    tables = []
    for _, path in parts:
        with path.open() as handle:
            tables.append(list(csv.DictReader(handle)))
    merged: dict[int, dict] = {}
    for i, rows in enumerate(tables):
        cutoff = None
        if i + 1 < len(tables) and tables[i + 1]:
            cutoff = min(int(r["step"]) for r in tables[i + 1] if r.get("step") not in (None, ""))
        for row in rows:
            if row.get("step") in (None, ""):
                continue
            step = int(row["step"]) + 1
            if cutoff is not None and step >= cutoff + 1:
                continue
            target = merged.setdefault(step, {"step": step})
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    target[key] = float(value)
    rows = [merged[s] for s in sorted(merged)]
    keys = ["step"] + sorted({k for r in rows for k in r if k != "step"})
    with (directory / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot_metrics(directory: Path, rows: list[dict], clip: float) -> None:
    """loss.png, lr.png, grad_norm.png, throughput.png from merged rows (Agg backend; skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; skipping plots", file=sys.stderr, flush=True)
        return

    def series(key, source):
        pts = [(r["step"], r[key]) for r in source if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(name, keys, ylabel, log=False, hline=None, ema=False, source=rows):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, style in keys:
            xs, ys = series(key, source)
            if not xs:
                continue
            if ema:
                ax.plot(xs, ys, style, alpha=0.3, label=f"{key} (raw)")
                smooth, acc = [], ys[0]
                for y in ys:
                    acc = 0.9 * acc + 0.1 * y
                    smooth.append(acc)
                ax.plot(xs, smooth, style, label=f"{key} (EMA)")
                ema = False
            else:
                ax.plot(xs, ys, style, label=key)
        if hline is not None:
            ax.axhline(hline, color="gray", linestyle="--", label=f"clip {hline}")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)

    save("loss.png", [("train/loss", "C0-"), ("val/loss", "C1o")], "loss", log=True, ema=True)
    save("lr.png", [("train/lr", "C2-")], "learning rate")
    save("grad_norm.png", [("train/grad_norm", "C3-")], "gradient norm", log=True, hline=clip or None)
    throughput = [r for r in rows if "train/tokens_per_s" in r][1:]  # the first interval holds warm-up
    save("throughput.png", [("train/tokens_per_s", "C4-")], "tokens / s", source=throughput)
    if any("val/accuracy" in r for r in rows):
        save("accuracy.png", [("val/accuracy", "C5o-")], "held-out accuracy")


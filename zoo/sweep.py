"""``zoo sweep``: a grid of ordinary ``zoo train`` runs that resumes, runs cells in parallel and in shards, and reports.

A sweep file (YAML) names tasks; each task has a base config and the axes it varies. Axes are ``groups`` (named sets of
overrides, e.g. the families) and ``grid`` keys (lists of values for any config key); the cells are their product,
minus those a ``where`` condition excludes. Every cell is ``zoo train config=BASE k=v ... run.root=runs/<sweep>
run.name=<cell> resume=auto``, so each number can be re-checked with ``zoo eval checkpoint=runs/<sweep>/<cell>/model``.

    name: tiny                           # runs/<name>/<cell>/ hold the runs
    results: benchmarks/results/tiny     # report and the kept evidence (one export per finished cell)
    set: {trainer.max_steps: 20}         # overrides for every cell of every task
    groups:
      family:
        attention: {model.pattern: [attention]}
        mamba: {model.pattern: [mamba]}
    tasks:
      mqar:
        config: transformer-mqar.yaml
        metric: accuracy                 # the number the report's main table shows
        grid: {data.mqar.num_kv_pairs: [4, 8]}
        where: data.mqar.num_kv_pairs * 4 <= data.mqar.seq_len
        evals:                           # extra `zoo eval` runs of the cell's export, each with overrides
          long: {data.mqar.seq_len: 256}

A finished cell is one whose ``<results>/cells/<cell>/cell.json`` exists: it is skipped. A killed cell resumes from its
``last.ckpt``. ``jobs=N`` runs N cells at a time; ``shard=i/n`` runs the i-th of n disjoint slices of the cells, so a
cluster's job array can spread one sweep over machines. ``report=true`` writes ``results.csv``, ``results.md`` and
figures from the finished cells (docs/benchmarks.md#memory-sweep).
"""
from __future__ import annotations

import ast
import dataclasses
import fcntl
import importlib.resources
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zoo.config import ConfigError, _load_yaml, parse_args
from zoo.strict_json import dumps_strict

SWEEP_KEYS = ("name", "results", "root", "set", "groups", "grid", "tasks")
TASK_KEYS = ("config", "metric", "set", "groups", "grid", "where", "evals", "eval_grid")
CSV_COLUMNS = ("cell", "family", "task", "metric", "value", "params", "flops", "wall_s", "peak_mb", "export",
               "settings")
TARGET = 0.9


@dataclasses.dataclass
class Cell:
    """One run of a sweep: its name, task, the labels of its groups, its grid values and its ``zoo train`` args."""

    name: str
    task: str
    labels: dict[str, str]
    values: dict[str, object]
    train_args: list[str]
    evals: dict[str, list[str]]
    eval_values: dict[str, dict]

    @property
    def settings(self) -> str:
        """``key=value;...`` of the cell's grid values and non-family labels (the report's row key)."""
        parts = [f"{group}={label}" for group, label in self.labels.items() if group != "family"]
        return ";".join(parts + [f"{key}={value}" for key, value in self.values.items()])


@dataclasses.dataclass
class Sweep:
    """A parsed sweep file: where it writes and its cells in a fixed order."""

    name: str
    root: Path
    results: Path
    metrics: dict[str, str]
    cells: list[Cell]


# ------------------------------------------------------------------------------------------------------ parsing
def resolve_sweep_path(name: str) -> Path:
    """A path, or a bundled sweep by name (``zoo/configs/sweeps/<name>.yaml``)."""
    if Path(name).is_file():
        return Path(name)
    stem = Path(name).name.removesuffix(".yaml")
    bundled = importlib.resources.files("zoo") / "configs" / "sweeps" / f"{stem}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    names = sorted(p.name[:-5] for p in (importlib.resources.files("zoo") / "configs" / "sweeps").iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"sweep file not found: {name} (no such path, no bundled sweep '{stem}'; bundled: "
                      f"{', '.join(names)})")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key '{key}' in {where}; allowed: {', '.join(allowed)}")


def override_text(key: str, value) -> str:
    """``key=value`` in the command-line syntax ``zoo train`` parses (lists as ``[a,b]``, None as ``null``)."""
    def text(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(text(x) for x in v) + "]"
        return str(v)
    return f"{key}={text(value)}"


def _slug(value) -> str:
    text = "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _grid(grid: dict, where: str) -> list[dict]:
    """Every combination of a grid's values, in the file's order."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid key '{key}' in {where} needs a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


_ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp, ast.Add,
                  ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
                  ast.Eq, ast.NotEq, ast.Constant, ast.Name, ast.Load)


def _condition(text: str, where: str):
    """A ``where`` condition (arithmetic and comparisons over config keys) as a function of a cell: a grid key takes
    the cell's value, any other key the task's config without the grid."""
    names = {}
    source = re.sub(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+",
                    lambda m: names.setdefault(m.group(0), f"_v{len(names)}"), text)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise ConfigError(f"where: {text!r} in {where} is not an expression over config keys") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ConfigError(f"where: {text!r} in {where} may use only config keys, numbers, arithmetic and "
                              f"comparisons")
    code = compile(tree, where, "eval")

    def value(values: dict, config, key: str):
        if key in values:
            return values[key]
        obj = config
        for part in key.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"where: {text!r} in {where} names {key}, which is not a config key")
            obj = getattr(obj, part)
        return obj

    def holds(values: dict, config) -> bool:
        """Whether a cell with grid ``values`` over the task's ``config`` (its settings without the grid) is kept."""
        return bool(eval(code, {"__builtins__": {}},
                         {alias: value(values, config, key) for key, alias in names.items()}))
    return holds


def _overrides(mapping: dict, where: str) -> list[str]:
    return [override_text(key, value) for key, value in _mapping(mapping, where).items()]


def _groups(top: dict, task: dict, where: str) -> dict[str, dict[str, list[str]]]:
    """The named groups of a task: the sweep's, with the task's own replacing a group of the same name."""
    merged = {**_mapping(top, "groups"), **_mapping(task, f"groups of {where}")}
    groups = {}
    for group, labels in merged.items():
        labels = _mapping(labels, f"group '{group}'")
        if not labels:
            raise ConfigError(f"group '{group}' in {where} names no labels; give at least one label: {{key: value}}")
        groups[group] = {label: _overrides(o, f"group '{group}' label '{label}'") for label, o in labels.items()}
    return groups


def _task_cells(sweep_name: str, task: str, spec: dict, top: dict) -> list[Cell]:
    where = f"task '{task}'"
    _check_keys(spec, TASK_KEYS, where)
    if "config" not in spec:
        raise ConfigError(f"{where} needs config: BASE.yaml (a zoo train config file or bundled name)")
    common = ["config=" + str(spec["config"]), *_overrides(top.get("set"), "set"),
              *_overrides(spec.get("set"), f"set of {where}")]
    groups = _groups(top.get("groups"), spec.get("groups"), where)
    grid = {**_mapping(top.get("grid"), "grid"), **_mapping(spec.get("grid"), f"grid of {where}")}
    holds = _condition(spec["where"], where) if spec.get("where") else None
    eval_values = dict(_mapping(spec.get("evals"), f"evals of {where}"))
    if spec.get("eval_grid"):
        for combo in _grid(_mapping(spec["eval_grid"], f"eval_grid of {where}"), where):
            eval_values["-".join(f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in combo.items())] = combo
    evals = {name: _overrides(values, f"eval '{name}' of {where}") for name, values in eval_values.items()}
    cells = []
    for labels in itertools.product(*(groups[g].items() for g in groups)):
        label_args = [arg for _, group_args in labels for arg in group_args]
        config = _parse(where, [*common, *label_args]) if holds is not None else None
        for values in _grid(grid, where) if grid else [{}]:
            grid_args = [override_text(k, v) for k, v in values.items()]
            if holds is not None and not holds(values, config):
                continue
            parts = [task, *(label for label, _ in labels),
                     *(f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in values.items())]
            name = "-".join(parts)
            args = [*common, *label_args, *grid_args, f"run.name={name}"]
            cells.append(Cell(name, task, dict(zip(groups, (label for label, _ in labels))), values, args, evals,
                              eval_values))
    return cells


def _parse(where: str, args: list[str]):
    try:
        return parse_args(args).config
    except ConfigError as error:
        raise ConfigError(f"sweep {where}: {error}") from None


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file: every cell's config resolves (unknown keys are one line), names are unique."""
    path = resolve_sweep_path(str(path))
    spec = _load_yaml(path)
    _check_keys(spec, SWEEP_KEYS, f"sweep {path}")
    name = spec.get("name") or path.stem
    tasks = _mapping(spec.get("tasks"), "tasks")
    if not tasks:
        raise ConfigError(f"sweep {path} names no tasks; add tasks: {{NAME: {{config: BASE.yaml, ...}}}}")
    cells = [cell for task, task_spec in tasks.items() for cell in _task_cells(name, task, _mapping(task_spec, task),
                                                                               spec)]
    if not cells:
        raise ConfigError(f"sweep {path} has no cells (every combination is excluded by its where conditions)")
    seen = set()
    for cell in cells:
        if cell.name in seen:
            raise ConfigError(f"sweep {path}: two cells are named {cell.name}; give their labels distinct names")
        seen.add(cell.name)
        _parse(f"{path}, cell {cell.name}", cell.train_args)
        for eval_name, eval_args in cell.evals.items():
            _parse(f"{path}, eval '{eval_name}' of {cell.name}", [*cell.train_args, *eval_args])
    metrics = {task: str(_mapping(t, task).get("metric", "accuracy")) for task, t in tasks.items()}
    return Sweep(name, Path(spec.get("root", "runs")) / name, Path(spec.get("results", f"runs/{name}/results")),
                 metrics, cells)


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` with 0 <= i < n."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise ConfigError(f"shard={text}: expected i/n with 0 <= i < n (e.g. shard=0/4 for the first of 4 slices)")
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------------------------------------------ running
def cell_file(sweep: Sweep, cell: Cell) -> Path:
    return sweep.results / "cells" / cell.name / "cell.json"


def safetensors_parameters(path: Path) -> int:
    """Number of parameters stored in a safetensors file, read from its header (no tensor is loaded)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            count = 1
            for size in entry["shape"]:
                count *= size
            total += count
    return total


def training_flops_per_step(run_args: list[str]) -> int:
    """FLOPs of one optimizer step (forward + backward of one training batch), counted by torch's
    ``FlopCounterMode`` on the cell's own model and task (matrix products, convolutions and attention; elementwise
    work is not counted, for every family alike)."""
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.data.loader import build_data
    from zoo.kernels.hash_lookup import EMBEDDING_BAG_FLOPS
    from zoo.train.fit import task_class
    from zoo.train.task import auxiliary_loss

    cfg = parse_args(run_args).config
    data = build_data(cfg.data)
    module = task_class(cfg)(cfg, data)
    batch = module.collate([data.train[i] for i in range(min(cfg.data.batch_size, len(data.train)))])
    with FlopCounterMode(display=False, custom_mapping=EMBEDDING_BAG_FLOPS) as counter:
        loss, state, _ = module.task_loss(batch)
        aux = auxiliary_loss(state)
        (loss if aux is None else loss + aux).backward()
    return int(counter.get_total_flops() * max(1, cfg.trainer.accumulate_grad_batches))


def step_at(metrics_csv: Path, column: str = "val/accuracy", target: float = TARGET) -> int | None:
    """The first optimizer step whose ``column`` in a run's ``metrics.csv`` reached ``target``, or None."""
    import csv

    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get(column) not in (None, "") and float(row[column]) >= target:
                return int(float(row["step"]))
    return None


def say(line: str) -> None:
    """One whole line on stdout (worker threads print at once)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# Run as ``python -c CHILD zoo-args``: ask Linux to send SIGTERM when the sweep dies (also by kill -9; the setting
# survives exec), then become ``python -m zoo.cli zoo-args``; so no training outlives its sweep unsaved.
CHILD = ("import ctypes, os, signal, sys\n"
         "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
         "os.execv(sys.executable, [sys.executable, '-m', 'zoo.cli', *sys.argv[1:]])")


class Runner:
    """Runs cells as ``zoo train`` / ``zoo eval`` child processes; forwards SIGINT/SIGTERM to them and stops."""

    def __init__(self, sweep: Sweep, jobs: int):
        self.sweep, self.jobs = sweep, jobs
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopped_by: int | None = None
        self.failed: list[str] = []

    def env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
        return env

    def child(self, args: list[str], log: Path, lock: int) -> tuple[int, float, float]:
        """Run ``python -m zoo.cli ARGS`` with output appended to ``log``: (exit code, wall s, peak RSS MiB).

        The child inherits the cell's lock (``lock``, a held flock), so a restarted sweep waits for a child that
        outlived its sweep to finish saving before it resumes the cell."""
        start = time.monotonic()
        with log.open("a") as handle:
            handle.write(f"$ zoo {' '.join(args)}\n")
            handle.flush()
            with self.lock:
                if self.stopped_by is not None:
                    return 128 + self.stopped_by, 0.0, 0.0
                process = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=handle,
                                           stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
                                           pass_fds=(lock,))
                self.children.add(process)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            with self.lock:
                self.children.discard(process)
        return process.returncode, time.monotonic() - start, usage.ru_maxrss / 1024

    def stop(self, signum: int, frame=None) -> None:
        with self.lock:
            self.stopped_by = signum
            for process in self.children:
                process.send_signal(signum)

    def run_cell(self, cell: Cell) -> None:
        """Train (or resume) the cell, run its evals, and keep its evidence in ``<results>/cells/<cell>/``."""
        book = self.sweep.root / ".sweep"
        book.mkdir(parents=True, exist_ok=True)
        log, attempts_file = book / f"{cell.name}.log", book / f"{cell.name}.attempts.json"
        with (book / f"{cell.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a child of an earlier sweep that is still saving
            self._run_locked(cell, book, log, attempts_file, lock.fileno())

    def _run_locked(self, cell: Cell, book: Path, log: Path, attempts_file: Path, lock: int) -> None:
        attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
        run = self.sweep.root / cell.name
        say(f"sweep {self.sweep.name}: cell {cell.name} {'resumes' if (run / 'last.ckpt').exists() else 'starts'}")
        code, wall, peak = self.child(["train", *cell.train_args, f"run.root={self.sweep.root}", "resume=auto"], log,
                                      lock)
        attempts.append({"exit": code, "wall_s": round(wall, 3), "peak_mb": round(peak, 1)})
        attempts_file.write_text(json.dumps(attempts) + "\n")
        if code != 0:
            if self.stopped_by is None:
                self.failed.append(cell.name)
                say(f"sweep {self.sweep.name}: cell {cell.name} failed (exit {code}); see {log}")
            return
        evals = {}
        for eval_name, eval_args in cell.evals.items():
            out = book / f"{cell.name}.{eval_name}.json"
            code, _, _ = self.child(["eval", f"checkpoint={run / 'model'}", *eval_args, f"eval.out={out}"], log, lock)
            if code != 0:
                if self.stopped_by is None:
                    self.failed.append(cell.name)
                    say(f"sweep {self.sweep.name}: eval {eval_name} of {cell.name} failed (exit {code}); see {log}")
                return
            evals[eval_name] = json.loads(out.read_text())
        self.keep(cell, run, attempts, evals)

    def keep(self, cell: Cell, run: Path, attempts: list[dict], evals: dict) -> None:
        """Copy the export, curves and measures of a finished cell into ``<results>/cells/<cell>/``."""
        target = cell_file(self.sweep, cell).parent
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(run / "model", staging / "model")
        shutil.copy2(run / "metrics.csv", staging / "metrics.csv")
        result = json.loads((run / "eval.json").read_text())
        info = {
            "cell": cell.name, "task": cell.task, "labels": cell.labels, "values": cell.values,
            "train_args": cell.train_args, "eval": result, "evals": evals,
            "params": safetensors_parameters(run / "model" / "model.safetensors"),
            "flops": training_flops_per_step(cell.train_args) * int(result.get("step", 0)),
            "wall_s": round(sum(a["wall_s"] for a in attempts), 1),
            "peak_mb": round(max(a["peak_mb"] for a in attempts), 1),
            f"step_at_{TARGET}": step_at(run / "metrics.csv"),
        }
        (staging / "cell.json").write_text(dumps_strict(info, str(target / "cell.json")) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        say(f"sweep {self.sweep.name}: cell {cell.name} done ({info['wall_s']:.0f} s)")


def run_sweep(sweep: Sweep, jobs: int = 1, shard: tuple[int, int] = (0, 1)) -> int:
    """Run the unfinished cells of one shard, ``jobs`` at a time; 0 when all finished, 1 if any failed, 128 + signal
    when interrupted (every interrupted cell resumes on the next run)."""
    index, count = shard
    mine = sweep.cells[index::count]
    todo = [cell for cell in mine if not cell_file(sweep, cell).exists()]
    print(f"sweep {sweep.name}: {len(mine)} cells in shard {index}/{count}, {len(mine) - len(todo)} finished, "
          f"{len(todo)} to run, {jobs} at a time", flush=True)
    runner = Runner(sweep, jobs)
    previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(lambda c=cell: runner.stopped_by is None and runner.run_cell(c))
                           for cell in todo]:
                future.result()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if runner.stopped_by is not None:
        print(f"sweep {sweep.name}: interrupted; run the same command again to resume", file=sys.stderr, flush=True)
        return 128 + runner.stopped_by
    if runner.failed:
        print(f"sweep {sweep.name}: {len(runner.failed)} cells failed: {', '.join(runner.failed)}", file=sys.stderr,
              flush=True)
        return 1
    return 0

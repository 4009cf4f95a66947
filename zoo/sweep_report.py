"""``zoo sweep ... report=true``: the finished cells of a sweep as ``results.csv``, ``results.md`` and figures.

Everything is read from ``<results>/cells/<cell>/cell.json`` (committed evidence), never from the run directories, so
the report regenerates from a clean checkout. Timings (wall time, peak memory) are in the csv and a separate cost
table; the main tables hold only what training determines (metrics, parameters, FLOPs), so a resumed sweep reports
the same tables as an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

from zoo.sweep import CSV_COLUMNS, TARGET, Sweep, cell_file

SKIPPED_RESULT_KEYS = ("examples", "scored_positions", "step", "checkpoint")
PARAMS_TOLERANCE = 0.10


def finished_cells(sweep: Sweep) -> list[dict]:
    """The ``cell.json`` of every finished cell, in the sweep's order."""
    return [json.loads(cell_file(sweep, cell).read_text()) for cell in sweep.cells if cell_file(sweep, cell).exists()]


def numbers(result: dict) -> dict[str, float]:
    """The numeric metrics of an eval result (a multi-task result's as ``task/metric``)."""
    if "tasks" in result:
        return {f"{task}/{k}": v for task, r in result["tasks"].items() for k, v in numbers(r).items()}
    return {k: v for k, v in result.items()
            if k not in SKIPPED_RESULT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def settings(info: dict) -> str:
    """``key=value;...`` of a cell's non-family labels and grid values."""
    parts = [f"{group}={label}" for group, label in info["labels"].items() if group != "family"]
    return ";".join(parts + [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in info["values"].items()])


def metric_rows(info: dict) -> list[tuple[str, float | str]]:
    """(metric, value) of one cell: its held-out eval, each extra eval as ``<eval>/<metric>``, and the step at 0.9."""
    rows = list(numbers(info["eval"]).items())
    rows += [(f"{name}/{k}", v) for name, result in info["evals"].items() for k, v in numbers(result).items()]
    step = info.get(f"step_at_{TARGET}")
    rows.append((f"step_at_{TARGET}", "" if step is None else step))
    return rows


def write_csv(sweep: Sweep, infos: list[dict], path: Path) -> None:
    """One row per cell and metric, with the cell's size, cost and export directory (relative to the cwd)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for info in infos:
            export = os.path.relpath(cell_file(sweep, _cell(sweep, info)).parent / "model")
            for metric, value in metric_rows(info):
                writer.writerow([info["cell"], info["labels"].get("family", ""), info["task"], metric, value,
                                 info["params"], info["flops"], info["wall_s"], info["peak_mb"], export,
                                 settings(info)])


def _cell(sweep: Sweep, info: dict):
    return next(cell for cell in sweep.cells if cell.name == info["cell"])


def _format(value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def task_tables(task: str, metric: str, infos: list[dict]) -> list[str]:
    """Markdown for one task: the main metric by settings x family, then each extra eval by family x eval."""
    families = list(dict.fromkeys(i["labels"].get("family", "") for i in infos))
    by_key = {(settings(i), i["labels"].get("family", "")): i for i in infos}
    rows = []
    for key in dict.fromkeys(settings(i) for i in infos):
        rows.append([key or "—"] + [_format(numbers(by_key[(key, f)]["eval"]).get(metric)) if (key, f) in by_key
                                    else "" for f in families])
    lines = [f"## {task} — held-out {metric}", "", *_table(["settings", *families], rows), ""]
    eval_names = list(dict.fromkeys(name for i in infos for name in i["evals"]))
    if eval_names:
        eval_rows = [[i["labels"].get("family", ""), settings(i) or "—",
                      *(_format(numbers(i["evals"].get(name, {})).get(metric)) for name in eval_names)] for i in infos]
        lines += [f"### {task} — {metric} of the extra evaluations", "",
                  *_table(["family", "settings", *eval_names], eval_rows), ""]
    return lines


def cost_table(infos: list[dict]) -> list[str]:
    """Parameters (and their ratio to the median of cells with the same task and settings), FLOPs, time, memory."""
    groups: dict[tuple, list[int]] = {}
    for info in infos:
        groups.setdefault((info["task"], settings(info)), []).append(info["params"])
    rows, outside = [], 0
    for info in infos:
        ratio = info["params"] / statistics.median(groups[(info["task"], settings(info))])
        outside += abs(ratio - 1) > PARAMS_TOLERANCE
        rows.append([info["cell"], f"{info['params']:,}", f"{ratio:.2f}", f"{info['flops']:.3g}",
                     f"{info['wall_s']:.0f}", f"{info['peak_mb']:.0f}", _format(info.get(f"step_at_{TARGET}"))])
    note = (f"{outside} cells have parameters outside ±{PARAMS_TOLERANCE:.0%} of their settings' median."
            if outside else f"Every cell's parameters are within ±{PARAMS_TOLERANCE:.0%} of its settings' median.")
    return ["## Cost", "", note, "",
            *_table(["cell", "params", "params / median", "training FLOPs", "wall s", "peak MiB",
                     f"step at {TARGET}"], rows), ""]


def write_markdown(sweep: Sweep, infos: list[dict], path: Path) -> None:
    lines = [f"# Memory sweep `{sweep.name}`", "",
             f"{len(infos)} of {len(sweep.cells)} cells finished. Regenerate with "
             f"`zoo sweep config={sweep.name}.yaml report=true`; re-check a cell with "
             f"`zoo eval checkpoint={os.path.relpath(sweep.results)}/cells/<cell>/model`.", ""]
    for task, metric in sweep.metrics.items():
        task_infos = [i for i in infos if i["task"] == task]
        if task_infos:
            lines += task_tables(task, metric, task_infos)
    lines += cost_table(infos)
    path.write_text("\n".join(lines))


def write_figures(sweep: Sweep, infos: list[dict], directory: Path) -> list[Path]:
    """Per task: the main metric of each family over the cells' settings; per extra-eval grid of two keys (a needle's
    depth x length), one heatmap per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, metric in sweep.metrics.items():
        task_infos = [i for i in infos if i["task"] == task]
        if not task_infos:
            continue
        keys = list(dict.fromkeys(settings(i) for i in task_infos))
        figure, axis = plt.subplots(figsize=(max(4, len(keys) * 0.6 + 2), 3.5))
        for family in dict.fromkeys(i["labels"].get("family", "") for i in task_infos):
            points = {settings(i): numbers(i["eval"]).get(metric) for i in task_infos
                      if i["labels"].get("family", "") == family}
            axis.plot(range(len(keys)), [points.get(k) for k in keys], "o-", label=family or task)
        axis.set_xticks(range(len(keys)), [k or task for k in keys], rotation=60, ha="right", fontsize=7)
        axis.set_ylabel(metric)
        axis.set_title(task)
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(_save(figure, directory / f"{task}.png"))
        written += _heatmaps(sweep, task, metric, task_infos, directory, plt)
    return written


def _heatmaps(sweep, task, metric, infos, directory, plt) -> list[Path]:
    cell = _cell(sweep, infos[0])
    grids = list(cell.eval_values.values())
    if not grids or any(len(g) != 2 for g in grids) or len({tuple(g) for g in grids}) != 1:
        return []
    y_key, x_key = list(grids[0])
    ys = list(dict.fromkeys(g[y_key] for g in grids))
    xs = list(dict.fromkeys(g[x_key] for g in grids))
    written = []
    for info in infos:
        grid = [[float("nan")] * len(xs) for _ in ys]
        for name, values in cell.eval_values.items():
            grid[ys.index(values[y_key])][xs.index(values[x_key])] = numbers(info["evals"].get(name, {})).get(
                metric, float("nan"))
        figure, axis = plt.subplots(figsize=(4, 3))
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(xs)), xs)
        axis.set_yticks(range(len(ys)), ys)
        axis.set_xlabel(x_key.rsplit(".", 1)[-1])
        axis.set_ylabel(y_key.rsplit(".", 1)[-1])
        axis.set_title(info["cell"], fontsize=8)
        figure.colorbar(image)
        figure.tight_layout()
        written.append(_save(figure, directory / f"{info['cell']}-heatmap.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=100, metadata={"Software": None})
    figure.clf()
    return path


def write_report(sweep: Sweep) -> Path:
    """Write ``results.csv``, ``results.md`` and ``figures/`` under the sweep's results directory."""
    infos = finished_cells(sweep)
    sweep.results.mkdir(parents=True, exist_ok=True)
    write_csv(sweep, infos, sweep.results / "results.csv")
    write_markdown(sweep, infos, sweep.results / "results.md")
    figures = sweep.results / "figures"
    figures.mkdir(exist_ok=True)
    write_figures(sweep, infos, figures)
    print(f"sweep {sweep.name}: report of {len(infos)}/{len(sweep.cells)} cells in {sweep.results}", flush=True)
    return sweep.results / "results.md"

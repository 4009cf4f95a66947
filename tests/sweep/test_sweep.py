"""zoo sweep: the grid, its bad inputs (one line, exit 2), shards, and a sweep killed mid-cell that resumes to the same
table as an uninterrupted one."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zoo.cli import main
from zoo.sweep import load_sweep, parse_shard

REPO = Path(__file__).parents[2]
TINY = {
    "set": {"model.dim": 16, "model.depth": 1, "model.vocab_size": 64, "data.batch_size": 8,
            "data.eval_batch_size": 50, "data.mqar.seq_len": 32, "data.mqar.vocab_size": 64,
            "data.mqar.train_examples": 200, "data.mqar.test_examples": 100, "trainer.max_steps": 8,
            "trainer.val_check_interval": 4, "trainer.checkpoint_every_n_steps": 2, "trainer.log_every_n_steps": 2,
            "optim.warmup_steps": 2},
    "groups": {"family": {"attention": {"model.pattern": ["attention"], "model.attention.heads": 2},
                          "mamba": {"model.pattern": ["mamba"]}}},
    "tasks": {"mqar": {"config": "transformer-mqar.yaml", "grid": {"data.mqar.num_kv_pairs": [2, 4]}}},
}


def write_sweep(tmp_path: Path, name: str, **changes) -> Path:
    spec = {**TINY, "name": name, "root": str(tmp_path / "runs"), "results": str(tmp_path / name / "results"),
            **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cells_are_the_product_of_groups_and_grid_minus_where(tmp_path):
    tasks = {"mqar": {**TINY["tasks"]["mqar"], "grid": {"data.mqar.num_kv_pairs": [2, 4, 16]},
                      "where": "data.mqar.num_kv_pairs * 4 <= data.mqar.seq_len",
                      "evals": {"long": {"data.mqar.seq_len": 64}}}}
    sweep = load_sweep(write_sweep(tmp_path, "grid", tasks=tasks))
    assert [c.name for c in sweep.cells] == ["mqar-attention-num_kv_pairs2", "mqar-attention-num_kv_pairs4",
                                             "mqar-mamba-num_kv_pairs2", "mqar-mamba-num_kv_pairs4"]
    cell = sweep.cells[2]
    assert cell.labels == {"family": "mamba"} and cell.values == {"data.mqar.num_kv_pairs": 2}
    assert "model.pattern=[mamba]" in cell.train_args and f"run.name={cell.name}" in cell.train_args
    assert cell.evals == {"long": ["data.mqar.seq_len=64"]}


def test_shards_are_disjoint_and_cover_the_grid(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, "shards"))
    slices = [sweep.cells[i::3] for i in range(3)]
    names = [c.name for s in slices for c in s]
    assert sorted(names) == sorted(c.name for c in sweep.cells) and len(set(names)) == len(names)
    assert parse_shard("2/3") == (2, 3)


@pytest.mark.parametrize("changes, needle", [
    ({"tasks": {"mqar": {"config": "transformer-mqar.yaml", "grid": {"data.mqar.num_pairs": [2]}}}},
     "unknown key"),
    ({"tasks": {"mqar": {"config": "transformer-mqar.yaml", "grid": {"data.mqar.num_kv_pairs": []}}}},
     "non-empty list"),
    ({"tasks": {}}, "names no tasks"),
    ({"tasks": {"mqar": {"config": "transformer-mqar.yaml", "where": "data.mqar.num_kv_pairs > 99"}}},
     "has no cells"),
    ({"tasks": {"mqar": {"config": "transformer-mqar.yaml", "where": "__import__('os')"}}}, "may use only"),
    ({"grids": {}}, "unknown key 'grids'"),
])
def test_bad_sweep_files_are_one_line(tmp_path, capsys, changes, needle):
    err = one_line_error(capsys, ["sweep", f"config={write_sweep(tmp_path, 'bad', **changes)}", "list=true"])
    assert needle in err


@pytest.mark.parametrize("option", ["shard=3/3", "shard=-1/2", "shard=1", "jobs=0", "report=maybe", "model.dim=8"])
def test_bad_sweep_options_are_one_line(tmp_path, capsys, option):
    one_line_error(capsys, ["sweep", f"config={write_sweep(tmp_path, 'opts')}", option])


def run_sweep_process(path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "zoo.cli", "sweep", f"config={path}", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def table(results: Path) -> list[dict]:
    """results.csv without the columns that time the run (wall time, memory) or name where it lives."""
    with (results / "results.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in ("wall_s", "peak_mb", "export")}
                for row in csv.DictReader(handle)]


def test_a_sweep_killed_mid_cell_resumes_to_the_same_table(tmp_path):
    whole, killed = write_sweep(tmp_path, "whole"), write_sweep(tmp_path, "killed")
    first = run_sweep_process(whole, "jobs=2")
    process = run_sweep_process(killed)
    cell_run = tmp_path / "runs" / "killed" / "mqar-attention-num_kv_pairs2"
    deadline = time.monotonic() + 180
    while not (cell_run / "last.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err
    assert "resume" in err and not (tmp_path / "killed" / "results" / "cells" / cell_run.name / "cell.json").exists()
    resumed = run_sweep_process(killed, "jobs=2")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"cell {cell_run.name} resumes" in out
    assert first.wait(timeout=300) == 0, first.stderr.read()
    for path in (whole, killed):
        assert main(["sweep", f"config={path}", "report=true"]) == 0
    expected = table(tmp_path / "whole" / "results")
    assert len(expected) == 4 * 4 and table(tmp_path / "killed" / "results") == expected
    def tables(name):  # the metric tables of results.md: from the first task heading to the cost table
        text = (tmp_path / name / "results" / "results.md").read_text()
        return text[text.index("\n## "):text.index("## Cost")]
    assert tables("killed") == tables("whole") and "| num_kv_pairs=2 |" in tables("whole")
    again = run_sweep_process(killed)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "4 finished, 0 to run" in out

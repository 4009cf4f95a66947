"""Copy a finished run's export into ``checkpoints/<name>/`` and write its card from the run's own records.

    python scripts/ship_checkpoint.py runs/transformer-mqar transformer-mqar

The card states the exact command (from run.json), wall time and hardware, the validation curve (from metrics.csv)
and the output of ``zoo eval`` run on the shipped directory, so every number on it was measured, not typed.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall_time(run: dict) -> str:
    fmt = "%Y-%m-%dT%H:%M:%S%z"
    seconds = (datetime.strptime(run["end_time"], fmt) - datetime.strptime(run["start_time"], fmt)).total_seconds()
    return f"{seconds / 60:.1f} min"


def validation_curve(metrics: Path) -> list[tuple[int, dict]]:
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    keys = ("val/loss", "val/accuracy", "val/bpb", "val/recall@1", "val/recall@10", "val/mrr@10")
    return [(int(r["step"]), {k: float(r[k]) for k in keys if r.get(k)}) for r in rows if r.get("val/loss")]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--title", default=None)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    run = json.loads((args.run / "run.json").read_text())
    target = ROOT / "checkpoints" / args.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(args.run / "model", target)
    for plot in ("loss.png", "accuracy.png"):
        if (args.run / plot).is_file():
            shutil.copy(args.run / plot, target / plot)
    evaluation = subprocess.run([sys.executable, "-m", "zoo.cli", "eval", f"checkpoint=checkpoints/{args.name}"],
                                capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    curve = validation_curve(args.run / "metrics.csv")
    curve_lines = ["| step | " + " | ".join(curve[0][1]) + " |", "|---|" + "---|" * len(curve[0][1])] if curve else []
    curve_lines += [f"| {step} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |" for step, values in curve]
    command = " ".join(run["command"])
    card = f"""# {args.title or args.name}

Trained by this project with `zoo train`; load it with `zoo.load("checkpoints/{args.name}")` or evaluate it with
`zoo eval checkpoint=checkpoints/{args.name}`.

## How it was made

```
{command}
```

- Final step: {run.get('final_step')}
- Wall time: {wall_time(run)} on {run.get('world_size', 1)} process(es), {cpu_name()} ({run['device']}), torch {run['versions']['torch']}
- zoo commit: {run.get('git_commit') or 'unknown'}

## Validation during training

{chr(10).join(curve_lines)}

![loss](loss.png)

## `zoo eval checkpoint=checkpoints/{args.name}`

```json
{evaluation}
```
{args.notes}
"""
    (target / "README.md").write_text(card)
    print(f"shipped {args.run} to {target}")


if __name__ == "__main__":
    main()

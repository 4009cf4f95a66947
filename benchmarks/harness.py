"""Benchmark runner: time mixers (zoo's and peers') side by side in one process and write a markdown table.

Each case is a module factory plus a call; the runner times forward and forward+backward at given (B, T, D) as the
median of repeats, and reports tokens/s and memory: peak CUDA allocation on a GPU, and on CPU the bytes autograd
saved for backward (the activation memory, which is what grows with T).

    python -m benchmarks.harness --mixer attention --shapes 1x1024x256 1x4096x256
    python -m benchmarks.harness --mixer attention --mixer titans --shapes 1x2048x128 --out results/mixers

Absolute times on shared machines are noise; compare rows measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    """One thing to time: ``build()`` makes the module, ``call(module, x)`` runs it and returns a tensor."""

    name: str
    build: Callable[[int], torch.nn.Module]
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = field(default=None)

    def run(self, module, x):
        if self.call is not None:
            return self.call(module, x)
        out = module(x)
        return out[0] if isinstance(out, tuple) else out


class SavedBytes:
    """Counts bytes autograd saves for backward (distinct storages), the CPU stand-in for activation memory."""

    def __init__(self):
        self.bytes, self._seen = 0, set()

    def pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, shape: tuple[int, int, int], backward: bool, repeats: int = 5, warmup: int = 1,
              device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Median seconds, tokens/s and memory of one case at (B, T, D)."""
    B, T, D = shape
    device = torch.device(device)
    torch.manual_seed(0)
    module = case.build(D).to(device=device, dtype=dtype)
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=backward)
    times = []
    memory = 0
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        if backward:
            with SavedBytes() as saved:
                y = case.run(module, x)
            y.float().square().mean().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None
        else:
            with torch.no_grad():
                y = case.run(module, x)
            saved = None
        _sync(device)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else (saved.bytes if saved else 0)
    median = statistics.median(times)
    return {"case": case.name, "B": B, "T": T, "D": D, "pass": "fwd+bwd" if backward else "fwd",
            "seconds": median, "tokens_per_s": B * T / median, "memory_bytes": memory,
            "memory_kind": "cuda peak" if device.type == "cuda" else "saved for backward"}


def compare(cases: list[Case], shapes: list[tuple[int, int, int]], backward: bool = True, repeats: int = 5,
            device: str = "cpu", baseline: str | None = None, progress: bool = True) -> list[dict]:
    """Time every case at every shape; ``ratio`` = case time / baseline time at the same shape."""
    rows = []
    for shape in shapes:
        group = []
        for case in cases:
            try:
                row = time_case(case, shape, backward, repeats, device=device)
            except Exception as error:  # a peer that cannot run a size is reported, not fatal
                row = {"case": case.name, "B": shape[0], "T": shape[1], "D": shape[2],
                       "pass": "fwd+bwd" if backward else "fwd", "error": f"{type(error).__name__}: {error}"[:120]}
            group.append(row)
            if progress:
                shown = f"{row['seconds'] * 1e3:.1f} ms" if "seconds" in row else row["error"]
                print(f"  {case.name:<28} {shape}  {shown}", flush=True)
        base = next((r for r in group if r["case"] == (baseline or cases[0].name) and "seconds" in r), None)
        for row in group:
            if base is not None and "seconds" in row:
                row["ratio"] = row["seconds"] / base["seconds"]
        rows.extend(group)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (ratio relative to the first case of each shape)."""
    lines = ["| case | B | T | D | pass | median ms | tokens/s | memory MiB | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['B']} | {r['T']} | {r['D']} | {r['pass']} | – | – | – | {r['error']} |")
            continue
        lines.append(f"| {r['case']} | {r['B']} | {r['T']} | {r['D']} | {r['pass']} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['memory_bytes'] / 2 ** 20:.1f} | {r.get('ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], header: str = "", notes: str = "") -> Path:
    """Write ``results/<name>.md`` and ``results/<name>.json``; returns the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    import platform

    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d')}")
    text = f"# {name}\n\n{header}\n\nMachine: {machine}\n\n{markdown_table(rows)}\n"
    if notes:
        text += f"\n## Notes\n\n{notes}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return path


def zoo_mixer_case(name: str, **options) -> Case:
    """A case for a registered zoo mixer, built with its config section's defaults (overridden by ``options``)."""
    import dataclasses

    from zoo.config import ModelConfig
    from zoo.models.lm import build_mixer
    from zoo.registry import mixer_section

    def build(dim: int):
        cfg = ModelConfig(dim=dim)
        section = mixer_section(name)
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **options))
        return build_mixer(name, cfg)

    return Case(f"zoo {name}", build)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be BxTxD, e.g. 1x1024x256")
    return tuple(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", action="append", required=True, help="registered zoo mixer (repeatable)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 1024, 128)])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write results/<out>.md and .json")
    args = parser.parse_args(argv)
    rows = compare([zoo_mixer_case(m) for m in args.mixer], args.shapes, backward=not args.forward_only,
                   repeats=args.repeats, device=args.device)
    print(markdown_table(rows))
    if args.out:
        print(f"wrote {write_results(args.out, rows)}")


if __name__ == "__main__":
    main()

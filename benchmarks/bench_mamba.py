"""Mamba/Mamba-2 stacks on CPU, side by side: zoo vs Hugging Face transformers' PyTorch paths vs mamba.py (mambapy).

Each row is a stack of ``--layers`` residual blocks ``x + mixer(RMSNorm(x))`` at d_model ``--dim``, batch 1, random
init, fp32; the timed work is forward + backward of mean(y²) on random input embeddings.

Two passes per T:
1. **Memory**: every contestant runs one forward + backward in its own subprocess, so the peak RSS it reports is that
   run's alone (it includes torch itself, ~0.3 GB). A run past ``--timeout`` seconds, or one that fails, is recorded
   as such and left out of the timing pass.
2. **Time, side by side in one process**: all remaining contestants are built in one subprocess, each warmed up once,
   then timed in ``--repeats`` rounds that run every contestant once, in turn. Each reports its median over the
   rounds, so slow drift on a shared machine hits all of them alike and the ratios are taken between runs seconds
   apart. The share of projections / batched matmuls comes from one profiled fwd+bwd after the rounds.

Missing packages (transformers, mambapy) skip their rows.
Quick (default): ``python benchmarks/bench_mamba.py`` (T = 512, 1024; 1 round after a warm-up).
Design card: ``OMP_NUM_THREADS=2 python benchmarks/bench_mamba.py --lengths 2048 8192 --repeats 3 --timeout 900
--only zoo_mamba zoo_mamba2 mambapy hf_mamba_pscan hf_mamba2 hf_mamba2_q64`` (about 45 minutes on 2 cores);
T = 16k for zoo alone: ``--lengths 2048 8192 16384 --repeats 1 --only zoo_mamba zoo_mamba2 --out
benchmarks/results/mamba_16k.md`` (the HF/mambapy rows need ~30 GB RSS at 16k).
Writes ``benchmarks/results/mamba.md`` and ``.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTESTANTS = {
    "zoo Mamba (chunked selective_scan)": "zoo_mamba",
    "zoo Mamba2 (chunked SSD, chunk 64)": "zoo_mamba2",
    "HF Mamba-1 + mamba.py pscan (use_mambapy=True)": "hf_mamba_pscan",
    "HF Mamba-1 sequential slow path (forward only)": "hf_mamba_slow",
    "HF Mamba-2 torch chunked SSD (chunk 256, its default)": "hf_mamba2",
    "HF Mamba-2 torch chunked SSD (chunk 64, as zoo)": "hf_mamba2_q64",
    "mamba.py Mamba(pscan=True)": "mambapy",
}
N1, N2, HEADDIM = 16, 128, 64   # Mamba-1 state; Mamba-2 state and head width (24 heads at d_model 768)


def _build(kind: str, dim: int, layers: int):
    """(module, forward(x) -> y, does_backward) for one contestant."""
    import torch

    if kind in ("zoo_mamba", "zoo_mamba2"):
        from zoo.config import Mamba2Config, MambaConfig, ModelConfig
        from zoo.models.lm import LanguageModel

        cfg = ModelConfig(vocab_size=8, dim=dim, depth=layers, mlp="none",
                          pattern=["mamba" if kind == "zoo_mamba" else "mamba2"])
        cfg.mamba = MambaConfig(d_state=N1)
        cfg.mamba2 = Mamba2Config(d_state=N2, headdim=HEADDIM, ngroups=1, chunk_size=64)
        model = LanguageModel(cfg)
        return model, lambda x: model.forward_embeds(x)[0], True
    if kind.startswith("hf_"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        if kind.startswith("hf_mamba2"):
            config = transformers.Mamba2Config(hidden_size=dim, num_hidden_layers=layers, state_size=N2,
                                               num_heads=2 * dim // HEADDIM, head_dim=HEADDIM, n_groups=1,
                                               chunk_size=64 if kind == "hf_mamba2_q64" else 256, vocab_size=8)
            model = transformers.Mamba2Model(config)
        else:
            config = transformers.MambaConfig(hidden_size=dim, num_hidden_layers=layers, state_size=N1, vocab_size=8,
                                              use_mambapy=kind == "hf_mamba_pscan")
            model = transformers.MambaModel(config)
        return model, lambda x: model(inputs_embeds=x, use_cache=False).last_hidden_state, kind != "hf_mamba_slow"
    if kind == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig

        model = Mamba(MambaConfig(d_model=dim, n_layers=layers, d_state=N1, expand_factor=2, pscan=True))
        return model, model, True
    raise ValueError(kind)


def _fwd_bwd(forward, model, x, backward: bool) -> float:
    """Seconds for one forward (+ backward) of mean(y²); clears the gradients afterwards."""
    import torch

    start = time.perf_counter()
    if backward:
        forward(x).square().mean().backward()
    else:
        with torch.no_grad():
            forward(x).square().mean()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def run_memory(kind: str, T: int, dim: int, layers: int) -> dict:
    """In a fresh process: one fwd+bwd, its seconds (a cold run, only a rough guide) and this process's peak RSS."""
    import resource

    import torch

    torch.manual_seed(0)
    model, forward, backward = _build(kind, dim, layers)
    seconds = _fwd_bwd(forward, model, torch.randn(1, T, dim, requires_grad=backward), backward)
    return {"cold_seconds": seconds, "backward": backward,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_side_by_side(kinds: list[str], T: int, dim: int, layers: int, repeats: int) -> dict:
    """In one process: every contestant warmed up once, then ``repeats`` rounds running each once in turn.

    Returns {kind: {"seconds": median over rounds, "times": [...], "matmul_share": {...} or None}}.
    """
    import torch

    built = {}
    for kind in kinds:
        torch.manual_seed(0)
        built[kind] = _build(kind, dim, layers)
    inputs = {kind: torch.randn(1, T, dim, requires_grad=backward) for kind, (_, _, backward) in built.items()}
    times = {kind: [] for kind in kinds}
    for round_ in range(repeats + 1):
        for kind, (model, forward, backward) in built.items():
            seconds = _fwd_bwd(forward, model, inputs[kind], backward)
            inputs[kind].grad = None
            if round_:
                times[kind].append(seconds)
    out = {}
    for kind, (model, forward, backward) in built.items():
        share = matmul_shares(forward, T, dim, backward) if backward else None
        model.zero_grad(set_to_none=True)
        out[kind] = {"seconds": statistics.median(times[kind]), "times": times[kind], "matmul_share": share}
    return out


PROJECTION_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul"}
BATCHED_OPS = {"aten::bmm", "aten::baddbmm"}


def matmul_shares(forward, T: int, dim: int, backward: bool) -> dict:
    """Fractions of one profiled fwd+bwd's CPU time spent in plain matrix multiplies (the in/out/x/dt projections:
    the same FLOPs in every implementation at equal size) and in batched ones (the scans' own chunk matmuls); the
    rest is the scan, the conv and the elementwise work. The profiler adds a few microseconds per op, so the
    non-matmul share is slightly overstated."""
    import torch
    from torch.profiler import profile

    x = torch.randn(1, T, dim, requires_grad=backward)
    with profile() as prof:
        forward(x).square().mean().backward()
    events = prof.key_averages()
    total = max(sum(e.self_cpu_time_total for e in events), 1)
    return {"projections": sum(e.self_cpu_time_total for e in events if e.key in PROJECTION_OPS) / total,
            "batched": sum(e.self_cpu_time_total for e in events if e.key in BATCHED_OPS) / total}


def _available(kind: str) -> str | None:
    """None when the contestant can run, else why not."""
    import importlib.util

    need = {"hf_mamba_pscan": ["transformers", "mambapy"], "hf_mamba_slow": ["transformers"],
            "hf_mamba2": ["transformers"], "hf_mamba2_q64": ["transformers"], "mambapy": ["mambapy"]}.get(kind, [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    for package in ("transformers", "mambapy", "memzoo"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        pass
    return out


def _write(results: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lengths = sorted({r["T"] for r in results})
    lines = [f"# Mamba stacks on CPU: zoo vs Hugging Face vs mamba.py\n",
             f"d_model {meta['dim']}, {meta['layers']} layers, batch 1, fp32, random init; forward + backward of "
             f"mean(y²) on random embeddings. Seconds: timed side by side in one process, the median of "
             f"{meta['repeats']} rounds (each round runs every contestant once, in turn) after a warm-up each. Peak "
             f"RSS: one fwd+bwd of that contestant alone in its own process (includes torch). "
             f"Command: `{meta['command']}`.\n",
             "Versions and machine: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".\n",
             "| contestant | T | seconds | rounds | tok/s | peak RSS (GB) | projections / batched matmuls "
             "| vs zoo Mamba | vs zoo Mamba2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["kind"], r["T"]): r for r in results if "seconds" in r}
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r['name']} | {r['T']} | {r['error']} | | | | | | |")
            continue
        ratios = []
        for ref in ("zoo_mamba", "zoo_mamba2"):
            b = base.get((ref, r["T"]))
            ratios.append(f"{r['seconds'] / b['seconds']:.2f}x" if b and r["backward"] else "")
        note = "" if r["backward"] else " (fwd only)"
        shares = r.get("matmul_share")
        share = f"{shares['projections']:.0%} / {shares['batched']:.0%}" if shares else ""
        rounds = " / ".join(f"{t:.2f}" for t in r["times"])
        lines.append(f"| {r['name']} | {r['T']} | {r['seconds']:.2f}{note} | {rounds} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_gb']:.2f} | {share} | {ratios[0]} | {ratios[1]} |")
    if len(lengths) > 1:
        lines += ["", "Scaling (seconds at the longest T / seconds at the shortest; linear = "
                  f"{lengths[-1] / lengths[0]:.1f}):", ""]
        for name, kind in CONTESTANTS.items():
            lo, hi = base.get((kind, lengths[0])), base.get((kind, lengths[-1]))
            if lo and hi:
                lines.append(f"- {name}: {hi['seconds'] / lo['seconds']:.1f}")
    lines += ["", "Ratios are contestant time / zoo time at the same T (above 1: zoo is faster), from the same "
              "process. Compare only rows from one run: concurrent load on a shared machine changes CPU timings by "
              "several times.",
              "Projections / batched matmuls: the fractions of one profiled fwd+bwd spent in the in/out/x/dt "
              "projections (the same FLOPs in every implementation at equal size) and in the scans' own chunk "
              "matmuls. The projections bound any speed-up a faster scan can give: a peer's time divided by "
              "(zoo's time × zoo's projection share) is the ratio zoo would reach if everything else took no time."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _child(args: list[str], timeout: float) -> tuple[dict | None, str | None]:
    """Run this script with ``args`` in a subprocess: (its JSON answer, None) or (None, why it gave none)."""
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"over the {timeout:.0f} s timeout"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:100]
        return None, f"failed (exit {done.returncode}: {tail})"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def _measure_length(T: int, kinds: list[tuple[str, str]], args) -> list[dict]:
    """Both passes at one T: peak memory per contestant in its own process, then the timing side by side."""
    size = ["--dim", str(args.dim), "--layers", str(args.layers)]
    rows = {}
    for name, kind in kinds:
        row = rows[kind] = {"name": name, "kind": kind, "T": T}
        why = _available(kind)
        if why is None:
            data, why = _child(["--child-memory", kind, str(T), *size], args.timeout)
            row.update(data or {})
        if why is not None:
            row["error"] = why
        shown = f"peak {row['peak_rss_gb']:.2f} GB, cold run {row['cold_seconds']:.2f} s" if why is None else why
        print(f"T={T:>6}  {name:<50} {shown}", flush=True)
    runnable = [kind for kind, row in rows.items() if "error" not in row]
    if runnable:
        timeout = args.timeout * len(runnable) * (args.repeats + 2)
        data, why = _child(["--child-time", str(T), *runnable, "--repeats", str(args.repeats), *size], timeout)
        for kind in runnable:
            if data is None:
                rows[kind]["error"] = f"timing pass {why}"
                continue
            rows[kind].update(data[kind], tokens_per_s=T / data[kind]["seconds"])
            times = " / ".join(f"{t:.2f}" for t in data[kind]["times"])
            print(f"T={T:>6}  {rows[kind]['name']:<50} side by side: {data[kind]['seconds']:.2f} s ({times})",
                  flush=True)
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per contestant and run (the timing pass gets this times its runs)")
    parser.add_argument("--only", nargs="+", choices=sorted(CONTESTANTS.values()), default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mamba.md"))
    parser.add_argument("--child-memory", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--child-time", nargs="+", metavar="T KIND", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        print(json.dumps(run_memory(args.child_memory[0], int(args.child_memory[1]), args.dim, args.layers)))
        return 0
    if args.child_time:
        T, kinds = int(args.child_time[0]), args.child_time[1:]
        print(json.dumps(run_side_by_side(kinds, T, args.dim, args.layers, args.repeats)))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    kinds = [(n, k) for n, k in CONTESTANTS.items() if args.only is None or k in args.only]
    results = [row for T in args.lengths for row in _measure_length(T, kinds, args)]
    meta = {"dim": args.dim, "layers": args.layers, "repeats": args.repeats, "lengths": args.lengths,
            "command": "python benchmarks/bench_mamba.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": _versions()}
    _write(results, meta, Path(args.out))
    print(f"wrote {Path(args.out).with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

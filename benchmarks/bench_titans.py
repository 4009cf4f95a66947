"""Titans LMM speed and memory: ``zoo.layers.TitansMemory`` side by side with ``titans_pytorch.NeuralMemory``.

Matched size (docs/titans.md#benchmark): dim 256, depth-2 memory with expansion 4, heads 1 and 4, chunk 16 and 64,
batch 1, T = 1k / 4k / 16k. Each point is fwd+bwd of ``y.pow(2).mean()``, median of repeats after one warm-up, run in a
fresh child process (same thread count for both libraries) whose peak RSS growth during the runs is the memory figure.
The peer runs with ``batch_size = chunk_size``, so both take every gradient of a chunk at the chunk-start weights.

    python benchmarks/bench_titans.py            # --quick (default): zoo at every T, titans-pytorch at T = 1k
    python benchmarks/bench_titans.py --full     # titans-pytorch at every T too (needs ~16 GB at 4k, ~64 GB at 16k)

zoo runs with ``checkpoint_chunks = 1024 // chunk`` (activation checkpointing per 1024 tokens: identical results, no
effect at T = 1k; ``--checkpoint-tokens 0`` turns it off: 16k then needs ~4 GB with 4 heads, ~17 GB with 1 head;
``--heads 4`` limits the grid).

titans-pytorch is optional (``pip install titans-pytorch``); without it only the zoo rows are measured. Writes
``benchmarks/results/titans.md`` and ``titans.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DIM, DEPTH, EXPANSION = 256, 2, 4
RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _peer_available() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except Exception:  # not installed, or its dependencies are missing
        return False
    return True


def _build(impl: str, heads: int, chunk: int, checkpoint_tokens: int):
    if impl == "zoo":
        from zoo.layers.titans import TitansMemory

        layer = TitansMemory(DIM, heads, memory_depth=DEPTH, memory_expansion=EXPANSION, chunk_size=chunk,
                             checkpoint_chunks=checkpoint_tokens // chunk)
        return layer, lambda x: layer(x)[0]
    from titans_pytorch import NeuralMemory

    layer = NeuralMemory(dim=DIM, chunk_size=chunk, batch_size=chunk, heads=heads, dim_head=DIM // heads,
                         default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)))
    return layer, lambda x: layer(x)[0]


def _measure(impl: str, heads: int, chunk: int, T: int, threads: int, repeats: int, budget_s: float,
             checkpoint_tokens: int, queue) -> None:
    """Child process: build, warm up, time fwd+bwd; report times, parameter count and peak RSS growth (MB)."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.harness import SavedBytes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        layer, run = _build(impl, heads, chunk, checkpoint_tokens)
        x = torch.randn(1, T, DIM, requires_grad=True)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KB)
        times = []
        start = time.perf_counter()
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            y = run(x)
            y.pow(2).mean().backward()
            elapsed = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
            x.grad = None
            if i > 0 or repeats == 0:
                times.append(elapsed)
            if time.perf_counter() - start > budget_s and times:
                break
            if i == 0 and elapsed > budget_s:  # one run is all the budget allows: keep the warm-up as the sample
                times.append(elapsed)
                break
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        try:  # a separate, untimed forward: bytes autograd saves for backward
            with SavedBytes() as saved:
                run(x)
            saved_mb = round(saved.bytes / 2 ** 20, 1)
        except RuntimeError:  # titans-pytorch's torch.func grads refuse saved-tensor hooks
            saved_mb = None
        queue.put(dict(ok=True, times=times, median_s=statistics.median(times), peak_mb=round(peak, 1),
                       saved_mb=saved_mb,
                       params=sum(p.numel() for p in layer.parameters())))
    except Exception as error:  # noqa: BLE001 (reported in the results, e.g. out of memory)
        queue.put(dict(ok=False, error=f"{type(error).__name__}: {str(error)[:200]}"))


def measure(impl, heads, chunk, T, threads, repeats, budget_s, timeout_s, checkpoint_tokens=1024):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(impl, heads, chunk, T, threads, repeats, budget_s,
                                                     checkpoint_tokens, queue))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join()
        return dict(ok=False, error=f"timed out after {timeout_s:.0f} s")
    return queue.get() if not queue.empty() else dict(ok=False, error=f"child exited with {process.exitcode}")


def grid(full: bool, peer: bool, head_counts=(1, 4)):
    points = []
    for heads in head_counts:
        for chunk in (16, 64):
            for T in (1024, 4096, 16384):
                points.append(("zoo", heads, chunk, T))
                if peer and (full or T == 1024):
                    points.append(("titans-pytorch", heads, chunk, T))
    return points


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


NOTES = """\
## Where the two compute different things

Both are timed at matched size (dim 256, depth-2 MLP memory with expansion 4, same heads, same chunk, chunk-start
gradients: the peer runs with `batch_size = chunk_size`), but they are not the same function (docs/titans.md#benchmark):

- **Readout granularity.** zoo reads token t with the weights after absorbing token t (per-token dual form inside the
  chunk). titans-pytorch reads with chunk-granular weights: token t sees the weights after ⌊(t+1)/C⌋ complete chunks.
- **Gates.** zoo: α, η, θ^ℓ per token and head from sigmoid(Linear). titans-pytorch: the learning rate per token, but
  momentum and decay per chunk from a pooled chunk representation.
- **Inputs of the memory.** zoo: Linear → short causal conv → SiLU → ℓ2-norm on q and k (SiLU on v), output RMSNorm
  and a SiLU output gate. titans-pytorch: RMSNorm pre-norm, no conv, SiLU or ℓ2-norm.
- **Loss and memory network.** zoo: ‖M(k) − v‖² summed over features, M(z) = z + LN(GELU(zW¹)W²) (no LN gain).
  titans-pytorch: the mean over features, and its ResidualNorm memory (LayerNorm with a learned gain).
- **Incomplete chunks.** titans-pytorch only buffers the tokens of a trailing incomplete chunk (a call shorter than the
  chunk stores nothing); zoo stores them and carries them in its state.
- **Cost model.** titans-pytorch materialises every chunk-boundary weight copy and per-sample gradients (vmap), so its
  time and memory grow steeply as the chunk shrinks; zoo's chunk dual form keeps only the chunk-start weights.

Timings are wall-clock on a shared machine: compare rows measured in the same run only. Memory: "peak" is the growth
of the child process's peak RSS during the timed runs (activations, gradients and temporaries, not the total
footprint); "saved" is what autograd saved for backward in one forward (`benchmarks.harness.SavedBytes`; n/a for
titans-pytorch, whose torch.func per-sample gradients refuse saved-tensor hooks).

**Scaling with T.** The per-chunk work does not depend on T. With checkpointing (`--checkpoint-tokens`, one group
per 1024 tokens by default) T = 1k is a single group and nothing is recomputed, while at 4k and 16k every group but
the last is recomputed in backward: about one more forward of the memory, so t(16k)/t(1k) carries that factor on top
of 16×, and t(16k)/t(4k) (linear: 4×) shows the growth without it. `--checkpoint-tokens 0` measures the layer's
default (no checkpointing): no recompute, but activation memory that grows with T (the peak column).
"""


def write_results(rows, args, out: Path, started: str, load: str) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(started=started, torch=torch.__version__, threads=args.threads, cpu=_cpu_name(),
                load_average_at_start=load, batch=1, dim=DIM, memory_depth=DEPTH, memory_expansion=EXPANSION,
                repeats=args.repeats, mode="full" if args.full else "quick",
                zoo_checkpoint_tokens=args.checkpoint_tokens)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    by_key = {(r["impl"], r["heads"], r["chunk"], r["T"]): r for r in rows}
    lines = ["# Titans LMM: zoo `TitansMemory` vs titans-pytorch `NeuralMemory`", "",
             f"Measured {started} with `python benchmarks/bench_titans.py {' '.join(sys.argv[1:])}`: "
             f"torch {torch.__version__}, {args.threads} threads, {meta['cpu']}, load average at start {load}. "
             f"Batch 1, dim {DIM}, memory depth {DEPTH} × {EXPANSION}; fwd+bwd of `y.pow(2).mean()`, median of up to "
             f"{args.repeats} runs after a warm-up. zoo uses activation checkpointing per "
             f"{args.checkpoint_tokens} tokens (`checkpoint_chunks = {args.checkpoint_tokens} // chunk`; 0 = off, "
             f"the layer's default).", "",
             "| T | heads | chunk | zoo s | titans-pytorch s | peer / zoo | zoo tok/s | zoo peak / saved MB "
             "| peer peak / saved MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for heads in (1, 4):
        for chunk in (16, 64):
            for T in (1024, 4096, 16384):
                zoo, peer = by_key.get(("zoo", heads, chunk, T)), by_key.get(("titans-pytorch", heads, chunk, T))
                if zoo is None and peer is None:
                    continue

                def cell(r, key, fmt):
                    if r is None:
                        return "–"
                    return fmt.format(r[key]) if r["ok"] else r["error"].split(":")[0]

                def memory(r):
                    if r is None or not r["ok"]:
                        return "–"
                    saved = "n/a" if r["saved_mb"] is None else f"{r['saved_mb']:.0f}"
                    return f"{r['peak_mb']:.0f} / {saved}"

                ratio = (f"{peer['median_s'] / zoo['median_s']:.1f}×" if zoo and peer and zoo["ok"] and peer["ok"]
                         else "–")
                tokens = f"{T / zoo['median_s']:.0f}" if zoo and zoo["ok"] else "–"
                lines.append(f"| {T} | {heads} | {chunk} | {cell(zoo, 'median_s', '{:.3f}')} | "
                             f"{cell(peer, 'median_s', '{:.3f}')} | {ratio} | {tokens} | "
                             f"{memory(zoo)} | {memory(peer)} |")
    lines += ["", "## Scaling with T (zoo)", "", "| heads | chunk | t(4k) / t(1k) | t(16k) / t(1k) | t(16k) / t(4k) |",
              "|---|---|---|---|---|"]
    for heads in (1, 4):
        for chunk in (16, 64):
            base = by_key.get(("zoo", heads, chunk, 1024))
            if not base or not base["ok"]:
                continue
            runs = [by_key.get(("zoo", heads, chunk, T)) for T in (4096, 16384)]
            ratios = [f"{r['median_s'] / base['median_s']:.1f}" if r and r["ok"] else "–" for r in runs]
            ratios.append(f"{runs[1]['median_s'] / runs[0]['median_s']:.1f}"
                          if all(r and r["ok"] for r in runs) else "–")
            lines.append(f"| {heads} | {chunk} | {' | '.join(ratios)} |")
    lines += ["", "Targets (issue): at chunk 16, depth 2, fwd+bwd on CPU ≥ 2× faster than titans-pytorch; time at 16k "
              "within 20× of time at 1k (linear in T gives 16×).", "", NOTES]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: zoo at every T, the peer at T = 1k")
    mode.add_argument("--full", action="store_true", help="every T for both libraries")
    parser.add_argument("--checkpoint-tokens", type=int, default=1024,
                        help="zoo activation checkpointing group in tokens (0 = off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both libraries (2 threads on a busy 2-core machine stall in OpenMP)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed runs per point (at least one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a point is abandoned")
    parser.add_argument("--no-peer", action="store_true", help="measure zoo only")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 4], help="head counts to measure")
    parser.add_argument("--out", type=Path, default=RESULTS / "titans")
    args = parser.parse_args(argv)
    peer = not args.no_peer and _peer_available()
    if not peer and not args.no_peer:
        print("titans-pytorch is not importable (pip install titans-pytorch): measuring zoo only")
    started = time.strftime("%Y-%m-%d %H:%M")
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for impl, heads, chunk, T in grid(args.full, peer, args.heads):
        result = measure(impl, heads, chunk, T, args.threads, args.repeats, args.budget, args.timeout,
                         args.checkpoint_tokens)
        result.update(impl=impl, heads=heads, chunk=chunk, T=T)
        rows.append(result)
        shown = f"{result['median_s']:.3f} s, peak +{result['peak_mb']:.0f} MB" if result["ok"] else result["error"]
        print(f"{impl:>15} heads={heads} chunk={chunk:>2} T={T:>5}: {shown}", flush=True)
        write_results(rows, args, args.out, started, load)  # partial results survive an interrupted run
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

"""Decode speed on CPU, side by side in one process: zoo's LM of every family vs Hugging Face ``MambaForCausalLM`` /
``Mamba2ForCausalLM`` (cache on) at the same size.

Every contestant is a 4-layer LM at d_model 256 (mixer-only blocks, ``mlp: none``, byte vocab 258), random init,
fp32, eval mode, under ``torch.no_grad``. For each batch size and position p, each contestant first runs a random
prompt of p tokens (one chunked forward), then ``--rounds`` rounds time ``--steps`` one-token calls of every
contestant in turn with the carried state, so drift on a shared machine hits all of them alike. Reported: the median
per-token latency over the rounds, tokens/s = batch / latency, and ratios taken within the run.

Quick: ``python -m benchmarks.bench_decode --positions 64 --batches 1 --steps 2 --rounds 1 --out /tmp/decode``.
Results file: ``OMP_NUM_THREADS=2 python -m benchmarks.bench_decode`` (positions 64 and 4096, batch 1 and 8).
Writes ``benchmarks/results/decode.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DIM, DEPTH, VOCAB = 256, 4, 258
FAMILIES = {  # zoo contestant -> block pattern (repeated to DEPTH)
    "attention": ["attention"], "mamba": ["mamba"], "mamba2": ["mamba2"], "gdn": ["gdn"], "mom": ["mom"],
    "titans LMM": ["titans"], "titans MAC": ["titans_mac"], "titans MAG": ["titans_mag"],
    "titans MAL": ["titans_mal"], "memoryformer": ["memoryformer"],
    "mamba2 hybrid": ["mamba2", "mamba2", "mamba2", "attention"], "mom hybrid": ["mom", "mom", "mom", "attention"],
}
HF = ("HF MambaForCausalLM", "HF Mamba2ForCausalLM")


def zoo_model(pattern):
    from zoo.config import Mamba2Config, MambaConfig, ModelConfig
    from zoo.models.lm import LanguageModel

    cfg = ModelConfig(vocab_size=VOCAB, dim=DIM, depth=DEPTH, pattern=list(pattern), mlp="none")
    cfg.mamba = MambaConfig(d_state=16)
    cfg.mamba2 = Mamba2Config(d_state=128, headdim=64, ngroups=1, chunk_size=64)
    model = LanguageModel(cfg).eval()
    return lambda ids, state: model(ids, state)


def hf_model(name):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    if name == HF[0]:
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=DIM, num_hidden_layers=DEPTH, state_size=16, vocab_size=VOCAB))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            hidden_size=DIM, num_hidden_layers=DEPTH, state_size=128, num_heads=2 * DIM // 64, head_dim=64,
            n_groups=1, vocab_size=VOCAB, chunk_size=64))
    model.eval()

    def call(ids, cache):
        out = model(input_ids=ids, cache=cache, use_cache=True)
        return out.logits, out.cache
    return call


def measure(contestants, batch, position, steps, rounds):
    """{name: median seconds per decode call} at this batch and prompt length."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (batch, position), generator=generator)
    token = prompt[:, -1:]
    states = {}
    for name, call in contestants.items():
        _, states[name] = call(prompt, None)
        _, states[name] = call(token, states[name])  # warm-up step
    times = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, call in contestants.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(steps):
                _, state = call(token, state)
            times[name].append((time.perf_counter() - start) / steps)
            states[name] = state
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8, help="decode calls per contestant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="contestant names to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    contestants = {f"zoo {name}": zoo_model(pattern) for name, pattern in FAMILIES.items()}
    try:
        contestants.update({name: hf_model(name) for name in HF})
    except ImportError:
        print("transformers is not installed: the HF rows are skipped")
    if args.only:
        contestants = {name: call for name, call in contestants.items() if name in args.only}
    load_before = os.getloadavg()
    results = {}
    with torch.no_grad():
        for batch in args.batches:
            for position in args.positions:
                results[batch, position] = measure(contestants, batch, position, args.steps, args.rounds)
                print(f"batch {batch}, position {position}: done", flush=True)
                write(args, contestants, results, load_before, os.getloadavg())  # what is done so far


def write(args, contestants, results, load_before, load_after):
    first, last = min(args.positions), max(args.positions)
    lines = [
        "# Decode: tokens/s and per-token latency, side by side in one process",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python -m benchmarks.bench_decode "
        f"--positions {' '.join(map(str, args.positions))} --batches {' '.join(map(str, args.batches))} "
        f"--steps {args.steps} --rounds {args.rounds}`",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.2f}' for x in load_before)} before, {' / '.join(f'{x:.2f}' for x in load_after)} after "
        f"(a shared machine: compare rows of this run only).",
        "",
        f"Each model: {DEPTH} layers, d_model {DIM}, mixer-only blocks, fp32, random init, no_grad. Mamba d_state 16; "
        "Mamba-2 d_state 128, headdim 64; the other families use their config defaults. Latency is the median over "
        f"{args.rounds} rounds of {args.steps} one-token calls after a prompt of `position` tokens.",
        "",
        "| contestant | batch | position | ms / call | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for (batch, position), row in results.items():
        for name, seconds in row.items():
            lines.append(f"| {name} | {batch} | {position} | {1e3 * seconds:.2f} | {batch / seconds:.1f} |")
    lines += ["", "## Ratios", "",
              f"| batch | position | zoo mamba / HF Mamba | zoo mamba2 / HF Mamba2 | zoo gdn / zoo mamba2 | "
              f"zoo mom / zoo mamba2 |", "|---:|---:|---:|---:|---:|---:|"]
    pairs = (("zoo mamba", HF[0]), ("zoo mamba2", HF[1]), ("zoo gdn", "zoo mamba2"), ("zoo mom", "zoo mamba2"))
    for (batch, position), row in results.items():
        ratios = [f"{row[b] / row[a]:.2f}x" if a in row and b in row else "—" for a, b in pairs]  # speed ratio
        lines.append(f"| {batch} | {position} | " + " | ".join(ratios) + " |")
    lines += ["", f"Per-token latency at position {last} / at position {first} (1.0 = constant in the position):", "",
              "| contestant | " + " | ".join(f"batch {b}" for b in args.batches) + " |",
              "|---|" + "---:|" * len(args.batches)]
    for name in contestants:
        cells = [f"{results[b, last][name] / results[b, first][name]:.2f}" if (b, last) in results else "—"
                 for b in args.batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""HMT against its backbone alone: (a) cost per token, forward+backward; (b) held-out bits per byte of trained models.

    python benchmarks/bench_hmt.py cost                       # hmt.yaml sizes, T = 384 and 1536, side by side
    python benchmarks/bench_hmt.py bpb --hmt runs/hmt_stage2/model --seq-len 1536
    python benchmarks/bench_hmt.py bpb --hmt runs/hmt_stage2/model --backbone runs/transformer/model --seq-len 1536

(a) times the same long input through three models built from one backbone: the backbone over the whole input
(full causal attention), the backbone over independent L-token windows (what it sees per pass, no memory), and HMT
(L-token segments plus memory). Ratios are relative to the full-context backbone.

(b) scores the held-out split of the HMT export's data (``zoo.data.loader.build_data``, kjv by default) cut into
windows of ``--seq-len`` tokens, for the same three ways of reading it. The backbone is ``--backbone`` (an LM export,
or an HMT export whose backbone is taken) or, by default, the HMT checkpoint's own backbone. Besides the bpb over
all positions it reports the bpb over the last segment of each window, where HMT's memory has the most context.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``zoo`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import RESULTS, Case, compare, markdown_table, write_results  # noqa: E402


class WindowedLM(nn.Module):
    """The backbone over independent windows of ``window`` tokens: ``forward(ids (B, T)) -> (logits (B, T, V), None)``.

    Each window starts from a fresh state at position 0, exactly what the backbone sees per HMT segment, without the
    memories. The last window may be shorter.
    """

    def __init__(self, backbone: nn.Module, window: int):
        super().__init__()
        self.backbone, self.window = backbone, window

    def forward(self, input_ids: torch.Tensor, state=None):
        B, T = input_ids.shape
        whole = T // self.window * self.window                                   # tokens in complete windows
        pieces = []
        if whole:
            windows = rearrange(input_ids[:, :whole], "b (n w) -> (b n) w", w=self.window)  # (B * n, w)
            logits = self.backbone(windows)[0]                                   # (B * n, w, V)
            pieces.append(rearrange(logits, "(b n) w v -> b (n w) v", b=B))
        if whole < T:
            pieces.append(self.backbone(input_ids[:, whole:])[0])                # (B, T - whole, V)
        return torch.cat(pieces, dim=1), None                                    # (B, T, V)


# ------------------------------------------------------------------------------------------------------ (a) cost
def hmt_model_config(dim: int, depth: int, heads: int, segment_len: int, sensory_len: int, cache_size: int):
    """The ``model`` section of an HMT over an attention LM (hmt.yaml's sizes by default)."""
    from zoo.config import AttentionConfig, HMTConfig, ModelConfig

    return ModelConfig(architecture="hmt", dim=dim, depth=depth, attention=AttentionConfig(heads=heads),
                       hmt=HMTConfig(segment_len=segment_len, sensory_len=sensory_len, cache_size=cache_size))


def cost_cases(depth: int, heads: int, segment_len: int, sensory_len: int, cache_size: int) -> list[Case]:
    """Backbone full context, backbone in L-token windows, and HMT, each fed the same token ids."""
    from zoo.models.hmt import HMT

    def ids_like(x: torch.Tensor) -> torch.Tensor:                              # (B, T) fixed ids for input x
        return torch.randint(0, 256, x.shape[:2], generator=torch.Generator().manual_seed(0)).to(x.device)

    def config(dim):
        return hmt_model_config(dim, depth, heads, segment_len, sensory_len, cache_size)

    def build_hmt(dim):
        return HMT.from_config(config(dim))

    def build_backbone(dim):
        return build_hmt(dim).backbone

    def build_windowed(dim):
        return WindowedLM(build_backbone(dim), segment_len)

    def call(module, x):
        return module(ids_like(x))[0]

    return [Case("backbone, full context", build_backbone, call),
            Case(f"backbone, {segment_len}-token windows", build_windowed, call),
            Case("HMT", build_hmt, call)]


def cost_rows(shapes, depth=4, heads=4, segment_len=64, sensory_len=8, cache_size=32, repeats=3,
              device="cpu", progress=True) -> list[dict]:
    """Forward+backward time and saved activations of the three cases at each (B, T, D)."""
    return compare(cost_cases(depth, heads, segment_len, sensory_len, cache_size), shapes, backward=True,
                   repeats=repeats, device=device, progress=progress)


# ------------------------------------------------------------------------------------------------------- (b) bpb
def load_models(hmt_dir: str, backbone_dir: str | None):
    """(HMT, backbone, backbone label) from export directories; the HMT's own backbone when none is given."""
    from zoo import load
    from zoo.models.hmt import HMT

    hmt = load(hmt_dir)
    if not isinstance(hmt, HMT):
        raise SystemExit(f"bench_hmt: {hmt_dir} holds a {type(hmt).__name__}, not an HMT export")
    if backbone_dir is None:
        return hmt, hmt.backbone, f"HMT's own backbone ({hmt_dir})"
    backbone = load(backbone_dir)
    if isinstance(backbone, HMT):
        return hmt, backbone.backbone, f"backbone of {backbone_dir}"
    if not hasattr(backbone, "forward_embeds"):
        raise SystemExit(f"bench_hmt: {backbone_dir} holds a {type(backbone).__name__}, not a language model")
    return hmt, backbone, f"{backbone_dir}"


@torch.no_grad()
def score(model: nn.Module, data, seq_len: int, last: int, batch_size: int, max_batches: int | None) -> dict:
    """bpb and loss over all positions and over the last ``last`` positions of each window, plus tokens/s."""
    from zoo.data.loader import eval_batches
    from zoo.eval.metrics import IGNORE_INDEX, Tally

    token_bytes = torch.tensor(data.tokenizer.token_bytes(), dtype=torch.long)
    everything, final = Tally(), Tally()
    tokens, start = 0, time.perf_counter()
    for batch in eval_batches(data.test, batch_size, max_batches):
        logits, _ = model(batch["input_ids"])                                   # (B, T, V)
        labels = batch["labels"]
        everything.add(logits, labels, token_bytes)
        tail = labels.clone()
        tail[:, :seq_len - last] = IGNORE_INDEX
        final.add(logits, tail, token_bytes)
        tokens += labels.numel()
    seconds = time.perf_counter() - start
    whole, end = everything.language_model_metrics(), final.language_model_metrics()
    return {"bpb": whole["bpb"], "loss": whole["loss"], "bpb_last_segment": end["bpb"],
            "loss_last_segment": end["loss"], "scored_positions": whole["scored_positions"],
            "tokens_per_s": tokens / seconds}


def bpb_rows(hmt_dir: str, backbone_dir: str | None, seq_len: int, batch_size: int = 8,
             max_batches: int | None = 20) -> tuple[list[dict], dict]:
    """Held-out scores of the backbone (full context and L-token windows) and of HMT at windows of ``seq_len``."""
    from zoo.checkpoint import read_export_config
    from zoo.data.loader import build_data

    hmt, backbone, label = load_models(hmt_dir, backbone_dir)
    backbone.eval()
    data_cfg = dataclasses.replace(read_export_config(hmt_dir).data, seq_len=seq_len)
    data = build_data(data_cfg)
    L = hmt.segment_len
    last = min(L, seq_len)
    models = [(f"backbone, full context ({seq_len} tokens per pass)", backbone),
              (f"backbone, {L}-token windows (no memory)", WindowedLM(backbone, L)),
              (f"HMT (L={L}, k={hmt.sensory_len}, j={hmt.summary_len}, N={hmt.cache_size}, "
               f"{hmt.summary_source})", hmt)]
    rows = [{"model": name, "seq_len": seq_len, **score(model, data, seq_len, last, batch_size, max_batches)}
            for name, model in models]
    info = {"hmt": hmt_dir, "backbone": label, "data": data_cfg.name, "seq_len": seq_len,
            "batch_size": batch_size, "max_batches": max_batches}
    return rows, info


def bpb_table(rows: list[dict]) -> str:
    lines = ["| model | seq_len | bpb | bpb, last segment | loss | scored positions | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['bpb']:.4f} | {r['bpb_last_segment']:.4f} | "
                     f"{r['loss']:.4f} | {r['scored_positions']} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def write_bpb_results(rows: list[dict], info: dict) -> Path:
    """results/hmt_bpb.md and .json."""
    import platform

    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, " \
              f"{time.strftime('%Y-%m-%d')}"
    header = (f"Held-out bits per byte, HMT against its backbone alone. HMT: `{info['hmt']}`; backbone: "
              f"{info['backbone']}; data: {info['data']} test split in windows of {info['seq_len']} tokens "
              f"(batch {info['batch_size']}, at most {info['max_batches']} batches).")
    text = f"# hmt_bpb\n\n{header}\n\nMachine: {machine}\n\n{bpb_table(rows)}\n"
    path = RESULTS / "hmt_bpb.md"
    path.write_text(text)
    (RESULTS / "hmt_bpb.json").write_text(json.dumps({"machine": machine, **info, "rows": rows}, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    from benchmarks.harness import parse_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    cost = modes.add_parser("cost", help="(a) fwd+bwd time per token: backbone alone vs HMT, same input")
    cost.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 384, 128), (1, 1536, 128)],
                      help="BxTxD; D is the model width")
    cost.add_argument("--depth", type=int, default=4)
    cost.add_argument("--heads", type=int, default=4)
    cost.add_argument("--segment-len", type=int, default=64)
    cost.add_argument("--sensory-len", type=int, default=8)
    cost.add_argument("--cache-size", type=int, default=32)
    cost.add_argument("--repeats", type=int, default=3)
    cost.add_argument("--device", default="cpu")
    bpb = modes.add_parser("bpb", help="(b) held-out bpb of trained exports: backbone alone vs with HMT")
    bpb.add_argument("--hmt", required=True, help="HMT export directory (runs/<name>/model)")
    bpb.add_argument("--backbone", default=None, help="LM export directory; default: the HMT's own backbone")
    bpb.add_argument("--seq-len", type=int, required=True, help="tokens per held-out window")
    bpb.add_argument("--batch-size", type=int, default=8)
    bpb.add_argument("--max-batches", type=int, default=20, help="held-out batches per model (0 = all)")
    args = parser.parse_args(argv)
    if args.mode == "cost":
        rows = cost_rows(args.shapes, args.depth, args.heads, args.segment_len, args.sensory_len, args.cache_size,
                         args.repeats, args.device)
        print(markdown_table(rows))
        header = (f"HMT against its backbone alone, fwd+bwd on the same token ids: attention LM, depth {args.depth}, "
                  f"{args.heads} heads, byte vocab; HMT L={args.segment_len}, k={args.sensory_len}, "
                  f"j=L/2, N={args.cache_size}, float32.")
        notes = ("ratio = time / the full-context backbone's time at the same shape. The windowed backbone reads "
                 "the same L-token pieces as HMT but without memory; HMT adds per segment k+2 positions to the main "
                 "pass and one summary pass of j+2 positions (docs/hmt.md#parallel-form).")
        print(f"wrote {write_results('hmt', rows, header=header, notes=notes)}")
    else:
        rows, info = bpb_rows(args.hmt, args.backbone, args.seq_len, args.batch_size, args.max_batches or None)
        print(bpb_table(rows))
        print(f"wrote {write_bpb_results(rows, info)}")


if __name__ == "__main__":
    main()

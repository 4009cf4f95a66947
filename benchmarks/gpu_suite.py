"""The one prepared GPU check: every Triton op against its float64 reference (float32 and bfloat16 inputs), then
Triton vs the torch path vs fla and mamba_ssm (when installed) at the published anchors' shapes.

    python -m benchmarks.gpu_suite                # on one CUDA GPU, < 8 min including compilation
    python -m benchmarks.gpu_suite --dry-run      # the same script on CPU under TRITON_INTERPRET=1, tiny shapes

Check: per op and dtype, the inputs are drawn in float64 and rounded to the dtype; the reference (the sequential
loop) runs in float64 on those rounded values, so the error measures the kernels alone. Tolerance (relative RMS,
worst over outputs, final states and every input's gradient): 1e-3 for float32, 3e-2 for bfloat16.

Time (forward + backward, and forward alone; median ms of ``triton.testing.do_bench``; float32 and bfloat16, the
peers in bfloat16): gated_delta_rule at fla's anchor B 1, T 8192, H 96 (halved until it fits), K = V 128 against
``fla.ops.gated_delta_rule.chunk_gated_delta_rule``; ssd at the Mamba-2 1.3B layer (d_model 2048, expand 2: H 64,
P 64, N 128, G 1) against ``mamba_ssm``'s ``mamba_chunk_scan_combined``; selective_scan at a Mamba-1 layer (Dm 2048,
N 16) against ``selective_scan_fn``; titans_linear_memory and hash_lookup at a d_model 768 layer. Each case is
guarded: one that fails is reported and the rest still run. Writes ``benchmarks/results/gpu.md`` (``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 3e-2}

# op -> (size checked, size timed, size for --dry-run); the make/call pairs come from benchmarks.bench_triton_gpu
SIZES = {
    "gated_delta_rule": (dict(B=2, T=600, H=2, K=64, V=64), dict(B=1, T=8192, H=96, K=128, V=128),
                         dict(B=1, T=20, H=1, K=16, V=16)),
    "ssd": (dict(B=2, T=600, H=4, P=64, G=1, N=128), dict(B=1, T=8192, H=64, P=64, G=1, N=128),
            dict(B=1, T=20, H=2, P=4, G=1, N=4)),
    "selective_scan": (dict(B=2, T=600, D=96, N=16), dict(B=1, T=8192, D=2048, N=16), dict(B=1, T=12, D=4, N=4)),
    "titans_linear_memory": (dict(B=2, T=600, H=2, K=32, V=32), dict(B=1, T=8192, H=12, K=64, V=64),
                             dict(B=1, T=20, H=1, K=4, V=4)),
    "hash_lookup": (dict(N=3000, K=12, tau=8, d=200), dict(N=8192, K=96, tau=8, d=768), dict(N=9, K=2, tau=3, d=8)),
}


def _ops():
    from benchmarks.bench_triton_gpu import OPS

    return {op.name: op for op in OPS}


def _draw(op, size, dtype, device, seed):
    """float64 inputs rounded to ``dtype``: (leaves in dtype, the same values in float64), on ``device``."""
    inputs = op.make(size, torch.Generator().manual_seed(seed))
    rounded = {k: v.to(dtype) for k, v in inputs.items()}
    return ({k: v.to(device).requires_grad_() for k, v in rounded.items()},
            {k: v.to(device, torch.float64).requires_grad_() for k, v in rounded.items()})


def _outputs_and_grads(op, leaves, backend):
    outs = op.call(leaves, backend)
    generator = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, list(leaves.values()))


def check(op, size, dtype, device) -> dict:
    """Worst relative RMS error of the Triton path against the float64 reference, and whether all is finite."""
    from zoo.kernels._common import rel_rms_error

    leaves, leaves64 = _draw(op, size, dtype, device, seed=0)
    ref_out, ref_grad = _outputs_and_grads(op, leaves64, "reference")
    out, grad = _outputs_and_grads(op, leaves, "triton")
    errors = [rel_rms_error(o, r) for o, r in zip(out, ref_out)] + [rel_rms_error(g, r)
                                                                      for g, r in zip(grad, ref_grad)]
    finite = all(bool(torch.isfinite(t).all()) for t in [*out, *grad])
    return dict(worst=max(errors), finite=finite, ok=finite and max(errors) < TOLERANCES[dtype])


# ------------------------------------------------------------------------------------------------------ the peers
def _fla_gated_delta(x):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, final = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                      initial_state=x["initial_state"].float(), output_final_state=True)
    return [o, final]


def _mamba_ssd(x):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final = mamba_chunk_scan_combined(x["x"], x["dt"], x["A"].float(), x["B"], x["C"], chunk_size=64,
                                         D=x["D"].float(), dt_bias=x["dt_bias"].float(),
                                         initial_states=x["initial_state"].float(), dt_softplus=True,
                                         return_final_states=True)
    return [y, final]


def _mamba_selective_scan(x):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    channels_first = [t.transpose(1, 2).contiguous() for t in (x["u"], x["delta"], x["B"], x["C"], x["z"])]
    u, delta, B, C, z = channels_first  # (B, D, T) and (B, N, T): mamba_ssm's layout
    y = selective_scan_fn(u, delta, x["A"].float(), B, C, x["D"].float(), z, x["delta_bias"].float(),
                          delta_softplus=True)
    return [y]


PEERS = {"gated_delta_rule": ("fla", "fla", _fla_gated_delta), "ssd": ("mamba_ssm", "mamba_ssm", _mamba_ssd),
         "selective_scan": ("mamba_ssm", "mamba_ssm", _mamba_selective_scan)}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------------ timing
def _timer(dry_run: bool):
    if dry_run:
        def wall_ms(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return wall_ms
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def time_case(call, leaves, timer) -> dict:
    """Forward and forward + backward ms of ``call(leaves)`` (a list of outputs)."""
    outs = call(leaves)
    differentiable = [o for o in outs if o.requires_grad]
    cotangents = [torch.randn_like(o) for o in differentiable]
    inputs = [v for v in leaves.values() if v.requires_grad]

    def forward():
        with torch.no_grad():
            call(leaves)

    def forward_backward():
        outputs = [o for o in call(leaves) if o.requires_grad]
        torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)

    return dict(fwd=timer(forward), fwd_bwd=timer(forward_backward))


def time_op(op, size, dtype, device, timer, peers: bool) -> tuple[dict, dict]:
    """{path: times} for Triton, torch and the installed peer, at ``size`` (halving H on out-of-memory); the size."""
    while True:
        try:
            leaves, _ = _draw(op, size, dtype, device, seed=1)
            result = {path: time_case(lambda x, b=path: op.call(x, b), leaves, timer) for path in ("triton", "torch")}
            if peers and op.name in PEERS and _installed(PEERS[op.name][1]):
                label, _, call = PEERS[op.name]
                result[label] = time_case(call, leaves, timer)
            return result, size
        except torch.OutOfMemoryError:
            if size.get("H", 1) <= 1:
                raise
            size = {**size, "H": size["H"] // 2}
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ report
def _shape(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def report(device_name: str, checks: list, timings: list, failures: list, dry_run: bool) -> str:
    lines = [f"# GPU suite on {device_name}{' (dry run: CPU, Triton interpreter, tiny shapes)' if dry_run else ''}", "",
             f"Command: `python -m benchmarks.gpu_suite{' --dry-run' if dry_run else ''}`. torch {torch.__version__}, "
             f"Python {platform.python_version()}.", "",
             "## Check (Triton vs the float64 reference on the same rounded inputs; worst relative RMS error over "
             "outputs, final states and every gradient)", "", "| op | size | dtype | worst | finite | pass |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {_shape(size)} | {str(dtype).removeprefix('torch.')} | {c['worst']:.2e} | {c['finite']} | "
              f"{'yes' if c['ok'] else 'NO'} |" for name, size, dtype, c in checks]
    lines += ["", "## Time (median ms; the last column is the path's fwd+bwd time over Triton's: above 1, Triton is "
              "faster)", "", "| op | size | dtype | path | fwd | fwd+bwd | fwd+bwd / Triton's |",
              "|---|---|---|---|---|---|---|"]
    for name, size, dtype, result in timings:
        base = result["triton"]["fwd_bwd"]
        for path, t in result.items():
            lines.append(f"| {name} | {_shape(size)} | {str(dtype).removeprefix('torch.')} | {path} | "
                         f"{t['fwd']:.3f} | {t['fwd_bwd']:.3f} | {t['fwd_bwd'] / base:.2f}x |")
    if failures:
        lines += ["", "## Failures", ""] + [f"- {what}: {text.strip().splitlines()[-1]}" for what, text in failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes (what CI runs)")
    parser.add_argument("--out", type=Path, help="markdown report (default: benchmarks/results/gpu.md on a GPU; "
                                                 "a dry run writes only when given)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        device, device_name = torch.device("cpu"), "CPU"
    elif torch.cuda.is_available():
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name()
    else:
        parser.error("needs a CUDA GPU; --dry-run runs the same script on CPU under the Triton interpreter")
    out = args.out or (None if args.dry_run else RESULTS / "gpu.md")
    ops = _ops()
    timer = _timer(args.dry_run)
    checks, timings, failures = [], [], []
    start = time.perf_counter()
    for name, (checked, timed, tiny) in SIZES.items():
        op = ops[name]
        for dtype in (torch.float32, torch.bfloat16):
            size = tiny if args.dry_run else checked
            try:
                checks.append((name, size, dtype, check(op, size, dtype, device)))
                print(f"[{time.perf_counter() - start:.0f}s] check {name} {dtype}: {checks[-1][3]}", flush=True)
            except Exception:
                failures.append((f"check {name} {dtype}", traceback.format_exc()))
                print(failures[-1][1], flush=True)
        for dtype in (torch.float32, torch.bfloat16):
            try:
                result, size = time_op(op, tiny if args.dry_run else timed, dtype, device, timer,
                                       peers=dtype == torch.bfloat16 and not args.dry_run)
                timings.append((name, size, dtype, result))
                print(f"[{time.perf_counter() - start:.0f}s] time {name} {_shape(size)} {dtype}: {result}", flush=True)
            except Exception:
                failures.append((f"time {name} {dtype}", traceback.format_exc()))
                print(failures[-1][1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if out is not None:  # a run cut short keeps what it has
            out.write_text(report(device_name, checks, timings, failures, args.dry_run))
    text = report(device_name, checks, timings, failures, args.dry_run)
    print(text)
    print(f"total {time.perf_counter() - start:.0f}s")
    return 1 if failures or not all(c["ok"] for *_, c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

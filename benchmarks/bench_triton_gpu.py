"""Check every Triton op on a CUDA GPU against its float64 reference, then time it against the chunked torch path.

Usage (needs a CUDA GPU and Triton): ``python -m benchmarks.bench_triton_gpu [--out F.md] [--only OP ...]``.

Check: for each op, one size large enough to span many chunks, with every optional input set. The float64
reference (``backend="reference"``, the sequential loop) runs on the GPU on float64 copies of the inputs; the Triton
path and, for comparison, the torch path run in float32. Each output, final state and the gradient of every input
(through one random linear functional of all outputs) is compared by relative RMS error ‖out − ref‖ / ‖ref‖.
Outputs must be finite; the Triton error must stay under ``--tolerance``.

Time: float32, forward and forward + backward, median over ``triton.testing.do_bench``'s repeats (CUDA events),
Triton vs torch at the sizes a d_model = 768 layer uses. Inputs are fresh random tensors (never zeros). Each op is
guarded: one that fails is reported and the rest still run. Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from zoo.kernels import gated_delta_rule, hash_lookup, selective_scan, ssd, titans_linear_memory
from zoo.kernels._common import rel_rms_error


@dataclass
class Op:
    """One op: ``make(size, generator)`` draws float64 CPU inputs (name -> tensor, all leaves), ``call(inputs,
    backend)`` returns the list of output tensors; ``check`` is the size checked, ``times`` the sizes timed."""

    name: str
    make: Callable[[dict, torch.Generator], dict]
    call: Callable[[dict, str], list]
    check: dict
    times: list


def _randn(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _unit(gen, *shape):
    return torch.nn.functional.normalize(_randn(gen, *shape), dim=-1)


# --------------------------------------------------------------------------------------------------------- the ops
def _scan_make(s, gen):
    B, T, D, N = s["B"], s["T"], s["D"], s["N"]
    return dict(u=_randn(gen, B, T, D), delta=_randn(gen, B, T, D, scale=0.5, shift=-1.0),
                A=-(_rand(gen, D, N) * 2 + 0.3), B=_randn(gen, B, T, N), C=_randn(gen, B, T, N),
                D=_randn(gen, D), z=_randn(gen, B, T, D), delta_bias=_randn(gen, D, scale=0.2),
                initial_state=_randn(gen, B, D, N))


def _scan_call(x, backend):
    y, final = selective_scan(**x, delta_softplus=True, backend=backend)
    return [y, final]


def _ssd_make(s, gen):
    B, T, H, P, G, N = s["B"], s["T"], s["H"], s["P"], s["G"], s["N"]
    return dict(x=_randn(gen, B, T, H, P), dt=_randn(gen, B, T, H, scale=0.5, shift=-1.0),
                A=-(_rand(gen, H) * 2 + 0.3), B=_randn(gen, B, T, G, N), C=_randn(gen, B, T, G, N),
                D=_randn(gen, H), dt_bias=_randn(gen, H, scale=0.2), initial_state=_randn(gen, B, H, P, N))


def _ssd_call(x, backend):
    y, final = ssd(**x, chunk_size=64, dt_softplus=True, backend=backend)
    return [y, final]


def _gdn_make(s, gen):
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    return dict(q=_randn(gen, B, T, H, K), k=_unit(gen, B, T, H, K), v=_randn(gen, B, T, H, V),
                g=-3 * _rand(gen, B, T, H), beta=_rand(gen, B, T, H), initial_state=_randn(gen, B, H, K, V))


def _gdn_call(x, backend):
    o, final = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"], backend=backend)
    return [o, final]


def _hash_make(s, gen):
    N, K, tau, d = s["N"], s["K"], s["tau"], s["d"]
    return dict(x=_randn(gen, N, K * tau), tables=_randn(gen, K, 2 ** tau, d), bias=_randn(gen, d))


def _hash_call(x, backend):
    tau = x["x"].shape[1] // x["tables"].shape[0]
    return [hash_lookup(x["x"], x["tables"], tau, x["bias"], backend=backend)]


def _titans_make(s, gen):
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    gates = {name: _rand(gen, B, T, H) for name in ("alpha", "eta", "theta")}
    return dict(q=_unit(gen, B, T, H, K), k=_unit(gen, B, T, H, K), v=_randn(gen, B, T, H, V), **gates,
                M0=_randn(gen, B, H, K, V), S0=_randn(gen, B, H, K, V))


def _titans_call(x, backend):
    o, (M, S, *_) = titans_linear_memory(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"], chunk_size=16,
                                         initial_state=(x["M0"], x["S0"]), backend=backend)
    return [o, M, S]


OPS = [
    Op("selective_scan", _scan_make, _scan_call, dict(B=2, T=600, D=96, N=16),
       [dict(B=1, T=2048, D=1536, N=16), dict(B=1, T=8192, D=1536, N=16), dict(B=8, T=2048, D=1536, N=16)]),
    Op("ssd", _ssd_make, _ssd_call, dict(B=2, T=600, H=4, P=64, G=1, N=128),
       [dict(B=1, T=2048, H=24, P=64, G=1, N=128), dict(B=1, T=8192, H=24, P=64, G=1, N=128),
        dict(B=8, T=2048, H=24, P=64, G=1, N=128)]),
    Op("gated_delta_rule", _gdn_make, _gdn_call, dict(B=2, T=600, H=2, K=64, V=64),
       [dict(B=1, T=2048, H=12, K=64, V=64), dict(B=1, T=8192, H=12, K=64, V=64),
        dict(B=8, T=2048, H=12, K=64, V=64)]),
    Op("hash_lookup", _hash_make, _hash_call, dict(N=3000, K=12, tau=8, d=200),
       [dict(N=2048, K=96, tau=8, d=768), dict(N=8192, K=96, tau=8, d=768), dict(N=16384, K=96, tau=8, d=768)]),
    Op("titans_linear_memory", _titans_make, _titans_call, dict(B=2, T=600, H=2, K=32, V=32),
       [dict(B=1, T=2048, H=12, K=64, V=64), dict(B=1, T=8192, H=12, K=64, V=64),
        dict(B=8, T=2048, H=12, K=64, V=64)]),
]


# ----------------------------------------------------------------------------------------------------- check, time
def _leaves(inputs: dict, dtype, device) -> dict:
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in inputs.items()}


def _outputs_and_grads(op: Op, inputs: dict, backend: str, dtype, device) -> tuple[list, dict]:
    """Outputs and the gradient of every input through a fixed random linear functional of all outputs."""
    leaves = _leaves(inputs, dtype, device)
    outs = op.call(leaves, backend)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def check_op(op: Op, device) -> dict:
    inputs = op.make(op.check, torch.Generator().manual_seed(0))
    ref_out, ref_grad = _outputs_and_grads(op, inputs, "reference", torch.float64, device)
    errors = {}
    for backend in ("triton", "torch"):
        out, grad = _outputs_and_grads(op, inputs, backend, torch.float32, device)
        finite = all(bool(torch.isfinite(t).all()) for t in out + list(grad.values()))
        per = {f"out{i}": rel_rms_error(o, r) for i, (o, r) in enumerate(zip(out, ref_out))}
        per.update({f"d{name}": rel_rms_error(grad[name], ref_grad[name]) for name in ref_grad})
        errors[backend] = dict(finite=finite, worst=max(per.values()), per=per)
    return errors


def _timed(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_op(op: Op, size: dict, device) -> dict:
    inputs = _leaves(op.make(size, torch.Generator().manual_seed(1)), torch.float32, device)
    result = {}
    for backend in ("triton", "torch"):
        outs = op.call(inputs, backend)
        cotangents = [torch.randn_like(o) for o in outs]

        def forward():
            with torch.no_grad():
                op.call(inputs, backend)

        def forward_backward():
            torch.autograd.grad(op.call(inputs, backend), list(inputs.values()), cotangents)

        result[backend] = dict(fwd_ms=_timed(forward), fwd_bwd_ms=_timed(forward_backward))
    return result


def _shape(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def write_report(path: Path, ops: list, checks: dict, timings: dict, failures: list, tolerance: float) -> str:
    """Write the markdown table (and the raw numbers as JSON beside it); return it and every failure so far."""
    import triton

    failures = list(failures)
    lines = [f"# Triton ops on {torch.cuda.get_device_name()}: checked against the float64 reference, timed against "
             f"the torch path", "",
             f"Command: `python -m benchmarks.bench_triton_gpu`. torch {torch.__version__}, "
             f"triton {triton.__version__}, Python {platform.python_version()}.", "",
             "## Check (relative RMS error vs the float64 sequential reference on the GPU; worst over outputs, final "
             "states and every input's gradient)", "",
             "| op | size | Triton fp32 worst | torch fp32 worst | finite | pass |", "|---|---|---|---|---|---|"]
    for op in ops:
        if op.name in checks:
            c = checks[op.name]
            ok = c["triton"]["finite"] and c["triton"]["worst"] < tolerance
            lines.append(f"| {op.name} | {_shape(op.check)} | {c['triton']['worst']:.2e} | {c['torch']['worst']:.2e} "
                         f"| {c['triton']['finite']} | {'yes' if ok else 'NO'} |")
            if not ok:
                failures.append((op.name, "tolerance", f"worst {c['triton']['worst']:.2e}: {c['triton']['per']}"))
    lines += ["", "## Time (float32, median ms of triton.testing.do_bench; speed-up = torch / Triton)", "",
              "| op | size | Triton fwd | torch fwd | fwd speed-up | Triton fwd+bwd | torch fwd+bwd "
              "| fwd+bwd speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    for name, rows in timings.items():
        for size, t in rows:
            tr, to = t["triton"], t["torch"]
            lines.append(f"| {name} | {_shape(size)} | {tr['fwd_ms']:.3f} | {to['fwd_ms']:.3f} | "
                         f"{to['fwd_ms'] / tr['fwd_ms']:.1f}x | {tr['fwd_bwd_ms']:.3f} | {to['fwd_bwd_ms']:.3f} | "
                         f"{to['fwd_bwd_ms'] / tr['fwd_bwd_ms']:.1f}x |")
    if failures:
        lines += ["", "## Failures", ""] + [f"- {name} ({what}): {text.strip().splitlines()[-1]}"
                                            for name, what, text in failures]
    table = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    path.with_suffix(".json").write_text(json.dumps(dict(checks=checks, timings=timings,
                                                             failures=failures), indent=1, default=str))
    return table, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "triton_gpu.md")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--only", nargs="+", help="op names to run (default: all)")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; on CPU the test suite checks the Triton kernels under TRITON_INTERPRET=1")
    device = torch.device("cuda")
    ops = [op for op in OPS if not args.only or op.name in args.only]
    checks, timings, failures = {}, {}, []
    start = time.perf_counter()
    for op in ops:
        try:
            checks[op.name] = check_op(op, device)
            c = checks[op.name]
            print(f"[check {time.perf_counter() - start:.0f}s] {op.name}: triton worst {c['triton']['worst']:.2e}, "
                  f"torch worst {c['torch']['worst']:.2e} {c['triton']['per']}", flush=True)
        except Exception:
            failures.append((op.name, "check", traceback.format_exc()))
            print(f"[check] {op.name} FAILED\n{failures[-1][2]}", flush=True)
            continue
        if args.skip_timing:
            continue
        for size in op.times:
            try:
                timings.setdefault(op.name, []).append((size, time_op(op, size, device)))
                t = timings[op.name][-1][1]
                print(f"[time {time.perf_counter() - start:.0f}s] {op.name} {_shape(size)}: {t}", flush=True)
            except Exception:
                failures.append((op.name, f"time {_shape(size)}", traceback.format_exc()))
                print(f"[time] {op.name} {_shape(size)} FAILED\n{failures[-1][2]}", flush=True)
            torch.cuda.empty_cache()
        write_report(args.out, ops, checks, timings, failures, args.tolerance)  # a run cut short keeps what it has

    table, failures = write_report(args.out, ops, checks, timings, failures, args.tolerance)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

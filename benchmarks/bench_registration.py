"""Does registering the Triton ops with torch.library cost the CPU torch path anything? Times every op's torch path
(forward + backward, fastest of repeats) in one process before and after importing the ``*_triton`` modules that hold
the registrations, and prints a markdown table.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_registration [--repeats 30]
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from tests.kernels.test_registered_ops import OPS

MODULES = [module for module, _ in OPS.values()]


def seconds_per_call(call, kwargs, repeats: int) -> float:
    """Fastest wall time of forward + backward of ``call(**kwargs)`` (sum of every tensor output); the minimum, as
    the machine is shared and contention only adds time."""
    leaves = [x for x in kwargs.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        out = call(**kwargs)
        outputs = [x for x in torch.utils._pytree.tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        torch.autograd.grad(sum(x.float().sum() for x in outputs), leaves, allow_unused=True)
        times.append(time.perf_counter() - start)
    return min(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cases = {name: factory("torch") for name, (_, factory) in sorted(OPS.items())}
    before = {name: seconds_per_call(call, kwargs, args.repeats) for name, (call, kwargs) in cases.items()}
    for module in MODULES:
        importlib.import_module(module)
    registered = sorted(name for name in dir(torch.ops.zoo) if name.endswith(("_forward", "_backward")))
    after = {name: seconds_per_call(call, kwargs, args.repeats) for name, (call, kwargs) in cases.items()}
    print(f"registered: {', '.join(registered)}\n")
    print("| op (torch path, fwd+bwd, CPU) | before registration (ms) | after (ms) | after / before |")
    print("|---|---|---|---|")
    for name in cases:
        print(f"| {name} | {before[name] * 1e3:.3f} | {after[name] * 1e3:.3f} | {after[name] / before[name]:.3f} |")


if __name__ == "__main__":
    main()

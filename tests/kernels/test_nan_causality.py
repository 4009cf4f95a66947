"""A non-finite input at time t reaches no output before t, in every op and every backend (reference, torch, Triton
under the interpreter), and each backend's outputs are non-finite exactly where the reference's are.

Each time-indexed input is poisoned in turn (NaN, then inf) at one token inside a chunk, not at a chunk start.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import (F64, TRITON_DEVICE, gated_delta_inputs, hash_lookup_inputs, needs_triton,
                               selective_scan_inputs, ssd_inputs, titans_linear_inputs, titans_mlp_inputs)
from zoo.kernels import gated_delta_rule, hash_lookup, selective_scan, ssd, titans_linear_memory, titans_mlp_memory

T, BAD = 37, 21  # chunks of 16 (8 for the Titans memories): token 21 is in the middle of one
F32 = torch.float32


def _ssd(dtype, device):
    kwargs = ssd_inputs(batch=2, T=T, H=4, P=16, G=2, N=16, dtype=dtype, device=device)
    return {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}, \
        ("x", "dt", "B", "C"), lambda backend, **kw: ssd(**kw, chunk_size=16, backend=backend)


def _selective_scan(dtype, device):
    kwargs = selective_scan_inputs(batch=2, T=T, Dm=8, N=4, dtype=dtype, device=device)
    return {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}, \
        ("u", "delta", "B", "C", "z"), lambda backend, **kw: selective_scan(**kw, chunk_size=16, backend=backend)


def _gated_delta(dtype, device):
    q, k, v, g, beta, initial_state = (x.detach() for x in gated_delta_inputs(2, T, 2, 16, 16, dtype=dtype,
                                                                              device=device))
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state), ("q", "k", "v", "g", "beta"), \
        lambda backend, **kw: gated_delta_rule(**kw, chunk_size=16, backend=backend)


def _titans_linear(dtype, device):
    tensors, initial = titans_linear_inputs(2, T, 2, 16, 16, dtype=dtype)
    names = ("q", "k", "v", "alpha", "eta", "theta")
    kwargs = {name: x.detach().to(device) for name, x in zip(names, tensors)}
    return kwargs | {"initial_state": tuple(x.to(device) for x in initial)}, names, \
        lambda backend, **kw: titans_linear_memory(**kw, chunk_size=16, backend=backend)


def _titans_mlp(dtype, device):
    tensors, weights = titans_mlp_inputs(B=2, T=T, H=2, d=8, E=16, L=2, dtype=dtype)
    names = ("q", "k", "v", "alpha", "eta", "theta")
    return {name: x.to(device) for name, x in zip(names, tensors)} | {"weights": weights}, names, \
        lambda backend, **kw: titans_mlp_memory(**kw, chunk_size=8, backend=backend)


OPS = {"ssd": _ssd, "selective_scan": _selective_scan, "gated_delta_rule": _gated_delta,
       "titans_linear_memory": _titans_linear, "titans_mlp_memory": _titans_mlp}
TRITON_OPS = ["ssd", "selective_scan", "gated_delta_rule", "titans_linear_memory"]  # titans_mlp has no kernels


def outputs(op, backend: str, kwargs: dict) -> torch.Tensor:
    return op(backend, **kwargs)[0]


def check_op(name: str, backend: str, dtype: torch.dtype, device, monkeypatch) -> None:
    monkeypatch.setenv("ZOO_SKIP_VALUE_CHECKS", "1")  # the Titans memories refuse non-finite inputs otherwise
    kwargs, timed, op = OPS[name](dtype, device)
    reference_kwargs = {key: value.to("cpu", F64) if isinstance(value, torch.Tensor) else value
                        for key, value in kwargs.items()}
    if name == "titans_mlp_memory":
        reference_kwargs["weights"] = [w.to(F64) for w in kwargs["weights"]]
    if name == "titans_linear_memory":
        reference_kwargs["initial_state"] = tuple(x.to("cpu", F64) for x in kwargs["initial_state"])
    with torch.no_grad():
        clean = outputs(op, backend, kwargs)
        for input_name in timed:
            for value in (float("nan"), float("inf")):
                poisoned, poisoned_reference = dict(kwargs), dict(reference_kwargs)
                for target in (poisoned, poisoned_reference):
                    target[input_name] = target[input_name].clone()
                    target[input_name][:, BAD] = value
                y = outputs(op, backend, poisoned)
                where = f"{name} ({backend}): {value} in {input_name} at t={BAD}"
                assert torch.isfinite(y[:, :BAD]).all(), f"{where} makes an earlier output non-finite"
                assert torch.equal(y[:, :BAD], clean[:, :BAD]), f"{where} changes an earlier output"
                expected = torch.isfinite(outputs(op, "reference", poisoned_reference))
                assert torch.equal(torch.isfinite(y).cpu(), expected), \
                    f"{where}: non-finite at other outputs than the reference's"


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_non_finite_input_reaches_no_earlier_output(name, backend, monkeypatch):
    check_op(name, backend, F64, "cpu", monkeypatch)


@needs_triton
@pytest.mark.parametrize("name", TRITON_OPS)
def test_non_finite_input_reaches_no_earlier_output_triton(name, monkeypatch):
    check_op(name, "triton", F32, TRITON_DEVICE, monkeypatch)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
def test_hash_lookup_is_per_token(backend):
    """hash_lookup maps each row alone: a non-finite row changes no other row."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, tables, bias = (t.detach() for t in hash_lookup_inputs(N=T, dtype=F32 if backend == "triton" else F64,
                                                              device=device))
    clean = hash_lookup(x, tables, 4, bias, backend=backend)
    for value in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[BAD] = value
        y = hash_lookup(poisoned, tables, 4, bias, backend=backend)
        others = torch.arange(T, device=device) != BAD
        assert torch.equal(y[others], clean[others]), f"hash_lookup ({backend}): a {value} row changes other rows"

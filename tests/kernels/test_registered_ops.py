"""The Triton ops are registered through torch.library: their fake implementations and autograd pass
``torch.library.opcheck``, and ``torch.compile(fullgraph=True)`` traces the public ops through them without a graph
break (under the interpreter on CPU; the same registration serves CUDA)."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.kit import (TRITON_DEVICE, gated_delta_inputs, hash_lookup_inputs, needs_triton,
                               outputs_and_grads, selective_scan_inputs, ssd_inputs, titans_linear_inputs)
from zoo.kernels import gated_delta_rule, hash_lookup, selective_scan, ssd, titans_linear_memory

F32 = torch.float32


def _gated_delta(backend, dtype=F32):
    q, k, v, g, beta, h0 = gated_delta_inputs(1, 20, 2, 16, 16, dtype=dtype, device=TRITON_DEVICE)
    kwargs = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    return lambda **kw: gated_delta_rule(**kw, chunk_size=16, backend=backend), kwargs


def _selective_scan(backend, dtype=F32):
    kwargs = selective_scan_inputs(batch=1, T=12, Dm=4, N=4, G=2, dtype=dtype, device=TRITON_DEVICE)
    return lambda **kw: selective_scan(**kw, backend=backend), kwargs


def _ssd(backend, dtype=F32):
    kwargs = ssd_inputs(batch=1, T=20, H=2, P=4, G=1, N=4, dtype=dtype, device=TRITON_DEVICE)
    return lambda **kw: ssd(**kw, chunk_size=16, backend=backend), kwargs


def _titans_linear(backend, dtype=F32):
    tensors, (m0, s0) = titans_linear_inputs(1, 32, 1, 4, 4, dtype=dtype)
    names = ("q", "k", "v", "alpha", "eta", "theta")
    kwargs = {name: x.to(TRITON_DEVICE).requires_grad_() for name, x in zip(names, tensors)}
    kwargs["initial_state"] = (m0.to(TRITON_DEVICE), s0.to(TRITON_DEVICE))
    return lambda **kw: titans_linear_memory(**kw, chunk_size=16, backend=backend), kwargs


def _hash_lookup(backend, dtype=F32):
    x, tables, bias = hash_lookup_inputs(N=9, K=2, tau=3, d_out=8, dtype=dtype, device=TRITON_DEVICE)
    return lambda **kw: hash_lookup(**kw, tau=3, backend=backend), dict(x=x, tables=tables, bias=bias)


# op name -> (module holding its registered ops, factory of (call, inputs) for a backend and an input dtype)
OPS = {"gated_delta_rule": ("zoo.kernels.gated_delta_triton", _gated_delta),
       "selective_scan": ("zoo.kernels.selective_scan_triton", _selective_scan),
       "ssd": ("zoo.kernels.ssd_triton", _ssd),
       "titans_linear_memory": ("zoo.kernels.titans_linear_memory_triton", _titans_linear),
       "hash_lookup": ("zoo.kernels.hash_lookup_triton", _hash_lookup)}


def _captured_forward_arguments(name, monkeypatch):
    """The arguments the public op passes to its registered forward (recorded by wrapping it)."""
    module = importlib.import_module(OPS[name][0])
    registered, calls = module._forward_op, []

    def recording(*args):
        calls.append(args)
        return registered(*args)

    monkeypatch.setattr(module, "_forward_op", recording)
    call, kwargs = OPS[name][1]("triton")
    call(**kwargs)
    monkeypatch.undo()
    (args,) = calls
    return [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
            for x in args]


@needs_triton
@pytest.mark.parametrize("name", sorted(OPS))
def test_registered_forward_passes_opcheck(name, monkeypatch):
    args = _captured_forward_arguments(name, monkeypatch)
    forward = getattr(torch.ops.zoo, f"{name}_forward")
    torch.library.opcheck(forward, args, test_utils=("test_schema", "test_autograd_registration",
                                                     "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_triton
@pytest.mark.parametrize("name", sorted(OPS))
def test_compiled_fullgraph_matches_eager(name):
    call, kwargs = OPS[name][1]("triton")
    eager = outputs_and_grads(call, kwargs)
    torch._dynamo.reset()
    compiled = outputs_and_grads(torch.compile(call, fullgraph=True, backend="aot_eager"), kwargs)
    for got, want in zip(compiled.outputs, eager.outputs):
        torch.testing.assert_close(got, want)
    for key, want in eager.grads.items():
        if want is not None:
            torch.testing.assert_close(compiled.grads[key], want, msg=f"grad {key}")


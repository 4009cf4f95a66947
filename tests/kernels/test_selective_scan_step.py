"""``selective_scan_step``: one token from the op's state equals the chunked op (float64), with gradients."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.kit import TRITON_DEVICE, assert_close_to, needs_triton, outputs_and_grads, selective_scan_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.selective_scan import selective_scan, selective_scan_step

module = importlib.import_module("zoo.kernels.selective_scan")  # the module (zoo.kernels binds the op function to its name)

PREFIX, STEPS = 6, 4
PER_TOKEN = ("u", "delta", "B", "C", "z")


def detached(kwargs):
    return {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}


def at(kwargs, span):
    return {name: value[:, span] if name in PER_TOKEN else value for name, value in kwargs.items()}


def step_kwargs(kwargs, t, state):
    out = {name: value[:, t] if name in PER_TOKEN else value for name, value in kwargs.items()}
    out.pop("initial_state", None)
    return dict(out, state=state)


@pytest.mark.parametrize("G", [1, 2])
def test_steps_after_a_chunked_prefix_equal_one_chunked_call(G):
    kwargs = detached(selective_scan_inputs(batch=2, T=PREFIX + STEPS, Dm=8, N=4, G=G))
    y_all, final_all = selective_scan(**kwargs, chunk_size=4, backend="torch")
    _, state = selective_scan(**at(kwargs, slice(0, PREFIX)), chunk_size=4, backend="torch")
    for t in range(PREFIX, PREFIX + STEPS):
        y_t, state = selective_scan_step(**step_kwargs(kwargs, t, state))
        assert y_t.shape == (2, 8) and y_t.dtype == torch.float64
        assert rel_rms_error(y_t, y_all[:, t]) < 1e-12
    assert state.dtype == torch.float64 and rel_rms_error(state, final_all) < 1e-12


def test_the_op_runs_the_step_for_one_token(monkeypatch):
    kwargs = detached(selective_scan_inputs(batch=2, T=1, Dm=8, N=4, G=2))
    expected = selective_scan(**kwargs, backend="reference")
    monkeypatch.setattr(module, "_selective_scan_chunked", None)  # a chunked call would fail
    for got, want in zip(selective_scan(**kwargs), expected):
        assert rel_rms_error(got, want) < 1e-12


def test_step_gradients_match_the_reference():
    kwargs = selective_scan_inputs(batch=2, T=1, Dm=8, N=4, G=2)
    expected = outputs_and_grads(lambda **kw: selective_scan(**kw, backend="reference"), kwargs)
    def one_step(initial_state, **kw):
        y, state = selective_scan_step(**{name: value[:, 0] if name in PER_TOKEN else value for name, value in kw.items()},
                              state=initial_state)
        return y[:, None], state

    step = outputs_and_grads(one_step, kwargs)
    assert_close_to(step, expected)


def test_step_rejects_wrong_shapes():
    kwargs = detached(selective_scan_inputs(batch=2, T=1, Dm=8, N=4))
    with pytest.raises(ValueError, match="one token, no time axis"):
        selective_scan_step(**dict(step_kwargs(kwargs, 0, kwargs["initial_state"]), u=kwargs["u"]))
    with pytest.raises(ValueError, match="state has shape"):
        selective_scan_step(**step_kwargs(kwargs, 0, kwargs["initial_state"][:, :4]))


@needs_triton
@pytest.mark.parametrize("G", [1, 2])
def test_triton_step_matches_the_torch_step(G):
    kwargs = selective_scan_inputs(batch=2, T=1, Dm=8, N=4, G=G, dtype=torch.float32, device=TRITON_DEVICE)
    kwargs = step_kwargs(detached(kwargs), 0, kwargs["initial_state"].detach())
    for got, want in zip(selective_scan_step(**kwargs, backend="triton"), selective_scan_step(**kwargs,
                                                                                               backend="torch")):
        assert rel_rms_error(got, want) < 1e-5

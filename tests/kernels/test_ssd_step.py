"""``ssd_step``: one token from the op's state equals the chunked op (float64), with gradients."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.kit import TRITON_DEVICE, assert_close_to, needs_triton, outputs_and_grads, ssd_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.ssd import ssd, ssd_step

module = importlib.import_module("zoo.kernels.ssd")  # the module (zoo.kernels binds the op function to its name)

PREFIX, STEPS = 6, 4
PER_TOKEN = ("x", "dt", "B", "C")


def detached(kwargs):
    return {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}


def at(kwargs, span):
    return {name: value[:, span] if name in PER_TOKEN else value for name, value in kwargs.items()}


def step_kwargs(kwargs, t, state):
    out = {name: value[:, t] if name in PER_TOKEN else value for name, value in kwargs.items()}
    out.pop("initial_state", None)
    return dict(out, state=state)


def test_steps_after_a_chunked_prefix_equal_one_chunked_call():
    kwargs = detached(ssd_inputs(batch=2, T=PREFIX + STEPS))
    y_all, final_all = ssd(**kwargs, chunk_size=4, backend="torch")
    _, state = ssd(**at(kwargs, slice(0, PREFIX)), chunk_size=4, backend="torch")
    for t in range(PREFIX, PREFIX + STEPS):
        y_t, state = ssd_step(**step_kwargs(kwargs, t, state))
        assert y_t.shape == (2, 4, 8) and y_t.dtype == torch.float64
        assert rel_rms_error(y_t, y_all[:, t]) < 1e-12
    assert state.dtype == torch.float64 and rel_rms_error(state, final_all) < 1e-12


def test_the_op_runs_the_step_for_one_token(monkeypatch):
    kwargs = detached(ssd_inputs(batch=2, T=1))
    expected = ssd(**kwargs, backend="reference")
    monkeypatch.setattr(module, "_ssd_chunked", None)  # a chunked call would fail
    for got, want in zip(ssd(**kwargs), expected):
        assert rel_rms_error(got, want) < 1e-12


def test_step_gradients_match_the_reference():
    kwargs = ssd_inputs(batch=2, T=1)
    expected = outputs_and_grads(lambda **kw: ssd(**kw, backend="reference"), kwargs)
    def one_step(initial_state, **kw):
        y, state = ssd_step(**{name: value[:, 0] if name in PER_TOKEN else value for name, value in kw.items()},
                              state=initial_state)
        return y[:, None], state

    step = outputs_and_grads(one_step, kwargs)
    assert_close_to(step, expected)


def test_step_rejects_wrong_shapes():
    kwargs = detached(ssd_inputs(batch=2, T=1))
    with pytest.raises(ValueError, match="one token, no time axis"):
        ssd_step(**dict(step_kwargs(kwargs, 0, kwargs["initial_state"]), x=kwargs["x"]))
    with pytest.raises(ValueError, match="state has shape"):
        ssd_step(**step_kwargs(kwargs, 0, kwargs["initial_state"][..., :4]))


@needs_triton
def test_triton_step_matches_the_torch_step():
    kwargs = ssd_inputs(batch=2, T=1, P=24, dtype=torch.float32, device=TRITON_DEVICE)
    kwargs = step_kwargs(detached(kwargs), 0, kwargs["initial_state"].detach())
    for got, want in zip(ssd_step(**kwargs, backend="triton"), ssd_step(**kwargs, backend="torch")):
        assert rel_rms_error(got, want) < 1e-5

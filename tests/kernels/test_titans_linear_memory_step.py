"""``titans_linear_memory_step``: one token from the op's stream state equals one chunked call (float64), across
chunk boundaries, with gradients."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.kit import assert_close_to, outputs_and_grads, titans_linear_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.titans_linear_memory import LinearMemoryState, titans_linear_memory, titans_linear_memory_step

module = importlib.import_module("zoo.kernels.titans_linear_memory")
CHUNK, PREFIX, STEPS = 4, 3, 7  # the steps fill the prefix's chunk, one whole chunk and start the next


def test_steps_after_a_chunked_prefix_equal_one_chunked_call():
    streams, initial = titans_linear_inputs(2, PREFIX + STEPS, 3, 8, 8)
    o_all, final_all = titans_linear_memory(*streams, chunk_size=CHUNK, initial_state=initial, backend="torch")
    _, state = titans_linear_memory(*(x[:, :PREFIX] for x in streams), chunk_size=CHUNK, initial_state=initial,
                                    backend="torch")
    for t in range(PREFIX, PREFIX + STEPS):
        o_t, state = titans_linear_memory_step(*(x[:, t] for x in streams), state, chunk_size=CHUNK)
        assert o_t.shape == (2, 3, 8) and o_t.dtype == torch.float64
        assert rel_rms_error(o_t, o_all[:, t]) < 1e-12
    assert isinstance(state, LinearMemoryState) and state.pending_k.shape[1] == (PREFIX + STEPS) % CHUNK
    for got, want in zip(state, final_all):
        assert rel_rms_error(got, want) < 1e-12


def test_the_op_runs_the_step_for_one_token(monkeypatch):
    streams, initial = titans_linear_inputs(2, 1, 2, 8, 4)
    expected = titans_linear_memory(*streams, chunk_size=CHUNK, initial_state=initial, backend="reference")
    monkeypatch.setattr(module, "_stream", None)  # a chunked call would fail
    got = titans_linear_memory(*streams, chunk_size=CHUNK, initial_state=initial)
    assert rel_rms_error(got[0], expected[0]) < 1e-12
    for a, b in zip(got[1], expected[1]):
        assert a.shape == b.shape and (a.numel() == 0 or rel_rms_error(a, b) < 1e-12)


@pytest.mark.parametrize("chunk_size", [1, CHUNK])  # the token completes its chunk, or not
def test_step_gradients_match_the_reference(chunk_size):
    streams, initial = titans_linear_inputs(2, 1, 2, 8, 4)
    names = ("q", "k", "v", "alpha", "eta", "theta")
    inputs = {**dict(zip(names, streams)), "M_0": initial[0], "S_0": initial[1]}
    inputs = {name: value.requires_grad_() for name, value in inputs.items()}

    def reference(M_0, S_0, **kw):
        return titans_linear_memory(*kw.values(), chunk_size=chunk_size, initial_state=(M_0, S_0),
                                    backend="reference")

    def one_step(M_0, S_0, **kw):
        o, state = titans_linear_memory_step(*(x[:, 0] for x in kw.values()), (M_0, S_0), chunk_size=chunk_size)
        return o[:, None], state

    assert_close_to(outputs_and_grads(one_step, inputs), outputs_and_grads(reference, inputs))


def test_step_rejects_wrong_shapes():
    streams, initial = titans_linear_inputs(2, 1, 2, 8, 4)
    with pytest.raises(ValueError, match="without a time axis"):
        titans_linear_memory_step(*streams, initial)
    with pytest.raises(ValueError, match="pending_k must be"):
        state = titans_linear_memory(*streams, chunk_size=CHUNK, initial_state=initial)[1]
        titans_linear_memory_step(*(x[:, 0] for x in streams), state, chunk_size=1)

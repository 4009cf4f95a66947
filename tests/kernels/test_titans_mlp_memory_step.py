"""``titans_mlp_memory_step``: one token from the op's stream state equals one chunked call (float64), across chunk
boundaries, with gradients."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._pytree import tree_flatten

from tests.kernels.kit import assert_close_to, outputs_and_grads, titans_mlp_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.titans_mlp_memory import MLPMemoryState, titans_mlp_memory, titans_mlp_memory_step

module = importlib.import_module("zoo.kernels.titans_mlp_memory")
CHUNK, PREFIX, STEPS = 4, 3, 7  # the steps fill the prefix's chunk, one whole chunk and start the next


@pytest.mark.parametrize("L", [2, 3])
def test_steps_after_a_chunked_prefix_equal_one_chunked_call(L):
    streams, weights = titans_mlp_inputs(B=2, T=PREFIX + STEPS, H=2, d=8, E=16, L=L)
    o_all, final_all = titans_mlp_memory(*streams, weights, chunk_size=CHUNK, backend="torch")
    _, state = titans_mlp_memory(*(x[:, :PREFIX] for x in streams), weights, chunk_size=CHUNK, backend="torch")
    for t in range(PREFIX, PREFIX + STEPS):
        o_t, state = titans_mlp_memory_step(*(x[:, t] for x in streams), weights, chunk_size=CHUNK, state=state)
        assert o_t.shape == (2, 2, 8) and o_t.dtype == torch.float64
        assert rel_rms_error(o_t, o_all[:, t]) < 1e-12
    assert isinstance(state, MLPMemoryState) and state.pending_k.shape[1] == (PREFIX + STEPS) % CHUNK
    for got, want in zip(tree_flatten(state)[0], tree_flatten(final_all)[0]):
        assert rel_rms_error(got, want) < 1e-12


def test_the_op_runs_the_step_for_one_token(monkeypatch):
    streams, weights = titans_mlp_inputs(B=2, T=1, H=2, d=8, E=16)
    expected = titans_mlp_memory(*streams, weights, chunk_size=CHUNK, backend="reference")
    monkeypatch.setattr(module, "_titans_mlp_memory_torch", None)  # a chunked call would fail
    got = titans_mlp_memory(*streams, weights, chunk_size=CHUNK)
    for a, b in zip(tree_flatten(got)[0], tree_flatten(expected)[0]):
        assert a.shape == b.shape and (a.numel() == 0 or rel_rms_error(a, b) < 1e-12)


@pytest.mark.parametrize("chunk_size", [1, CHUNK])  # the token completes its chunk, or not
def test_step_gradients_match_the_reference(chunk_size):
    streams, weights = titans_mlp_inputs(B=2, T=1, H=2, d=8, E=16)
    names = ("q", "k", "v", "alpha", "eta", "theta")
    inputs = {**dict(zip(names, streams)), "W1": weights[0], "W2": weights[1]}
    inputs = {name: value.requires_grad_() for name, value in inputs.items()}

    def reference(W1, W2, **kw):
        return titans_mlp_memory(*kw.values(), [W1, W2], chunk_size=chunk_size, backend="reference")

    def one_step(W1, W2, **kw):
        o, state = titans_mlp_memory_step(*(x[:, 0] for x in kw.values()), [W1, W2], chunk_size=chunk_size)
        return o[:, None], state

    assert_close_to(outputs_and_grads(one_step, inputs), outputs_and_grads(reference, inputs))


def test_step_rejects_wrong_shapes():
    streams, weights = titans_mlp_inputs(B=2, T=1, H=2, d=8, E=16)
    with pytest.raises(ValueError, match="without a time axis"):
        titans_mlp_memory_step(*streams, weights)
    with pytest.raises(ValueError, match="backend must be"):
        titans_mlp_memory_step(*(x[:, 0] for x in streams), weights, backend="reference")

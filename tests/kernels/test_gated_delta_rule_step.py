"""``gated_delta_rule_step``: one token from the op's state equals the chunked op (float64), with gradients."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kit import TRITON_DEVICE, assert_close_to, needs_triton, outputs_and_grads
from tests.kernels.kit import gated_delta_inputs as make_inputs
import zoo.kernels.gated_delta as module
from zoo.kernels.gated_delta import gated_delta_rule, gated_delta_rule_step
from zoo.kernels._common import rel_rms_error

PREFIX, STEPS = 7, 5


def token(tensors, t):
    return [x[:, t] for x in tensors]


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_steps_after_a_chunked_prefix_equal_one_chunked_call(use_qk_l2norm):
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(2, PREFIX + STEPS, 3, 8, 16,
                                                            normalize_k=not use_qk_l2norm))
    o_all, final_all = gated_delta_rule(q, k, v, g, beta, h0, use_qk_l2norm=use_qk_l2norm, chunk_size=4,
                                        backend="torch")
    _, state = gated_delta_rule(*(x[:, :PREFIX] for x in (q, k, v, g, beta)), h0, use_qk_l2norm=use_qk_l2norm,
                                chunk_size=4, backend="torch")
    for t in range(PREFIX, PREFIX + STEPS):
        o_t, state = gated_delta_rule_step(*token((q, k, v, g, beta), t), state, use_qk_l2norm=use_qk_l2norm)
        assert o_t.shape == (2, 3, 16) and o_t.dtype == torch.float64
        assert rel_rms_error(o_t, o_all[:, t]) < 1e-12
    assert state.dtype == torch.float64 and rel_rms_error(state, final_all) < 1e-12


def test_the_op_runs_the_step_for_one_token(monkeypatch):
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(2, 1, 2, 8, 8))
    expected = gated_delta_rule(q, k, v, g, beta, h0, scale=0.5, backend="reference")
    monkeypatch.setattr(module, "gated_delta_rule_chunked", None)  # a chunked call would fail
    o, state = gated_delta_rule(q, k, v, g, beta, h0, scale=0.5)
    assert rel_rms_error(o, expected[0]) < 1e-12 and rel_rms_error(state, expected[1]) < 1e-12
    o, _ = gated_delta_rule(q, k, v, g, beta)  # no initial state: zeros
    assert rel_rms_error(o, gated_delta_rule(q, k, v, g, beta, backend="reference")[0]) < 1e-12


def test_step_gradients_match_the_reference():
    inputs = dict(zip(("q", "k", "v", "g", "beta", "initial_state"), make_inputs(2, 1, 2, 8, 8, normalize_k=False)))
    expected = outputs_and_grads(lambda **kw: gated_delta_rule(**kw, use_qk_l2norm=True, backend="reference"), inputs)
    def one_step(initial_state, **kw):
        o, state = gated_delta_rule_step(*(kw[name][:, 0] for name in ("q", "k", "v", "g", "beta")), initial_state,
                                         use_qk_l2norm=True)
        return o[:, None], state

    step = outputs_and_grads(one_step, inputs)
    assert_close_to(step, expected)


def test_step_rejects_wrong_shapes():
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(2, 1, 2, 8, 8))
    with pytest.raises(ValueError, match="one token, no time axis"):
        gated_delta_rule_step(q, k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    with pytest.raises(ValueError, match="state has shape"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0[:, :1])
    with pytest.raises(ValueError, match="backend must be"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0, backend="reference")


@needs_triton
def test_triton_step_matches_the_torch_step():
    q, k, v, g, beta, h0 = (x.detach().float().to(TRITON_DEVICE) for x in make_inputs(2, 1, 3, 16, 80))
    args = (q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    for got, want in zip(gated_delta_rule_step(*args, use_qk_l2norm=True, backend="triton"),
                         gated_delta_rule_step(*args, use_qk_l2norm=True, backend="torch")):
        assert rel_rms_error(got, want) < 1e-5

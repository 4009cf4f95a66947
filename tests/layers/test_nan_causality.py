"""A non-finite input at position t reaches no output before t, in every registered causal mixer.

Masked (future) entries of a chunk's dense products must be selected away, not multiplied by zero (0 · NaN = NaN), so
one NaN or inf token poisons only itself and what follows it. Built and fed as ``tests/layers/test_mixer_contract.py``
does; the positions sit inside a chunk and a segment, not on their starts.
"""
from __future__ import annotations

import pytest
import torch

from tests.layers.test_mixer_contract import CAUSAL, build, inputs


def bad_positions(T: int) -> list[int]:
    """Positions off the 4-, 8- and 64-token chunk grids the contract's mixers use: one early, one late."""
    return [13, T - 5]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", CAUSAL)
def test_non_finite_input_reaches_no_earlier_output(name, value, monkeypatch):
    monkeypatch.setenv("ZOO_SKIP_VALUE_CHECKS", "1")  # ops that reject non-finite inputs must still stay causal
    mixer, x = build(name), inputs(name)
    with torch.no_grad():
        clean, _ = mixer(x)
        for t in bad_positions(x.shape[1]):
            poisoned = x.clone()
            poisoned[:, t] = value
            y, _ = mixer(poisoned)
            assert torch.isfinite(y[:, :t]).all(), \
                f"{name}: a {value} at t={t} makes outputs before t non-finite (first at " \
                f"t={int((~torch.isfinite(y[:, :t])).any(-1).any(0).nonzero()[0])})"
            assert torch.equal(y[:, :t], clean[:, :t]), f"{name}: a {value} at t={t} changes outputs before t"

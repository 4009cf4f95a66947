"""Decoding: each recurrent mixer's T = 1 path runs its op's one-token step (never the chunked op), and token-by-token
decoding after a prompt equals one call (float64), the states included."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from zoo.kernels._common import rel_rms_error
from zoo.layers.conv import ShortConv
from zoo.layers.mamba import Mamba
from zoo.layers.mamba2 import Mamba2
from zoo.layers.mom import GatedDeltaNet, MixtureOfMemories
from zoo.layers.titans import TitansMemory
from zoo.layers.titans_hybrids import TitansMAC, TitansMAG, TitansMAL

DIM, PROMPT, NEW = 16, 5, 6

# (name, factory, (module, attribute) of the chunked op the layer would call)
MIXERS = [
    ("mamba", lambda: Mamba(DIM, d_state=4), [("zoo.layers.mamba", "selective_scan")]),
    ("mamba2", lambda: Mamba2(DIM, d_state=8, headdim=8, ngroups=2, chunk_size=4), [("zoo.layers.mamba2", "ssd")]),
    ("gdn", lambda: GatedDeltaNet(DIM, heads=2), [("zoo.layers.mom", "gated_delta_rule")]),
    ("gdn_value_heads", lambda: GatedDeltaNet(DIM, heads=2, expand_v=2, value_heads=4, use_gate=False),
     [("zoo.layers.mom", "gated_delta_rule")]),
    ("mom", lambda: MixtureOfMemories(DIM, heads=2, num_memories=3, topk=2), [("zoo.layers.mom", "gated_delta_rule")]),
    ("titans_linear", lambda: TitansMemory(DIM, heads=2, memory_depth=1, chunk_size=4),
     [("zoo.layers.titans", "titans_linear_memory")]),
    ("titans_mlp", lambda: TitansMemory(DIM, heads=2, memory_depth=2, chunk_size=4),
     [("zoo.layers.titans", "titans_mlp_memory")]),
    ("titans_mac", lambda: TitansMAC(DIM, heads=2, segment_len=4, persistent_tokens=2, memory={"chunk_size": 4}),
     []),
    ("titans_mag", lambda: TitansMAG(DIM, heads=2, window=4, persistent_tokens=2, memory={"chunk_size": 4}),
     [("zoo.layers.titans", "titans_mlp_memory")]),
    ("titans_mal", lambda: TitansMAL(DIM, heads=2, window=4, persistent_tokens=2, memory={"chunk_size": 4}),
     [("zoo.layers.titans", "titans_mlp_memory")]),
]


def flat(state):
    return [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name, factory, chunked", MIXERS, ids=[m[0] for m in MIXERS])
def test_decoding_runs_the_steps_and_equals_one_call(name, factory, chunked, monkeypatch):
    torch.manual_seed(0)
    mixer = factory().double().eval()
    x = torch.randn(2, PROMPT + NEW, DIM, dtype=torch.float64)
    y_all, state_all = mixer(x)
    y, state = mixer(x[:, :PROMPT])
    for module, attribute in chunked:  # from here on a chunked call would fail
        monkeypatch.setattr(f"{module}.{attribute}", None)
    pieces = [y]
    with torch.no_grad():
        for t in range(PROMPT, PROMPT + NEW):
            before = [s.clone() for s in flat(state)]
            y_t, new_state = mixer(x[:, t:t + 1], state)
            assert all(torch.equal(a, b) for a, b in zip(before, flat(state))), "the state passed in was modified"
            pieces.append(y_t)
            state = new_state
    assert rel_rms_error(torch.cat(pieces, 1), y_all) < 1e-12
    for got, want in zip(flat(state), flat(state_all)):
        assert got.shape == want.shape and (got.numel() == 0 or rel_rms_error(got, want) < 1e-12)


@pytest.mark.parametrize("activation, bias, conv1d_layout", [(None, False, False), ("silu", True, True)])
def test_conv_step_equals_forward_on_one_token(activation, bias, conv1d_layout):
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=bias, activation=activation, conv1d_layout=conv1d_layout).double()
    x, state = torch.randn(3, 1, 6, dtype=torch.float64), torch.randn(3, 3, 6, dtype=torch.float64)
    y, new_state = conv(x, state)
    y_step, new_state_step = conv.step(x[:, 0], state)
    assert torch.allclose(y_step, y[:, 0], atol=1e-14) and torch.equal(new_state_step, new_state)

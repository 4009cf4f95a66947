"""ShortConv: the causal depthwise filter and its state, and the fused causal conv + SiLU path (Mamba's conv)
against F.conv1d, with gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import check_decode_equals_full, check_stream_split, rel_err
from zoo.layers.conv import ShortConv


def reference_conv_silu(conv: ShortConv, x: torch.Tensor, state: torch.Tensor | None = None):
    """silu(causal depthwise F.conv1d) of x (B, T, C) after ``state`` (B, K-1, C) (zeros if None).

    Returns (output (B, T, C), the last K-1 rows of [state | x])."""
    K, C = conv.size, x.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], K - 1, C)
    padded = torch.cat([state, x], 1)                                                 # (B, K-1+T, C)
    out = F.conv1d(padded.transpose(1, 2), conv.weight.view(C, 1, K), conv.bias, groups=C)
    return F.silu(out.transpose(1, 2)), padded[:, padded.shape[1] - (K - 1):]


@pytest.mark.parametrize("conv1d_layout", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_conv_silu_matches_conv1d_with_gradients(T, with_bias, conv1d_layout):
    """ShortConv's fused causal conv + SiLU (hand-written backward) against F.conv1d over [state | x] in float64:
    outputs, the carried state, and the gradients of x, state, weight and bias, including through the returned state.
    """
    torch.manual_seed(0)
    C, K = 5, 4
    conv = ShortConv(C, K, bias=with_bias, activation="silu", conv1d_layout=conv1d_layout).double()
    x = torch.randn(2, T, C, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, K - 1, C, dtype=torch.float64, requires_grad=True)
    g_out, g_state = torch.randn(2, T, C, dtype=torch.float64), torch.randn(2, K - 1, C, dtype=torch.float64)

    results = []
    for fn in (lambda: conv(x, state), lambda: reference_conv_silu(conv, x, state)):
        out, new_state = fn()
        params = [x, state, conv.weight] + ([conv.bias] if with_bias else [])
        grads = torch.autograd.grad((out * g_out).sum() + (new_state * g_state).sum(), params)
        results.append((out, new_state, grads))
    (out, new_state, grads), (out_ref, state_ref, grads_ref) = results
    assert rel_err(out, out_ref) < 1e-12 and rel_err(new_state, state_ref) < 1e-12
    for name, g, g_ref in zip(["x", "state", "weight", "bias"], grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-12, name

    # split output (as Mamba2 uses it) with one piece and the state unused: their gradients are zero
    (first, rest), _ = conv(x, state, split=(2, 3))
    assert torch.equal(torch.cat([first, rest], -1), out)
    grads = torch.autograd.grad((rest * g_out[..., 2:]).sum(), [x, state])
    out_ref = reference_conv_silu(conv, x, state)[0]
    grads_ref = torch.autograd.grad((out_ref[..., 2:] * g_out[..., 2:]).sum(), [x, state])
    for name, g, g_ref in zip(["x", "state"], grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-12, name


class ConvAsMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ShortConv(6, size=4, bias=True).double()

    def forward(self, x, state=None):
        return self.conv(x, state)


def test_short_conv_is_a_causal_depthwise_filter():
    torch.manual_seed(0)
    conv = ShortConv(3, size=3).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y, state = conv(x)
    w = conv.weight                                                      # (C, size); last tap multiplies x_t
    expected = sum(w[:, 2 - j] * torch.nn.functional.pad(x, (0, 0, j, 0))[:, :7] for j in range(3))
    assert rel_err(y, expected) < 1e-12 and torch.equal(state, x[:, -2:])


def test_short_conv_streams_and_decodes():
    torch.manual_seed(1)
    mixer = ConvAsMixer()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    check_stream_split(mixer, x, splits=[1, 2, 3, 8], tol=1e-13)
    check_decode_equals_full(mixer, x, tol=1e-13)

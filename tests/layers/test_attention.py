"""Attention: the mixer contract (streaming, causality, decode) and a float64 loop reference."""
import math

import pytest
import torch

from zoo.layers.attention import Attention
from tests.helpers import check_decode_equals_full, check_future_does_not_leak, check_stream_split, rel_err


def reference_attention(layer: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query loop over visible keys, from the equations: softmax(q k^T / sqrt(d)) v, RoPE by absolute position."""
    B, T, _ = x.shape
    d, H, Hkv = layer.head_dim, layer.heads, layer.kv_heads
    if layer.conv is not None:  # x_t + sum_j w_j x_{t-(size-1)+j}, zeros before the start
        size = layer.conv.size
        padded = torch.cat([x.new_zeros(B, size - 1, x.shape[2]), x], 1)
        x = x + sum(padded[:, j:j + T] * layer.conv.weight[:, j] for j in range(size))
    q = (x @ layer.w_q.weight.T).view(B, T, H, d)
    k = (x @ layer.w_k.weight.T).view(B, T, Hkv, d)
    v = (x @ layer.w_v.weight.T).view(B, T, Hkv, d)

    def rotate(z, pos):
        half = d // 2
        freq = 1.0 / layer.rotary.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = pos * freq
        a, b = z[..., :half], z[..., half:]
        return torch.cat([a * torch.cos(angle) - b * torch.sin(angle), b * torch.cos(angle) + a * torch.sin(angle)], -1)

    if layer.rotary is not None:
        q = torch.stack([rotate(q[:, t], t) for t in range(T)], 1)
        k = torch.stack([rotate(k[:, t], t) for t in range(T)], 1)
    pk = pv = None
    if layer.persistent is not None:
        pk = (layer.persistent @ layer.w_k.weight.T).view(-1, Hkv, d)
        pv = (layer.persistent @ layer.w_v.weight.T).view(-1, Hkv, d)
    out = torch.zeros(B, T, H, d, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for t in range(T):
                if layer.causal:
                    lo = 0 if layer.window is None else max(0, t - layer.window + 1)
                    visible = list(range(lo, t + 1))
                else:
                    visible = [s for s in range(T) if mask is None or mask[b, s]]
                keys = k[b, visible, g]
                values = v[b, visible, g]
                if pk is not None:
                    keys, values = torch.cat([pk[:, g], keys]), torch.cat([pv[:, g], values])
                weights = torch.softmax(keys @ q[b, t, h] / math.sqrt(d), dim=0)
                out[b, t, h] = weights @ values
    return out.reshape(B, T, H * d) @ layer.w_o.weight.T


CASES = {
    "plain": dict(heads=4),
    "gqa": dict(heads=4, kv_heads=2),
    "window": dict(heads=2, window=5),
    "persistent": dict(heads=2, persistent_tokens=3),
    "window_persistent_gqa": dict(heads=4, kv_heads=1, window=4, persistent_tokens=2),
    "no_rope": dict(heads=2, rope=False),
    "conv": dict(heads=2, conv_size=3, window=6),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference(name):
    torch.manual_seed(0)
    layer = Attention(32, **CASES[name]).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    y, _ = layer(x)
    assert rel_err(y, reference_attention(layer, x)) < 1e-10


@pytest.mark.parametrize("name", CASES)
def test_stream_split_equals_full(name):
    torch.manual_seed(1)
    layer = Attention(32, **CASES[name]).double()
    check_stream_split(layer, torch.randn(2, 17, 32, dtype=torch.float64), splits=[1, 4, 5, 9, 16], tol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_decode_equals_full_forward(name):
    torch.manual_seed(2)
    layer = Attention(32, **CASES[name]).double()
    check_decode_equals_full(layer, torch.randn(2, 11, 32, dtype=torch.float64), tol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_future_does_not_leak(name):
    torch.manual_seed(3)
    layer = Attention(32, **CASES[name])
    check_future_does_not_leak(layer, torch.randn(2, 12, 32), t=6)


def test_window_cache_is_bounded():
    layer = Attention(16, heads=2, window=4)
    _, state = layer(torch.randn(1, 20, 16))
    assert state.k.shape[1] == 4 and state.positions[0].tolist() == [16, 17, 18, 19]


def test_bidirectional_padding_never_changes_real_outputs():
    torch.manual_seed(4)
    layer = Attention(32, heads=2, causal=False).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    y, state = layer(x, mask=mask)
    assert state is None
    garbage = x.clone()
    garbage[1, 6:] = 100 * torch.randn(3, 32, dtype=torch.float64)
    y2, _ = layer(garbage, mask=mask)
    assert torch.allclose(y[:, :6], y2[:, :6], atol=1e-12) and torch.allclose(y[0], y2[0], atol=1e-12)
    assert rel_err(y[1:, :6], layer(x[1:, :6])[0]) < 1e-12
    assert rel_err(y[1, :6], reference_attention(layer, x, mask)[1, :6]) < 1e-10


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        Attention(32, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="sliding window needs causal=True"):
        Attention(32, heads=4, window=8, causal=False)
    with pytest.raises(ValueError, match="mask must be left padding"):  # causal attention takes left padding only
        Attention(32, heads=4)(torch.randn(1, 3, 32), mask=torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match="cu_seqlens needs causal=True"):
        Attention(32, heads=4, causal=False)(torch.randn(1, 3, 32), cu_seqlens=torch.tensor([0, 3]))

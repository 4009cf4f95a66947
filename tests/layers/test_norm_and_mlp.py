"""RMSNorm against its formula, and SwiGLU's hidden width and shape."""
import torch

from zoo.layers.mlp import SwiGLU, swiglu_hidden
from zoo.layers.norm import RMSNorm


def test_norms_and_swiglu():
    x = torch.randn(2, 3, 8)
    norm = RMSNorm(8)
    assert torch.allclose(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt(), atol=1e-6)
    assert swiglu_hidden(96, 8 / 3) == 256 and SwiGLU(8, 32)(x).shape == x.shape

"""Triton device functions shared by several kernels. Import only where Triton is available."""
import triton
import triton.language as tl


@triton.jit
def softplus(x):
    """log(1 + e^x), stable: max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's trick (exact for tiny arguments)."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p

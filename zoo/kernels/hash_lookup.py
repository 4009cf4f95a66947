"""MemoryFormer's hash lookup (Ding et al., arXiv 2411.12992): the Memory Layer that replaces a linear projection.

For one token x ∈ R^{Kτ}, cut into K contiguous chunks z_k of τ values:

    code_k = Σ_i [z_{k,i} >= 0] · 2^{τ−1−i}                   (MSB first; 0 and −0.0 give bit 1, NaN bit 0)
    p_k    = exp(⟨sign z_k, z_k⟩/t) / Σ_h exp(⟨h, z_k⟩/t) = Π_i σ(2|z_{k,i}|/t)    (temperature t, h ∈ {−1, 1}^τ)
    s_k    = p_k ("prob", the paper)   or   ‖z_k‖₁ · p_k ("l1prob", the released code)
    y      = Σ_k s_k · tables[k, code_k, :] + bias

The file holds the four numbered parts of the kernel contract: 1 the dense one-hot reference (the oracle), 2 the PyTorch
path (``F.embedding_bag`` with per-sample weights, the CPU path), 3 the entry to the Triton kernels and their autograd
function in ``hash_lookup_triton.py`` (imported only when the Triton backend is asked for), and 4 the public op with
validation (``_validate``) and dispatch. The op does not chunk, so it has no chunk size.
See docs/memoryformer.md#hash-and-bucket-index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels._common import check_floating, check_shape, compute_dtype, resolve_backend

__all__ = ["hash_lookup", "hash_lookup_reference", "hash_lookup_torch", "hash_codes", "EMBEDDING_BAG_FLOPS",
           "SCORES", "MAX_TAU"]

OP = "hash_lookup"
SCORES = ("prob", "l1prob")
MAX_TAU = 16  # codes fit int32 and tables stay addressable (2^16 rows per table)


def hash_codes(x: torch.Tensor, tau: int, score: str = "l1prob", dtype: torch.dtype | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices and differentiable weights of every chunk of ``x`` (docs/memoryformer.md#differentiable-weight).

    Args:
        x: (..., K·τ). tau: bits per chunk. score: "prob" (s = p) or "l1prob" (s = ‖z‖₁·p).
        dtype: dtype of s; None means float32 (float64 for float64 x). temperature: t > 0 of p = Π σ(2|z|/t).

    Returns:
        code: (..., K) int64 in [0, 2^τ), MSB first, from the signs of x in its own dtype (no gradient);
        s: (..., K) weights, differentiable in x (``abs`` gives sgn(0) = 0 at exact zeros).
    """
    if dtype is None:
        dtype = compute_dtype(x)
    z = x.unflatten(-1, (x.shape[-1] // tau, tau))  # (..., K, τ)
    powers = 2 ** torch.arange(tau - 1, -1, -1, device=x.device)  # (τ,) 2^{τ−1−i}
    code = ((z >= 0).long() * powers).sum(-1)  # (..., K)
    magnitude = z.to(dtype).abs()  # (..., K, τ)
    log_p = -F.softplus(-2.0 * magnitude / temperature).sum(-1)  # (..., K) log Π σ(2|z|/t)
    s = log_p.exp()
    if score == "l1prob":
        s = magnitude.sum(-1) * s
    return code, s


# ----------------------------------------------------------------------------------------------------------------------
# 1. Reference: the dense one-hot form, a loop over the K tables.
# ----------------------------------------------------------------------------------------------------------------------

def hash_lookup_reference(x: torch.Tensor, tables: torch.Tensor, tau: int = 8, bias: torch.Tensor | None = None,
                          *, score: str = "l1prob", temperature: float = 1.0) -> torch.Tensor:
    """The plainest correct hash lookup: ``y = Σ_k (s_k · onehot(code_k, 2^τ)) @ tables[k] + bias`` (the oracle).

    Same arguments and return as :func:`hash_lookup` (without ``backend``); no input validation. Works in float64;
    autograd gives the exact dense gradients (exact zeros on the table rows no token hit).
    """
    K, rows, d_out = tables.shape
    dtype = compute_dtype(x, tables)
    lead = x.shape[:-1]
    code, s = hash_codes(x.reshape(-1, x.shape[-1]), tau, score, dtype, temperature)  # (N, K) each
    y = x.new_zeros(code.shape[0], d_out, dtype=dtype)  # (N, d_out)
    for k in range(K):
        weights = F.one_hot(code[:, k], rows).to(dtype) * s[:, k, None]  # (N, 2^τ): W_k = onehot · s
        y = y + weights @ tables[k].to(dtype)  # (N, d_out)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(tables.dtype).reshape(*lead, d_out)


# ----------------------------------------------------------------------------------------------------------------------
# 2. PyTorch path: fixed-size bags of K rows through F.embedding_bag with per-sample weights.
# ----------------------------------------------------------------------------------------------------------------------

def hash_lookup_torch(x: torch.Tensor, tables: torch.Tensor, tau: int = 8, bias: torch.Tensor | None = None,
                      *, score: str = "l1prob", temperature: float = 1.0) -> torch.Tensor:
    """The PyTorch hash lookup (``backend="torch"``); same arguments and return as the public op.

    One ``F.embedding_bag`` over the flattened (K·2^τ, d_out) tables with bags of the K row ids ``k·2^τ + code_k``
    and weights s. Autograd gives a dense table gradient whose untouched rows are zero. Half-precision tables are
    read through a float32 copy so that the K-term sum accumulates in float32.
    """
    K, rows, d_out = tables.shape
    dtype = compute_dtype(x, tables)
    lead = x.shape[:-1]
    code, s = hash_codes(x.reshape(-1, x.shape[-1]), tau, score, dtype, temperature)  # (N, K) each
    row_ids = code + torch.arange(K, device=x.device) * rows  # (N, K) rows of the flattened tables
    weight = tables.reshape(K * rows, d_out).to(dtype)  # (K·2^τ, d_out); no copy when already in dtype
    y = F.embedding_bag(row_ids, weight, per_sample_weights=s, mode="sum")  # (N, d_out)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(tables.dtype).reshape(*lead, d_out)


def _embedding_bag_flops(weight_shape, indices_shape, *args, out_shape=None, **kwargs) -> int:
    """One multiply-add per looked-up row element: 2 · (indices) · d_out."""
    count = 1
    for size in indices_shape:
        count *= size
    return 2 * count * weight_shape[-1]


# ``torch.utils.flop_counter.FlopCounterMode(custom_mapping=EMBEDDING_BAG_FLOPS)`` counts the torch path's lookups
# (the stock counter knows only matmuls and convolutions, so it would report 0 for a Memory Layer).
EMBEDDING_BAG_FLOPS = {
    torch.ops.aten._embedding_bag: _embedding_bag_flops,
    torch.ops.aten._embedding_bag_forward_only: _embedding_bag_flops,
}


# ----------------------------------------------------------------------------------------------------------------------
# 3. Triton path: the kernels and their registered ops live in hash_lookup_triton.py (imported only when used).
# ----------------------------------------------------------------------------------------------------------------------

def _hash_lookup_triton(x, tables, tau, bias, score, temperature):
    from zoo.kernels.hash_lookup_triton import hash_lookup_triton

    return hash_lookup_triton(x, tables, tau, bias, score=score, temperature=temperature)


# ----------------------------------------------------------------------------------------------------------------------
# 4. The public op.
# ----------------------------------------------------------------------------------------------------------------------

def _validate(x, tables, tau, bias, score, temperature, backend) -> str:
    """One-line errors for inputs that disagree; returns the concrete backend."""
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"{OP}: tau must be an int, got {type(tau).__name__}")
    if not 1 <= tau <= MAX_TAU:
        raise ValueError(f"{OP}: tau must be in [1, {MAX_TAU}], got {tau}")
    if score not in SCORES:
        raise ValueError(f"{OP}: score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"{OP}: temperature must be a finite number > 0, got {temperature!r}; 1 is the paper's "
                         f"plain softmax over the 2**tau buckets")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{OP}: x must be a tensor of shape (..., K*tau), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(tables, torch.Tensor) or tables.dim() != 3:
        raise ValueError(f"{OP}: tables must have shape (K, 2**tau, d_out), got "
                         f"{tuple(tables.shape) if isinstance(tables, torch.Tensor) else type(tables).__name__}")
    check_floating(OP, "x", x)
    check_floating(OP, "tables", tables)
    K, rows, d_out = tables.shape
    if K == 0 or d_out == 0:
        raise ValueError(f"{OP}: tables must have K >= 1 tables of width d_out >= 1, got {tuple(tables.shape)}")
    if rows != 2 ** tau:
        raise ValueError(f"{OP}: tables.shape[1] must be 2**tau = {2 ** tau} for tau={tau}, got {rows}")
    if x.shape[-1] != K * tau:
        raise ValueError(f"{OP}: x.shape[-1] must be K*tau = {K}*{tau} = {K * tau} (K = tables.shape[0]), "
                         f"got {x.shape[-1]}")
    if tables.device != x.device:
        raise ValueError(f"{OP}: tables are on {tables.device} but x is on {x.device}")
    if bias is not None:
        check_shape(OP, "bias", bias, (d_out,), " (d_out = tables.shape[2])")
        check_floating(OP, "bias", bias)
        if bias.device != x.device:
            raise ValueError(f"{OP}: bias is on {bias.device} but x is on {x.device}")
    return resolve_backend(backend, x, OP)


def hash_lookup(x: torch.Tensor, tables: torch.Tensor, tau: int = 8, bias: torch.Tensor | None = None, *,
                score: str = "l1prob", temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """MemoryFormer's Memory Layer (Ding et al., NeurIPS 2024, arXiv 2411.12992): a linear map by hashing.

    x is cut into K = x.shape[-1] / τ contiguous chunks z_k; the signs of chunk k form a τ-bit index
    ``code_k = Σ_i [z_{k,i} >= 0] 2^{τ−1−i}`` (MSB first; 0 and −0.0 give bit 1) into table k, and

        ``y = Σ_k s_k · tables[k, code_k, :] + bias``,  with  p_k = Π_i σ(2|z_{k,i}|/t),

    s_k = p_k for ``score="prob"`` (the paper) or s_k = ‖z_k‖₁ · p_k for ``score="l1prob"`` (the released code);
    p_k is the softmax mass exp(⟨sign z_k, z_k⟩/t) / Σ_h exp(⟨h, z_k⟩/t) of the chosen bucket at temperature t.
    Gradients reach x only through s (the code is piecewise constant; sgn(0) = 0 at exact zeros) and reach the
    tables only on the rows that were hit (a scatter-add of s · ∂L/∂y).

    Args:
        x: (..., K·τ), any float dtype. Codes and scores are computed in float32 (float64 if x or the tables are).
        tables: (K, 2^τ, d_out). bias: (d_out,) or None.
        tau: bits per chunk, 1 ≤ τ ≤ 16.
        score: "prob" or "l1prob". temperature: t > 0 (1 = the plain softmax).
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "reference" (dense one-hot loop, the oracle),
            "torch" (``F.embedding_bag``, autograd) or "triton" (kernels with a hand-written backward; the table
            gradient uses float atomics, so it is reproducible to fp32 rounding only, unless
            ``torch.use_deterministic_algorithms(True)`` is on, which switches to a sorted segment-sum that is
            bitwise reproducible).

    Returns:
        y: (..., d_out) in ``tables.dtype``; the K-term sum accumulates in float32 (float64).

    Example:
        >>> import torch
        >>> from zoo.kernels import hash_lookup
        >>> K, tau, d_out = 4, 8, 32
        >>> x = torch.randn(2, 10, K * tau)
        >>> tables = torch.randn(K, 2 ** tau, d_out, requires_grad=True)
        >>> y = hash_lookup(x, tables, tau)
        >>> y.shape
        torch.Size([2, 10, 32])
        >>> y.sum().backward()
        >>> int((tables.grad.abs().sum(-1) > 0).sum()) <= 2 * 10 * K      # only the rows that were hit
        True
    """
    backend = _validate(x, tables, tau, bias, score, temperature, backend)
    temperature = float(temperature)
    if backend == "reference":
        return hash_lookup_reference(x, tables, tau, bias, score=score, temperature=temperature)
    if backend == "torch":
        return hash_lookup_torch(x, tables, tau, bias, score=score, temperature=temperature)
    return _hash_lookup_triton(x, tables, tau, bias, score, temperature)

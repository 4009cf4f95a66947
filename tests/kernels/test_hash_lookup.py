"""The op ``hash_lookup`` (MemoryFormer's Memory Layer) against a dense one-hot oracle (docs/memoryformer.md#tests)."""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.kernels.kit import (TRITON_DEVICE, TRITON_RUNNABLE, needs_cuda, needs_triton, outputs_and_grads,
                               rel_errors, run_without_triton)
from tests.kernels.kit import hash_lookup_inputs as make_inputs
from zoo.kernels._common import rel_rms_error
from zoo.kernels.hash_lookup import hash_codes, hash_lookup

ALL_BACKENDS = ["reference", "torch", pytest.param("triton", marks=needs_triton)]
RESULT_NAMES = ("y", "dx", "dtables", "dbias")


def dense_onehot(x, tables, tau, bias, score):
    """The explicit dense form, written independently of the op: bits by a loop, p as a product of sigmoids."""
    K, rows, _ = tables.shape
    y = bias.expand(x.shape[0], -1)
    for k in range(K):
        z = x[:, k * tau:(k + 1) * tau]  # (N, τ)
        code = sum((z[:, i] >= 0).long() << (tau - 1 - i) for i in range(tau))  # (N,)
        p = torch.sigmoid(2 * z.abs()).prod(-1)  # (N,)
        s = p * z.abs().sum(-1) if score == "l1prob" else p
        y = y + (torch.nn.functional.one_hot(code, rows).to(x.dtype) * s[:, None]) @ tables[k]
    return y


def outputs_and_gradients(fn, inputs):
    """[y, the gradients of x, tables and bias] through a random linear functional of y."""
    results = outputs_and_grads(lambda **kw: fn(*kw.values()), dict(zip(("x", "tables", "bias"), inputs)))
    return [*results.outputs, *results.grads.values()]


# ------------------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("score", ["prob", "l1prob"])
def test_lookup_equals_dense_onehot_reference_float64(score):
    inputs = make_inputs()
    tau = 4
    expected = outputs_and_gradients(lambda x, t, b: dense_onehot(x, t, tau, b, score), inputs)
    for backend in ("reference", "torch"):
        results = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, tau, b, score=score, backend=backend),
                                        inputs)
        errors = rel_errors(results, expected, RESULT_NAMES)
        assert max(errors.values()) < 1e-12, (backend, errors)


@pytest.mark.parametrize("score", ["prob", "l1prob"])
def test_lookup_float32_matches_float64_reference(score):
    expected = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, 4, b, score=score, backend="reference"),
                                     make_inputs())
    results = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, 4, b, score=score, backend="torch"),
                                    make_inputs(dtype=torch.float32))
    assert results[0].dtype == torch.float32
    errors = rel_errors(results, expected, RESULT_NAMES)
    assert errors["y"] < 2e-3 and max(errors.values()) < 1e-2, errors


def test_leading_dims_are_flattened_and_restored():
    x, tables, bias = (t.detach() for t in make_inputs(N=12))
    y = hash_lookup(x.reshape(2, 3, 2, -1), tables, 4, bias, backend="torch")
    assert y.shape == (2, 3, 2, 40)
    assert torch.equal(y.reshape(12, 40), hash_lookup(x, tables, 4, bias, backend="torch"))


# ------------------------------------------------------------------------------------------------------ Triton
@needs_triton
@pytest.mark.parametrize("score, dtype", [("prob", torch.float32), ("l1prob", torch.float32),
                                          ("prob", torch.float16), ("l1prob", torch.bfloat16)])
def test_triton_matches_reference(score, dtype):
    """N = 37 (not a multiple of the 16-token block), K = 3 (odd), d_out = 40 (not a multiple of 16)."""
    tau = 4
    inputs64 = make_inputs()
    expected = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, tau, b, score=score, backend="reference"),
                                     [t.detach().to(dtype).double().requires_grad_() for t in inputs64])
    inputs = [t.detach().to(device=TRITON_DEVICE, dtype=dtype).requires_grad_() for t in inputs64]
    results = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, tau, b, score=score, backend="triton"), inputs)
    assert results[0].dtype == dtype and results[2].dtype == dtype
    for name, got, want in zip(RESULT_NAMES, results, expected):
        got = got.detach().cpu().double()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert rel_rms_error(got, want) < 1e-2, (name, rel_rms_error(got, want))


@needs_triton
def test_triton_deterministic_table_gradient_is_bitwise_reproducible():
    x, tables, bias = (t.detach().to(device=TRITON_DEVICE, dtype=torch.float32) for t in make_inputs(N=40, K=2))
    x = x.clone()
    x[::3] = x[0]  # repeated tokens: many (token, chunk) pairs share a table row
    grad_y = torch.randn(40, 40, dtype=torch.float32, device=TRITON_DEVICE)
    expected = torch.autograd.grad((hash_lookup(x, tables.requires_grad_(), 4, backend="torch") * grad_y).sum(),
                                   tables)[0]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [torch.autograd.grad((hash_lookup(x, tables, 4, backend="triton") * grad_y).sum(), tables)[0]
                 for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[0], expected, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_triton_on_cuda_matches_reference_at_larger_sizes():
    inputs64 = make_inputs(N=1000, K=16, tau=8, d_out=200)
    expected = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, 8, b, backend="reference"), inputs64)
    inputs = [t.detach().cuda().float().requires_grad_() for t in inputs64]
    results = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, 8, b, backend="triton"), inputs)
    errors = rel_errors([r.cpu() for r in results], expected, RESULT_NAMES)
    assert max(errors.values()) < 1e-5, errors


# ------------------------------------------------------------------------------------------------------ hash
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bucket_bit_order_is_msb_first(backend):
    """Codes read through a lookup into identity tables (row c of every table is e_c): y = Σ_k s_k e_{code_k}."""
    tau = 4
    chunks = torch.tensor([[1.0, -1.0, -2.0, 1.0],  # (+,−,−,+) → 0b1001 = 9
                           [0.0, -1.0, -2.0, -3.0],  # 0 gives bit 1 → 8
                           [-0.0, -1.0, -2.0, -3.0],  # −0.0 gives bit 1 → 8
                           [float("nan"), 1.0, 1.0, 1.0]])  # NaN gives bit 0 → 7
    expected = [9, 8, 8, 7]
    code, _ = hash_codes(chunks, tau)
    assert code[:, 0].tolist() == expected
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    tables = torch.eye(2 ** tau).unsqueeze(0).to(device)  # (1, 16, 16)
    y = hash_lookup(chunks[:3].to(device), tables, tau, backend=backend)  # (3, 16)
    assert y.argmax(-1).tolist() == expected[:3]
    assert int((y != 0).sum()) == 3


@pytest.mark.parametrize("tau", [3, 8])
def test_flipping_element_i_changes_code_by_power_of_two(tau):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2 * tau, generator=generator)
    code, _ = hash_codes(x, tau)
    for i in range(tau):
        flipped = x.clone()
        flipped[:, i] = -flipped[:, i]  # element i of chunk 0
        new_code, _ = hash_codes(flipped, tau)
        assert torch.equal((new_code[:, 0] - code[:, 0]).abs(), torch.full((20,), 2 ** (tau - 1 - i)))
        assert torch.equal(new_code[:, 1], code[:, 1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("score, weight", [("prob", 2.0 ** -4), ("l1prob", 0.0)])
def test_zero_input_hits_last_bucket_with_minimal_weight(backend, score, weight):
    tau, K = 4, 3
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    code, s = hash_codes(torch.zeros(2, K * tau), tau, score)
    assert code.eq(2 ** tau - 1).all() and torch.allclose(s, torch.full_like(s, weight))
    tables = torch.eye(2 ** tau).expand(K, -1, -1).contiguous().to(device)
    y = hash_lookup(torch.zeros(2, K * tau, device=device), tables, tau, score=score, backend=backend).cpu()
    assert torch.allclose(y[:, -1], torch.full((2,), K * weight)) and not y[:, :-1].any()


def test_closed_form_equals_softmax_over_sign_vectors():
    """p_k = Π σ(2|z|) is the softmax mass at h = sign(z) of logits ⟨h, z⟩ over all 2^τ sign vectors (τ = 6)."""
    tau = 6
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2 * tau, generator=generator, dtype=torch.float64)
    code, p = hash_codes(x, tau, "prob")
    bits = torch.tensor(list(itertools.product([0, 1], repeat=tau)), dtype=torch.float64)  # (64, τ), row c = code c
    signs = 2 * bits - 1  # (64, τ) h ∈ {−1, +1}^τ, MSB first
    z = x.reshape(50, 2, tau)
    softmax = torch.softmax(torch.einsum("nkt,ct->nkc", z, signs), dim=-1)  # (50, 2, 64)
    assert torch.equal(softmax.argmax(-1), code)
    torch.testing.assert_close(softmax.gather(-1, code[..., None]).squeeze(-1), p, atol=1e-14, rtol=1e-12)


def softmax_score_at_temperature(x, tau, score, temperature):
    """s (N, K) from the paper's definition: p = exp(⟨sign z, z⟩/t) / Σ_h exp(⟨h, z⟩/t) over all 2^τ sign vectors h."""
    signs = 2.0 * torch.tensor(list(itertools.product([0, 1], repeat=tau)), dtype=x.dtype) - 1  # (2^τ, τ)
    z = x.unflatten(-1, (-1, tau))                                                            # (N, K, τ)
    logits = torch.einsum("nkt,ct->nkc", z, signs) / temperature                              # (N, K, 2^τ)
    p = torch.exp(z.abs().sum(-1) / temperature - torch.logsumexp(logits, dim=-1))            # ⟨sign z, z⟩ = ‖z‖₁
    return p * z.abs().sum(-1) if score == "l1prob" else p


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("score", ["prob", "l1prob"])
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_score_at_temperature_equals_the_papers_softmax(backend, score, temperature):
    """y and all gradients at temperature t equal Σ_k s_k(t) · tables[k, code_k] + bias with s from the definition."""
    tau = 4
    inputs = make_inputs()

    def formula(x, tables, bias):
        code, _ = hash_codes(x.detach(), tau)
        s = softmax_score_at_temperature(x, tau, score, temperature)                          # (N, K)
        rows = tables[torch.arange(tables.shape[0]), code]                                    # (N, K, d_out)
        return (s[..., None] * rows).sum(1) + bias

    expected = outputs_and_gradients(formula, inputs)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    moved = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    results = outputs_and_gradients(lambda x, t, b: hash_lookup(x, t, tau, b, score=score, temperature=temperature,
                                                                backend=backend), moved)
    errors = rel_errors([r.detach().cpu().double() for r in results], expected, RESULT_NAMES)
    assert max(errors.values()) < (1e-5 if dtype == torch.float32 else 1e-12), errors
    x, tables, bias = inputs
    at_one = hash_lookup(x, tables, tau, bias, score=score, backend="reference")
    assert not torch.allclose(results[0].detach().cpu().double(), at_one, atol=1e-3)       # t changes the output


def test_temperature_one_is_the_old_score_and_bad_temperatures_are_refused():
    x, tables, bias = make_inputs()
    assert torch.equal(hash_lookup(x, tables, 4, bias, temperature=1.0), hash_lookup(x, tables, 4, bias))
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="hash_lookup: temperature must be a finite number > 0"):
            hash_lookup(x, tables, 4, bias, temperature=bad)


# ------------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_table_gradient_is_a_sparse_scatter_add(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    N, K, tau = 10, 2, 4
    x, tables, _ = (t.detach().to(device=device, dtype=dtype) for t in make_inputs(N=N, K=K, tau=tau))
    tables.requires_grad_()
    grad_y = torch.randn(N, 40, dtype=torch.float64).to(device=device, dtype=dtype)
    (hash_lookup(x, tables, tau, backend=backend) * grad_y).sum().backward()
    code, s = hash_codes(x.cpu().double(), tau)
    rows = (code + torch.arange(K) * 2 ** tau).reshape(-1)  # (N·K,)
    expected = torch.zeros(K * 2 ** tau, 40, dtype=torch.float64)
    expected.index_add_(0, rows, (s[:, :, None] * grad_y.cpu().double()[:, None, :]).reshape(-1, 40))
    grad = tables.grad.cpu().double().reshape(K * 2 ** tau, 40)
    nonzero_rows = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert nonzero_rows == set(rows.tolist()) and len(nonzero_rows) <= N * K
    torch.testing.assert_close(grad, expected, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("score", ["prob", "l1prob"])
def test_gradcheck_float64(backend, score):
    x, tables, bias = make_inputs(N=5, K=2, tau=3, d_out=4)
    assert torch.autograd.gradcheck(lambda *a: hash_lookup(*a[:2], 3, a[2], score=score, backend=backend),
                                    (x, tables, bias))


@pytest.mark.parametrize("score", ["prob", "l1prob"])
def test_input_gradient_at_exact_zeros_uses_sgn_zero_in_every_backend(score):
    x, tables, bias = (t.detach().float() for t in make_inputs(N=8, K=2))
    x[:, ::3] = 0.0  # exact zeros in every chunk
    grads = {}
    backends = ["reference", "torch"] + (["triton"] if TRITON_RUNNABLE else [])
    for backend in backends:
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        leaf = x.to(device).requires_grad_()
        hash_lookup(leaf, tables.to(device), 4, bias.to(device), score=score, backend=backend).sum().backward()
        grads[backend] = leaf.grad.cpu()
    for backend, grad in grads.items():
        if score == "prob":
            assert not grad[:, ::3].any(), backend  # ∂p/∂z_i = 2 p sgn(z_i) σ(−2|z_i|) = 0 at z_i = 0
        torch.testing.assert_close(grad, grads["reference"], atol=1e-5, rtol=1e-5, msg=backend)
    if score == "l1prob":  # ∂(‖z‖₁ p)/∂z_i = sgn(z_i) p (1 + 2‖z‖₁ σ(−2|z_i|)) = 0 at z_i = 0 as well
        assert not grads["reference"][:, ::3].any()


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("arguments, error, message", [
    (dict(tau=0), ValueError, r"tau must be in \[1, 16\]"),
    (dict(tau=17), ValueError, r"tau must be in \[1, 16\]"),
    (dict(tau=3), ValueError, r"tables.shape\[1\] must be 2\*\*tau = 8"),
    (dict(x=torch.randn(5, 11)), ValueError, r"x.shape\[-1\] must be K\*tau = 3\*4 = 12"),
    (dict(bias=torch.randn(7)), ValueError, r"bias has shape \(7,\), expected \(40\)"),
    (dict(tables=torch.randn(3, 16)), ValueError, r"tables must have shape \(K, 2\*\*tau, d_out\)"),
    (dict(x=torch.ones(5, 12, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    (dict(score="softmax"), ValueError, "score must be one of 'prob', 'l1prob'"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_invalid_inputs_raise_clear_errors(arguments, error, message):
    x, tables, bias = (t.detach() for t in make_inputs(N=5, dtype=torch.float32))
    call = dict(x=x, tables=tables, tau=4, bias=bias, score="prob", backend="auto")
    call.update(arguments)
    with pytest.raises(error, match=message):
        hash_lookup(call.pop("x"), call.pop("tables"), call.pop("tau"), call.pop("bias"), **call)


@pytest.mark.skipif(TRITON_RUNNABLE, reason="the Triton backend is runnable here")
def test_triton_backend_unavailable_says_so():
    x, tables, _ = (t.detach() for t in make_inputs(N=3))
    with pytest.raises(RuntimeError, match="triton"):
        hash_lookup(x, tables, 4, backend="triton")


def test_torch_path_and_layers_work_without_triton():
    run_without_triton("import torch\n"
                       "from zoo.kernels.hash_lookup import hash_lookup\n"
                       "from zoo.layers.memoryformer import MemoryAttention\n"
                       "y = hash_lookup(torch.randn(3, 8), torch.randn(2, 16, 5), 4)\n"
                       "out, state = MemoryAttention(16, 2, 4)(torch.randn(1, 3, 16))\n"
                       "assert y.shape == (3, 5) and out.shape == (1, 3, 16)\n")

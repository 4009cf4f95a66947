"""Backend dispatch: ``auto`` picks Triton only where the kernels are known to work and says why once when CUDA
inputs fall back; ``ZOO_BACKEND`` overrides ``auto``; an invalid value is one clear error."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.kernels.kit import Draw, titans_mlp_inputs
from zoo.kernels import _common
from zoo.kernels._common import auto_fallback_reason, resolve_backend
from zoo.kernels.titans_mlp_memory import titans_mlp_memory


def cuda_like(dtype=torch.float32):
    """Stands in for a CUDA tensor: what resolve_backend reads of its reference tensor."""
    return SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0), dtype=dtype)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_warned", set())
    monkeypatch.delenv("ZOO_BACKEND", raising=False)


@pytest.mark.parametrize("capability, dtype, has_triton, expected", [
    ((9, 0), torch.bfloat16, True, None),
    ((8, 0), torch.float16, True, None),
    ((8, 6), torch.float32, True, None),
    ((7, 5), torch.float32, True, "compute capability 7.5"),
    ((6, 0), torch.bfloat16, True, "compute capability 6.0"),
    ((9, 0), torch.float64, True, "torch.float64"),
    ((9, 0), torch.float32, False, "triton is not installed"),
])
def test_auto_fallback_reason_on_cuda(capability, dtype, has_triton, expected):
    reason = auto_fallback_reason(True, capability, dtype, has_triton)
    assert (reason is None) if expected is None else (expected in reason), reason


def test_cpu_inputs_need_no_reason():
    assert auto_fallback_reason(False, None, torch.float64, False) is None


def test_auto_on_an_old_gpu_falls_back_with_one_warning(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_common, "cuda_capability", lambda index: (7, 0))
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    with pytest.warns(UserWarning, match=r"gated_delta_rule: backend='auto' runs the torch path because .*7\.0") as w:
        assert resolve_backend("auto", cuda_like(), "gated_delta_rule") == "torch"
    assert len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", cuda_like(), "gated_delta_rule") == "torch"  # the second time: silent


def test_auto_on_ampere_picks_triton_without_warning(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_common, "cuda_capability", lambda index: (8, 0))
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", cuda_like(torch.bfloat16), "selective_scan") == "triton"
        assert resolve_backend("auto", cuda_like(torch.bfloat16), "ssd", auto_triton=False) == "torch"


def test_zoo_backend_torch_overrides_auto_on_cuda(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_common, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    assert resolve_backend("auto", cuda_like(), "hash_lookup") == "torch"
    assert resolve_backend("triton", cuda_like(), "hash_lookup") == "triton"  # an explicit backend wins


def test_zoo_backend_triton_overrides_auto(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu, "gated_delta_rule") == "triton"
    assert resolve_backend("auto", cpu, "ssd", auto_triton=False) == "triton"
    assert resolve_backend("torch", cpu, "ssd") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # forced Triton keeps the forced checks
        resolve_backend("auto", cpu, "gated_delta_rule")


def test_invalid_zoo_backend_is_one_clear_error(fresh_warnings, monkeypatch):
    monkeypatch.setenv("ZOO_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"ssd: ZOO_BACKEND must be 'auto', 'torch' or 'triton', got 'cuda'"):
        resolve_backend("auto", torch.zeros(1), "ssd")


def test_zoo_backend_triton_runs_the_torch_path_of_an_op_without_kernels(fresh_warnings, monkeypatch):
    inputs, weights = titans_mlp_inputs(B=1, T=6, H=1, d=4, E=8, dtype=torch.float32)
    expected, _ = titans_mlp_memory(*inputs, weights, chunk_size=4, backend="torch")
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    with pytest.warns(UserWarning, match="titans_mlp_memory: ZOO_BACKEND=triton, but the op has no Triton path"):
        got, _ = titans_mlp_memory(*inputs, weights, chunk_size=4)
    torch.testing.assert_close(got, expected)


def test_default_auto_on_cpu_is_the_torch_path(fresh_warnings):
    x = Draw(0, torch.float32).randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", x, "selective_scan") == "torch"

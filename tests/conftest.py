"""Test setup: offline Hugging Face libraries, a private datasets cache, the Triton interpreter on CPU-only machines.

The environment variables are set before any test module imports zoo, datasets or triton (they read them at import).
"""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="zoo-hf-cache-")
    os.environ["HF_DATASETS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FIXTURES_DIR = Path(__file__).parent / "fixtures"
KJV_FIXTURE = FIXTURES_DIR / "kjv_fixture.jsonl"


@pytest.fixture
def kjv_fixture() -> Path:
    return KJV_FIXTURE


@pytest.fixture
def nan_poisoned_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors for the duration of a test, so a kernel that
    reads or returns memory it never wrote shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))

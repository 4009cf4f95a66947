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

DATA_DIR = Path(__file__).parent / "data"
KJV_FIXTURE = DATA_DIR / "kjv_fixture.jsonl"


@pytest.fixture
def kjv_fixture() -> Path:
    return KJV_FIXTURE

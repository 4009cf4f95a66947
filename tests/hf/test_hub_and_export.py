"""Hub ids through the local Hugging Face cache (offline), and zoo export format=hf (docs/interop.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import zoo
from tests.helpers import rel_err, run_zoo
from zoo.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _fill_cache(cache, repo_id: str, source) -> None:
    """A hub cache entry as ``hf download`` leaves it: blobs-free snapshot files, refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_a_prefilled_cache_only(exported, tmp_path):
    model, out = exported("mamba2")
    cache = tmp_path / "hub"
    _fill_cache(cache, "someone/tiny-zoo", out)
    code = ("import torch, zoo; ids = torch.arange(10)[None]; "
            "print(float(zoo.load('someone/tiny-zoo')(ids)[0].double().sum()))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        expected = float(model(torch.arange(10)[None])[0].double().sum())
    assert abs(float(run.stdout) - expected) <= 1e-6 * abs(expected)


def test_a_missing_hub_id_says_zoo_runs_offline():
    with pytest.raises(CheckpointError) as error:
        zoo.load("nobody-h16/not-cached")
    message = str(error.value)
    assert "\n" not in message and "offline" in message and "hf download nobody-h16/not-cached" in message


def test_an_hf_directory_of_another_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="model_type 'bert'.*is not supported") as error:
        zoo.load(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["mamba", "mamba2_tied", "mamba2_untied"])
def test_export_format_hf_round_trips_with_transformers(name, tmp_path):
    from zoo.config import parse_args
    from zoo.checkpoint import export_model
    from zoo.models import build_model

    pattern = name.split("_")[0]
    config = parse_args(["model.dim=32", "model.depth=2", "model.vocab_size=60", f"model.pattern=[{pattern}]",
                         "model.mlp=none", "model.mamba2.headdim=16", "model.mamba2.ngroups=2",
                         "model.mamba2.d_state=16", "model.mamba2.chunk_size=16",
                         f"model.tie_embeddings={str(name != 'mamba2_untied').lower()}"]).config
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith((".D", "norm.weight", "dt_bias", "dt_proj.bias")):
                param.add_(0.1 * torch.randn_like(param))
    export_model(model, config, tmp_path / "zoo")
    assert run_zoo("export", f"checkpoint={tmp_path / 'zoo'}", f"out={tmp_path / 'hf'}", "format=hf") == 0
    # transformers' own class, named by the directory: importing fla (the fla import tests) re-registers model_type
    # mamba with AutoModelForCausalLM to fla's GPU-only class
    architecture = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert architecture == ("MambaForCausalLM" if pattern == "mamba" else "Mamba2ForCausalLM")
    hf = getattr(transformers, architecture).from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 60, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)[0]) < 1e-4
        assert rel_err(zoo.load(tmp_path / "hf")(ids)[0], model(ids)[0]) < 1e-5   # and back through hf_import


def test_export_format_hf_refuses_other_patterns_in_one_line(capsys, tmp_path):
    assert run_zoo("export", "checkpoint=checkpoints/titans-kjv", f"out={tmp_path / 'hf'}", "format=hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "format=hf holds only pure Mamba" in err and "format=zoo" in err
    assert not (tmp_path / "hf").exists()

"""hustvl Vim ``.pth`` checkpoints (``model`` + a pickled argparse ``Namespace``) load into ``VisionClassifier``
through an allowlist: nothing but tensors, containers and ``argparse.Namespace`` is unpickled."""
from __future__ import annotations

import argparse

import pytest
import torch

import zoo
from zoo.config import from_dict
from zoo.errors import CheckpointError
from zoo.models import build_model

NAME = "vim_tiny_patch{p}_stride{s}_{i}_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


def vim_layout(state: dict) -> dict:
    """A zoo VisionClassifier state dict renamed to Vim's ``models_mamba.VisionMamba`` keys."""
    out = {}
    for key, value in state.items():
        key = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias",
               "class_token": "cls_token", "position": "pos_embed", "norm.weight": "norm_f.weight"}.get(key, key)
        out[key.replace("blocks.", "layers.").replace(".mixer_norm.", ".norm.")] = value
    return out


def write_vim(tmp_path, image=16, patch=4, stride=2, name=None, **args):
    vision = {"image_size": image, "channels": 3, "patch_size": patch, "num_classes": 7,
              "patch_stride": None if stride == patch else stride}
    config = from_dict({"model": {"architecture": "vision", "dim": 32, "depth": 2, "pattern": ["bimamba"],
                                  "mlp": "none", "vision": vision}})
    torch.manual_seed(0)
    model = build_model(config).eval()
    args = argparse.Namespace(model=name or NAME.format(p=patch, s=stride, i=image), input_size=image, lr=5e-4,
                              nb_classes=7, **args)
    path = tmp_path / "vim.pth"
    torch.save({"model": vim_layout(model.state_dict()), "args": args, "epoch": 3,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, path)
    return model, path


@pytest.mark.parametrize("patch, stride", [(4, 4), (4, 2)], ids=["stride=patch", "stride8-style"])
def test_vim_checkpoint_loads_with_equal_logits(tmp_path, patch, stride):
    model, path = write_vim(tmp_path, patch=patch, stride=stride)
    loaded = zoo.load(path)
    side = (16 - patch) // stride + 1
    assert loaded.num_patches == side * side and loaded.config.vision.patch_size == patch
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[0], model(images)[0], rtol=0, atol=0)


def test_model_zoo_cannot_express_is_one_line_naming_it(tmp_path):
    _, path = write_vim(tmp_path, name="vim_tiny_patch4_16_bimambav2_final_pool_mean_abs_pos_embed_div2")
    with pytest.raises(CheckpointError) as error:
        zoo.load(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "midclstok" in message and "args.model=" in message


class Planted:
    """Unpickling this runs ``open(marker, 'w')``: what an unrestricted unpickle would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_other_pickled_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    _, path = write_vim(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["args"].hook = Planted(marker)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="does not unpickle"):
        zoo.load(path)
    assert not marker.exists()

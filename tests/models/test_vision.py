"""VisionClassifier and the digits data: shapes, class-token position, init, a training step, config wiring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.config import ConfigError, MambaConfig, ModelConfig, parse_args
from zoo.models import build_model
from zoo.models.vision import VisionClassifier
from tests.layers.contract import check_meta_init_equals_init


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(architecture="vision", dim=16, depth=2, pattern=["bimamba"], mlp="none")
    cfg.mamba = MambaConfig(d_state=4)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_classifier_shapes_and_class_position():
    torch.manual_seed(0)
    model = VisionClassifier(tiny_config())
    assert model.num_patches == 16 and model.class_position == 8
    logits, state = model(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10) and state is None
    tokens = model.tokens(torch.rand(5, 1, 8, 8))
    assert tokens.shape == (5, 17, 16)
    assert torch.allclose(tokens[:, 8], (model.class_token[0] + model.position[:, 8]).expand(5, -1))


def test_bidirectional_class_token_sees_every_patch():
    torch.manual_seed(0)
    model = VisionClassifier(tiny_config()).double()
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    base, _ = model(images)
    for corner in ((0, 0), (7, 7)):
        changed = images.clone()
        changed[:, :, corner[0], corner[1]] += 1.0
        assert not torch.allclose(model(changed)[0], base)


def test_causal_mixer_refused():
    with pytest.raises(ValueError, match="causal"):
        VisionClassifier(tiny_config(pattern=["mamba"]))


def test_meta_init_equals_normal_init():
    cfg = tiny_config()
    _, normal = check_meta_init_equals_init(lambda: VisionClassifier(cfg), seed=7)
    assert "class_token" in normal.no_weight_decay() and "blocks.0.mixer.A_b_log" in normal.no_weight_decay()


def test_training_step_reduces_loss():
    pytest.importorskip("sklearn")
    from zoo.data.images import digits_datasets

    train, _ = digits_datasets(0)
    images = torch.stack([train[i][0] for i in range(64)])
    labels = torch.stack([train[i][1] for i in range(64)])
    torch.manual_seed(0)
    model = VisionClassifier(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(images)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_digits_split():
    pytest.importorskip("sklearn")
    from zoo.data.images import digits_datasets

    train, test = digits_datasets(0)
    assert len(train) == 1438 and len(test) == 359
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= float(image.min())
    assert float(image.max()) <= 1.0 and label.dtype == torch.long
    again, _ = digits_datasets(0)
    assert torch.equal(again.images, train.images)
    other, _ = digits_datasets(1)
    assert not torch.equal(other.images, train.images)


def test_missing_sklearn_is_one_line(monkeypatch):
    import builtins

    from zoo.data.images import load_digits_tensors
    from zoo.errors import DataError

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(DataError, match=r"pip install 'memzoo\[vision\]'"):
        load_digits_tensors()


def test_vim_config_builds_vision_model_and_checks_data():
    cfg = parse_args(["config=vim.yaml"]).config
    assert isinstance(build_model(cfg), VisionClassifier)
    with pytest.raises(ConfigError, match="digits"):
        parse_args(["config=vim.yaml", "data.name=kjv"])


def test_evaluate_scores_a_classifier():
    pytest.importorskip("sklearn")
    from zoo.data.images import digits_bundle
    from zoo.eval.evaluate import evaluate

    cfg = parse_args(["config=vim.yaml", "model.dim=16", "model.depth=1"]).config
    data = digits_bundle(cfg.data)
    torch.manual_seed(0)
    result = evaluate(build_model(cfg), data, 128, max_batches=1, data_name="digits")
    assert result["scored_positions"] == 128 and 0.0 <= result["accuracy"] <= 1.0


def test_vim_init_patch_embedding_is_lecun_normal_and_out_proj_is_rescaled_by_depth():
    """Released Vim init: patch embedding std 1/sqrt(fan_in), zero bias; out_proj std / sqrt(depth) without MLP."""
    from zoo.layers.mamba import BiMamba

    torch.manual_seed(0)
    config = ModelConfig(architecture="vision", dim=64, depth=8, pattern=["bimamba"], mlp="none")
    config.vision.channels, config.vision.patch_size = 3, 4                            # fan_in = 3 · 4 · 4 = 48
    model = VisionClassifier(config)
    weight = model.patch_embed.weight
    assert abs(float(weight.std()) * 48 ** 0.5 - 1.0) < 0.05 and not model.patch_embed.bias.any()
    assert float(weight.abs().max()) <= 2 * 48 ** -0.5 / 0.87962566103423978 + 1e-6    # truncated at 2 sigma
    torch.manual_seed(1)
    plain = BiMamba(64).out_proj.weight.std()                                          # PyTorch's Linear init
    for block in model.blocks:
        assert abs(float(block.mixer.out_proj.weight.std() / plain) * 8 ** 0.5 - 1.0) < 0.05
    with_mlp = VisionClassifier(ModelConfig(architecture="vision", dim=64, depth=8, pattern=["bimamba"]))
    assert abs(float(with_mlp.blocks[0].mixer.out_proj.weight.std() / plain) * 16 ** 0.5 - 1.0) < 0.05

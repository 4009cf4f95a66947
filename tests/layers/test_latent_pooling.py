"""LatentAttentionPooling (docs/latent-pooling.md#tests): padding, mixing, gradients, norms, parity."""
from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from zoo.layers.latent_pooling import LatentAttentionPooling, convert_nvembed_state_dict, last_valid, masked_mean


def make_pool(dim=32, num_latents=8, heads=4, mlp_ratio=2, seed=0, **kwargs) -> LatentAttentionPooling:
    torch.manual_seed(seed)
    return LatentAttentionPooling(dim, num_latents, heads, mlp_ratio, **kwargs)


def lengths_mask(lengths, T) -> torch.Tensor:
    return torch.arange(T) < torch.tensor(lengths)[:, None]                         # (B, T) right padding


# ------------------------------------------------------------------------------------------------ 1. padding
def test_appended_padding_leaves_embedding_unchanged():
    pool = make_pool()
    h = torch.randn(3, 7, 32)
    mask = lengths_mask([7, 4, 1], 7)
    base = pool(h, mask)
    for scale in (1.0, 100.0):
        padded = torch.cat([h, scale * torch.randn(3, 5, 32)], dim=1)             # 5 more positions
        padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
        assert torch.allclose(pool(padded, padded_mask), base, rtol=0, atol=1e-6)


def test_masked_content_gives_bitwise_equal_embedding():
    pool = make_pool()
    h = torch.randn(3, 7, 32)
    mask = lengths_mask([7, 4, 1], 7)
    base = pool(h, mask)
    for fill in (torch.randn(3, 7, 32) * 100, torch.full((3, 7, 32), float("nan")),
                 torch.full((3, 7, 32), float("inf"))):
        changed = torch.where(mask[..., None], h, fill)
        assert torch.equal(pool(changed, mask), base)
    assert not torch.equal(pool(h * 1.5, mask), base)                              # real content does matter


def test_nonfinite_padding_gives_finite_gradients():
    pool = make_pool()
    mask = lengths_mask([7, 4, 1], 7)
    h = torch.where(mask[..., None], torch.randn(3, 7, 32), float("nan")).requires_grad_()
    pool(h, mask).sum().backward()                                                  # pads are zeroed before the head
    assert torch.isfinite(h.grad).all() and torch.equal(h.grad[~mask], torch.zeros(int((~mask).sum()), 32))
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


# ------------------------------------------------------------------------------------------------ 2. mask=None
def test_no_mask_equals_all_true_mask():
    pool = make_pool()
    h = torch.randn(2, 6, 32)
    assert torch.equal(pool(h), pool(h, torch.ones(2, 6, dtype=torch.bool)))
    assert torch.equal(pool(h), pool(h, torch.ones(2, 6, dtype=torch.long)))     # other dtypes are cast to bool


# ------------------------------------------------------------------------------------------------ 3. no mixing
def test_token_map_has_no_cross_token_jacobian():
    pool = make_pool(dim=8, num_latents=4, heads=2).double()
    h = torch.randn(1, 4, 8, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(pool.token_states, h)[0, :, :, 0]  # (T, D, T, D)
    for t in range(4):
        for s in range(4):
            block = jacobian[t, :, s]
            if s == t:
                assert block.abs().max() > 0.1
            else:
                assert torch.equal(block, torch.zeros_like(block)), (t, s)


def test_permuting_positions_leaves_embedding_unchanged():
    pool = make_pool()
    h = torch.randn(2, 9, 32)
    mask = lengths_mask([9, 5], 9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(pool(h[:, perm], mask[:, perm]), pool(h, mask), rtol=0, atol=1e-6)


def test_one_latent_gives_the_same_attention_output_for_every_token():
    h = torch.randn(2, 5, 32)
    single = make_pool(num_latents=1).latent_attention(h)                          # (2, 5, 32)
    assert torch.allclose(single, single[:, :1].expand_as(single), rtol=0, atol=1e-6)
    several = make_pool(num_latents=2).latent_attention(h)
    assert not torch.allclose(several, several[:, :1].expand_as(several), atol=1e-3)


# ------------------------------------------------------------------------------------------------ 4. gradients
def test_every_parameter_gets_a_finite_nonzero_gradient():
    pool = make_pool()
    h = torch.randn(3, 6, 32)
    pool(h, lengths_mask([6, 3, 2], 6)).sum().backward()
    for name, param in pool.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_empty_mask_row_gives_zeros_and_no_nan():
    pool = make_pool()
    h = torch.randn(3, 6, 32, requires_grad=True)
    mask = lengths_mask([6, 0, 2], 6)
    e = pool(h, mask)
    assert torch.equal(e[1], torch.zeros(32)) and torch.isfinite(e).all()
    (e * torch.randn_like(e)).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.equal(h.grad[1], torch.zeros(6, 32))
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


# ------------------------------------------------------------------------------------------------ 5. normalisation
def test_output_has_unit_norm():
    e = make_pool()(torch.randn(4, 6, 32) * 10, lengths_mask([6, 5, 2, 1], 6))
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-6)


def test_unnormalised_output_is_the_plain_masked_mean():
    pool = make_pool(normalize=False)
    h = torch.randn(2, 6, 32)
    mask = lengths_mask([6, 3], 6)
    h2 = pool.token_states(torch.where(mask[..., None], h, 0.0))                  # (B, T, D)
    expected = torch.stack([h2[0].mean(0), h2[1, :3].mean(0)])
    assert torch.allclose(pool(h, mask), expected, rtol=0, atol=1e-6)


def test_masked_helpers():
    x = torch.arange(8.0).view(1, 4, 2).repeat(2, 1, 1)
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    assert torch.equal(masked_mean(x, valid), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(last_valid(x, valid), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ 4. params
@pytest.mark.parametrize("dim, expected", [(128, 329_600), (256, 1_183_488)])
def test_parameter_count(dim, expected):
    pool = LatentAttentionPooling(dim, num_latents=512, heads=8, mlp_ratio=4)
    assert sum(p.numel() for p in pool.parameters()) == expected == 512 * dim + 16 * dim ** 2 + 15 * dim


def test_init_and_shapes():
    pool = make_pool(dim=32, num_latents=6, heads=2, mlp_ratio=3, head_dim=20, latent_dim=24)
    shapes = {name: tuple(p.shape) for name, p in pool.named_parameters()}
    assert shapes["latents"] == (6, 24) and shapes["to_q.weight"] == (40, 32) and shapes["to_kv.weight"] == (80, 24)
    assert shapes["to_out.weight"] == (32, 40) and shapes["ff_in.weight"] == (192, 32)
    assert shapes["ff_out.weight"] == (32, 96) and shapes["norm_kv.weight"] == (24,)
    assert "to_q.bias" not in shapes and "ff_in.bias" in shapes
    big = LatentAttentionPooling(64, num_latents=4096)
    assert abs(float(big.latents.detach().std()) - 1.0) < 0.02 and torch.equal(big.norm_q.weight, torch.ones(64))


def test_bad_inputs_raise():
    pool = make_pool()
    with pytest.raises(ValueError, match=r"h must be \(B, T, 32\)"):
        pool(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mask has shape"):
        pool(torch.randn(2, 5, 32), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by heads"):
        LatentAttentionPooling(30, heads=4)


# ------------------------------------------------------------------------------------------------ 6. NV-Embed parity
NV_NAMES = {"latents": "latents", "norm_q": "cross_attend_blocks.0.norm",
            "norm_kv": "cross_attend_blocks.0.norm_context", "to_q": "cross_attend_blocks.0.fn.to_q",
            "to_kv": "cross_attend_blocks.0.fn.to_kv", "to_out": "cross_attend_blocks.0.fn.to_out",
            "norm_ff": "cross_attend_blocks.1.norm", "ff_in": "cross_attend_blocks.1.fn.net.0",
            "ff_out": "cross_attend_blocks.1.fn.net.2"}


def to_nvembed_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        out[NV_NAMES[module] + (f".{suffix}" if suffix else "")] = value
    return out


def nvembed_reference(sd: dict, h, mask, heads: int, normalize: bool = True):
    """NV-Embed's LatentAttentionModel written from its equations with einsum, reading NV-Embed's key names."""
    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]

    attn, ff = "cross_attend_blocks.0", "cross_attend_blocks.1"
    x = layer_norm(h, f"{attn}.norm")
    context = layer_norm(sd["latents"], f"{attn}.norm_context")
    q = torch.einsum("btc,ec->bte", x, sd[f"{attn}.fn.to_q.weight"])
    kv = torch.einsum("rc,ec->re", context, sd[f"{attn}.fn.to_kv.weight"])
    inner = q.shape[-1]
    k, v = kv[:, :inner], kv[:, inner:]
    d = inner // heads
    q, k, v = q.view(*q.shape[:2], heads, d), k.view(-1, heads, d), v.view(-1, heads, d)
    weights = torch.softmax(torch.einsum("bthd,rhd->bhtr", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bhtr,rhd->bthd", weights, v).reshape(*h.shape[:2], inner)
    h1 = torch.einsum("bte,ce->btc", out, sd[f"{attn}.fn.to_out.weight"]) + h
    u = torch.einsum("btc,ec->bte", layer_norm(h1, f"{ff}.norm"), sd[f"{ff}.fn.net.0.weight"])
    u = u + sd[f"{ff}.fn.net.0.bias"]
    half = u.shape[-1] // 2
    geglu = u[..., :half] * 0.5 * u[..., half:] * (1 + torch.erf(u[..., half:] / math.sqrt(2)))
    h2 = torch.einsum("bte,ce->btc", geglu, sd[f"{ff}.fn.net.2.weight"]) + sd[f"{ff}.fn.net.2.bias"] + h1
    m = mask.to(h.dtype)[..., None]
    e = (h2 * m).sum(1) / m.sum(1)
    return e / e.norm(dim=-1, keepdim=True) if normalize else e


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_einsum_reference_through_converted_keys(normalize):
    source = make_pool(dim=32, num_latents=6, heads=2, mlp_ratio=3, head_dim=20, seed=1).double()
    nv_state = {k: v.clone() for k, v in to_nvembed_names(source.state_dict()).items()}
    pool = make_pool(dim=32, num_latents=6, heads=2, mlp_ratio=3, head_dim=20, seed=2,
                     normalize=normalize).double()
    pool.load_state_dict(convert_nvembed_state_dict(nv_state))
    h = torch.randn(3, 7, 32, dtype=torch.float64)
    mask = lengths_mask([7, 4, 1], 7)
    expected = nvembed_reference(nv_state, h, mask, heads=2, normalize=normalize)
    with torch.no_grad():
        assert float((pool(h, mask) - expected).abs().max()) < 1e-10


def test_convert_accepts_the_whole_model_prefix_and_refuses_foreign_keys():
    pool = make_pool()
    nv_state = {f"latent_attention_model.{k}": v for k, v in to_nvembed_names(pool.state_dict()).items()}
    nv_state["embedding_model.norm.weight"] = torch.ones(4)                        # the backbone: ignored
    converted = convert_nvembed_state_dict(nv_state)
    assert sorted(converted) == sorted(pool.state_dict())
    with pytest.raises(ValueError, match="cross_attend_blocks.2.fn.w"):
        convert_nvembed_state_dict({"cross_attend_blocks.2.fn.w": torch.ones(1)})


def nvembed_hf_class():
    """NV-Embed's LatentAttentionModel from the model repo's code in $ZOO_NVEMBED_CODE (a local snapshot)."""
    code = os.environ.get("ZOO_NVEMBED_CODE")
    if not code or not (Path(code) / "modeling_nvembed.py").is_file():
        pytest.skip("set ZOO_NVEMBED_CODE to a local NV-Embed snapshot holding modeling_nvembed.py")
    sys.path.insert(0, str(Path(code).parent))
    try:
        modeling = importlib.import_module(f"{Path(code).name}.modeling_nvembed")
        configuration = importlib.import_module(f"{Path(code).name}.configuration_nvembed")
    except Exception as error:  # its pinned transformers 4.42.4 is often absent (docs/latent-pooling.md#nv-embed-code)
        pytest.skip(f"NV-Embed's code does not import here: {type(error).__name__}: {str(error)[:80]}")
    finally:
        sys.path.pop(0)
    return modeling.LatentAttentionModel, configuration.LatentAttentionConfig


def test_matches_nvembed_hf_latent_attention_model():
    model_class, config_class = nvembed_hf_class()
    config = config_class(num_latents_value=8, num_cross_heads=2, output_normalize=True, hidden_dim=32,
                          latent_dim=32, cross_dim_head=16)
    torch.manual_seed(0)
    reference = model_class(config).eval()
    pool = LatentAttentionPooling(32, num_latents=8, heads=2, mlp_ratio=4, head_dim=16)
    pool.load_state_dict(convert_nvembed_state_dict(reference.state_dict()))
    h = torch.randn(2, 5, 32)
    mask = lengths_mask([5, 3], 5).long()
    with torch.no_grad():
        assert torch.allclose(pool(h, mask), reference(h, mask), rtol=0, atol=1e-5)

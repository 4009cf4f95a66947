"""The options that make the Titans hybrids learn (docs/titans.md#hybrid-choices): the store input of MAC, the scale of
its memory tokens, the output projection after the gate, the token-shift conv, the persistent tokens fed to the memory
of MAG and MAL, and the values that rebuild the original modules for configs saved before the options existed."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err
from zoo.config import from_dict
from zoo.layers.norm import RMSNorm
from zoo.layers.titans_hybrids import TitansMAC, TitansMAG, TitansMAL
from zoo.models.lm import build_mixer

F64 = torch.float64
DIM, HEADS = 32, 2
MEMORY = dict(chunk_size=8, memory_depth=1)
ORIGINAL_MAC = dict(store="attention", memory_token_norm=False, out_proj=False, conv_size=0)


def _seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory().double()


def _mac(**options):
    return _seeded(lambda: TitansMAC(DIM, HEADS, segment_len=16, persistent_tokens=3, memory=dict(MEMORY), **options))


def _x(T=40, B=2, seed=1):
    return torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean(-1).sqrt()


def _capture(module: torch.nn.Module, inputs: bool) -> list:
    """Record the first input (or the output) of every call of ``module``."""
    seen = []
    if inputs:
        module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    else:
        module.register_forward_hook(lambda _, args, out: seen.append(out))
    return seen


@pytest.mark.parametrize("store", ["residual", "attention_norm", "attention"])
def test_mac_store_input_is_the_chosen_stream(store):
    """The memory stores RMSNorm(x + y), RMSNorm(y) or y, with y the attention output of the same tokens."""
    layer, x = _mac(store=store, conv_size=0), _x(T=16)
    stored, attention = _capture(layer.lmm, inputs=True), _capture(layer.attn.w_o, inputs=False)
    with torch.no_grad():
        layer(x)
    y = attention[0]
    reference = {"residual": lambda: RMSNorm(DIM).double()(x + y), "attention_norm": lambda: RMSNorm(DIM).double()(y),
                 "attention": lambda: y}[store]()
    assert rel_err(stored[0], reference) < 1e-12
    if store == "residual":   # y is small at init, so RMSNorm(y) is below unit RMS there (its eps dominates)
        assert torch.allclose(_rms(stored[0]), torch.ones(2, 16, dtype=F64), atol=1e-4)


def test_mac_memory_tokens_join_at_the_scale_of_the_tokens():
    """With memory_token_norm, h reaches attention at unit RMS like the normalised block input (x here); without it,
    h is the memory's raw output, far smaller at init."""
    x = _x(T=16)
    rms = {}
    for normalised in (True, False):
        layer = _mac(memory_token_norm=normalised, conv_size=0)
        projected = []
        layer.attn.project = _recording(layer.attn.project, projected)
        with torch.no_grad():
            layer(x)
        h = projected[1]   # the second projection of a segment is the memory tokens'
        rms[normalised] = _rms(h)   # (B, T)
    # x: randn, RMS ≈ 1; RMSNorm's eps (1e-5) keeps the small reads of a fresh memory slightly under unit RMS
    assert ((rms[True] > 0.9) & (rms[True] <= 1)).all()
    assert rms[False].mean() < 0.2 * _rms(x).mean()


def _recording(project, seen: list):
    def wrapped(x, positions):
        seen.append(x)
        return project(x, positions)
    return wrapped


@pytest.mark.parametrize("make", [lambda **o: _mac(**o),
                                  lambda **o: _seeded(lambda: TitansMAG(DIM, HEADS, window=6, persistent_tokens=3,
                                                                        memory=dict(MEMORY), **o))])
def test_output_projection_follows_the_gate_with_a_small_init(make):
    layer, x = make(), _x(T=16)
    weight = layer.out_proj.weight
    assert weight.shape == (DIM, DIM) and abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean()) < 0.002
    gated = _capture(layer.gate, inputs=False)
    with torch.no_grad():
        out, _ = layer(x)
    assert rel_err(out, torch.cat(gated, dim=1) @ weight.T) < 1e-12
    assert make(out_proj=False).out_proj is None


def test_mac_conv_is_a_residual_token_shift_and_off_is_no_conv():
    """conv_size = w: the module equals the conv-free module (same weights) on x + conv(x); conv_size 0 has no conv
    parameters at all."""
    layer, x = _mac(conv_size=4), _x()
    plain = _mac(conv_size=0)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shift.")})
    assert not any(name.startswith("shift.") for name, _ in plain.named_parameters())
    with torch.no_grad():
        shifted, _ = layer.shift(x)
        assert rel_err(layer(x)[0], plain(x + shifted)[0]) < 1e-12
        assert not torch.allclose(layer(x)[0], plain(x)[0])


@pytest.mark.parametrize("cls", [TitansMAG, TitansMAL])
def test_window_hybrid_conv_is_the_attention_input_conv(cls):
    layer = _seeded(lambda: cls(DIM, HEADS, window=6, persistent_tokens=3, memory=dict(MEMORY), conv_size=3))
    plain = _seeded(lambda: cls(DIM, HEADS, window=6, persistent_tokens=3, memory=dict(MEMORY), conv_size=0))
    assert layer.attn.conv is not None and layer.attn.conv.size == 3 and plain.attn.conv is None
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("attn.conv.")})
    x = _x(T=20)
    with torch.no_grad():
        layer.attn.conv.weight.zero_()   # a zero conv adds nothing: equal to no conv
        assert rel_err(layer(x)[0], plain(x)[0]) < 1e-12


@pytest.mark.parametrize("cls", [TitansMAG, TitansMAL])
def test_memory_absorbs_the_persistent_tokens_first(cls):
    """memory_persistent: the memory output equals the memory run on [P ; x], read at x's positions (v1 eqs. 26, 29);
    off, it equals the memory run on x alone."""
    x = _x(T=21)
    for absorb in (True, False):
        layer = _seeded(lambda: cls(DIM, HEADS, window=6, persistent_tokens=3, memory=dict(MEMORY),
                                    memory_persistent=absorb))
        memory_out = _capture(layer.lmm, inputs=False)
        with torch.no_grad():
            layer(x)
            prefix = layer.attn.persistent.unsqueeze(0).expand(2, -1, -1)
            full, _ = layer.lmm(torch.cat([prefix, x], dim=1) if absorb else x)
        assert rel_err(memory_out[1 if absorb else 0][0], full[:, 3:] if absorb else full) < 1e-12


def test_saved_configs_without_the_options_rebuild_the_original_modules():
    """A config saved before the options (an old titans_mac/mag/mal section, or the older shared model.titans one)
    gets the values of the original modules; a current config keeps the new defaults."""
    old = {"heads": 2, "memory": dict(MEMORY)}
    model = from_dict({"model": {"dim": DIM, "titans_mac": {**old, "segment_len": 16},
                                 "titans_mag": {**old, "window": 6}, "titans_mal": {**old, "window": 6}}}).model
    assert {k: getattr(model.titans_mac, k) for k in ORIGINAL_MAC} == ORIGINAL_MAC
    assert (model.titans_mag.out_proj, model.titans_mag.conv_size, model.titans_mag.memory_persistent) == (False, 0,
                                                                                                            False)
    assert (model.titans_mal.conv_size, model.titans_mal.memory_persistent) == (0, False)
    older = from_dict({"model": {"dim": DIM, "titans": {"heads": 2, "segment_len": 16, "window": 6}}}).model
    assert {k: getattr(older.titans_mac, k) for k in ORIGINAL_MAC} == ORIGINAL_MAC
    mixer = build_mixer("titans_mac", model)
    assert mixer.out_proj is None and mixer.shift is None and mixer.memory_token_norm is None
    assert mixer.store_norm is None
    current = from_dict({"model": {"dim": DIM, "titans_mac": {**old, "segment_len": 16, "store": "residual"}}}).model
    assert current.titans_mac.store == "residual"


def test_bad_store_raises_naming_the_choices():
    with pytest.raises(ValueError, match="store must be one of residual"):
        TitansMAC(DIM, HEADS, segment_len=16, memory=dict(MEMORY), store="y")


def test_original_mac_has_exactly_the_original_parameters():
    """ORIGINAL_MAC rebuilds the module of before the options: the same parameter names, so its checkpoints load."""
    names = {name for name, _ in _mac(**ORIGINAL_MAC).named_parameters()}
    assert not any(name.split(".")[0] in ("shift", "memory_token_norm", "store_norm", "out_proj") for name in names)
    assert {name.split(".")[0] for name in names} == {"lmm", "attn", "gate"}

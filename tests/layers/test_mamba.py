"""Mamba, Mamba2 and BiMamba mixers: streaming, causality, decode, bidirectional symmetry, padding, init, compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import check_decode_equals_full, check_future_does_not_leak, check_stream_split, rel_err
from tests.layers.contract import check_meta_init_equals_init
from tests.layers.test_conv import reference_conv_silu
from zoo.config import Mamba2Config, MambaConfig, ModelConfig
from zoo.layers.mamba import BiMamba, Mamba
from zoo.layers.mamba2 import Mamba2
from zoo.models.lm import LanguageModel

SPLITS = [0, 1, 5, 63, 64, 65, 130]


def make_mixer(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "mamba":
        mixer = Mamba(16, d_state=4, d_conv=4, expand=2)
    else:
        mixer = Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=16, expand=2)
    return mixer.to(dtype)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_stream_split_equals_full(kind):
    mixer = make_mixer(kind)
    x = torch.randn(2, 130, 16, dtype=torch.float64)
    check_stream_split(mixer, x, SPLITS, 1e-10)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_future_does_not_leak(kind):
    mixer = make_mixer(kind)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    for t in (0, 17, 38):
        check_future_does_not_leak(mixer, x, t)
    y1, _ = mixer(x)
    x2 = x.clone()
    x2[:, 21:] += 1.0
    y2, _ = mixer(x2)
    assert rel_err(y2[:, :21], y1[:, :21]) < 1e-12


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_decode_equals_full(kind):
    mixer = make_mixer(kind)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    check_decode_equals_full(mixer, x, 1e-10)
    # after a 17-token prefill
    full, _ = mixer(x)
    _, state = mixer(x[:, :17])
    outs = []
    for t in range(17, 30):
        y, state = mixer(x[:, t:t + 1], state)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full[:, 17:]) < 1e-10


def test_state_shapes_and_dtypes():
    x = torch.randn(3, 7, 16)
    _, s = Mamba(16, d_state=4, d_conv=3)(x)
    assert s.conv.shape == (3, 2, 32) and s.ssm.shape == (3, 32, 4) and s.ssm.dtype == torch.float32
    _, s = Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=16)(x)
    assert s.conv.shape == (3, 3, 32 + 2 * 2 * 8) and s.ssm.shape == (3, 4, 8, 8)


def test_mamba2_validates_shapes():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(16, headdim=12)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(16, headdim=8, ngroups=3)


def test_mamba2_varlen_equals_separate():
    mixer = make_mixer("mamba2")
    lengths = [1, 5, 16, 40]
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 1, 6, 22, 62])
    packed, state = mixer(torch.cat(seqs, 1), cu_seqlens=cu)
    for k, (seq, (s, e)) in enumerate(zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist()))):
        alone, alone_state = mixer(seq)
        assert rel_err(packed[:, s:e], alone) < 1e-10
        assert rel_err(state.ssm[k], alone_state.ssm[0]) < 1e-10
        assert rel_err(state.conv[k], alone_state.conv[0]) < 1e-12
    # continuing every sequence from its packed state equals continuing it alone
    nxt = [torch.randn(1, 3, 16, dtype=torch.float64) for _ in lengths]
    cont, _ = mixer(torch.cat(nxt, 1), state, cu_seqlens=torch.tensor([0, 3, 6, 9, 12]))
    for k, seq in enumerate(seqs):
        _, alone_state = mixer(seq)
        alone, _ = mixer(nxt[k], alone_state)
        assert rel_err(cont[:, 3 * k:3 * k + 3], alone) < 1e-10
    # a packed state has one row per sequence: four rows for three sequences is refused
    with pytest.raises(ValueError, match=r"Mamba2: state.conv has batch size 4, expected 3"):
        mixer(torch.cat(nxt[:3], 1), state, cu_seqlens=torch.tensor([0, 3, 6, 9]))


def _swapped(mixer: BiMamba) -> BiMamba:
    """A copy of ``mixer`` with the forward and backward parameter sets exchanged."""
    other = BiMamba(mixer.dim, mixer.d_state, mixer.d_conv, mixer.d_inner // mixer.dim, mixer.dt_rank).to(
        mixer.A_log.dtype)
    state = mixer.state_dict()
    swapped = {}
    for key, value in state.items():
        if key.startswith(("conv1d_b.", "x_proj_b.", "dt_proj_b.")):
            swapped[key.replace("_b.", ".", 1)] = value
        elif key.startswith(("conv1d.", "x_proj.", "dt_proj.")):
            head, _, rest = key.partition(".")
            swapped[f"{head}_b.{rest}"] = value
        elif key in ("A_log", "A_b_log"):
            swapped["A_b_log" if key == "A_log" else "A_log"] = value
        elif key in ("D", "D_b"):
            swapped["D_b" if key == "D" else "D"] = value
        else:
            swapped[key] = value
    other.load_state_dict(swapped)
    return other


def test_bimamba_flip_symmetry():
    torch.manual_seed(0)
    mixer = BiMamba(16, d_state=4).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    y, state = mixer(x)
    assert state is None
    y_swapped, _ = _swapped(mixer)(x.flip(1))
    assert rel_err(y_swapped, y.flip(1)) < 1e-12
    # not causal: output 0 depends on the last input
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(mixer(x2)[0][:, 0], y[:, 0])
    with pytest.raises(ValueError, match="state"):
        mixer(x, (torch.zeros(1),))


def test_bimamba_padding_mask_invariance():
    torch.manual_seed(0)
    mixer = BiMamba(16, d_state=4).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full, _ = mixer(x)
    pad = torch.randn(2, 5, 16, dtype=torch.float64) * 3
    for padded, mask, valid in (
            (torch.cat([x, pad], 1), torch.arange(17) < 12, slice(0, 12)),          # right padding
            (torch.cat([pad, x], 1), torch.arange(17) >= 5, slice(5, 17))):         # left padding
        mask = mask.expand(2, 17)
        y, _ = mixer(padded, mask=mask)
        assert rel_err(y[:, valid], full) < 1e-12
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


def _lm(pattern, **section):
    cfg = ModelConfig(dim=32, depth=2, pattern=pattern, mlp="none", vocab_size=50)
    if pattern == ["mamba"]:
        cfg.mamba = MambaConfig(d_state=8)
    else:
        cfg.mamba2 = Mamba2Config(d_state=8, headdim=16, chunk_size=16)
    return cfg


@pytest.mark.parametrize("pattern", [["mamba"], ["mamba2"]])
def test_init_survives_model_init(pattern):
    torch.manual_seed(0)
    model = LanguageModel(_lm(pattern))
    for block in model.blocks:
        mixer = block.mixer
        bias = mixer.dt_proj.bias if pattern == ["mamba"] else mixer.dt_bias
        dt = F.softplus(bias.detach())
        assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0
        assert torch.equal(mixer.D.detach(), torch.ones_like(mixer.D))
        if pattern == ["mamba"]:
            expected = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand_as(mixer.A_log)
            assert torch.equal(mixer.A_log.detach(), expected)
        else:
            A = torch.exp(mixer.A_log.detach())
            assert A.min() >= 1 and A.max() <= 16
    names = model.no_weight_decay()
    assert "blocks.0.mixer.A_log" in names and "blocks.0.mixer.D" in names


@pytest.mark.parametrize("pattern", [["mamba"], ["mamba2"]])
def test_meta_init_equals_normal_init(pattern):
    cfg = _lm(pattern)
    check_meta_init_equals_init(lambda: LanguageModel(cfg), seed=3)
    check_meta_init_equals_init(lambda: Mamba(16, d_state=4), seed=5)   # a mixer alone, too


@pytest.mark.parametrize("cls", [Mamba, Mamba2, BiMamba])
def test_fp32_parameters_kept_under_bfloat16(cls):
    mixer = cls(16, d_state=8) if cls is not Mamba2 else cls(16, d_state=8, headdim=8, chunk_size=16)
    A_before = mixer.A_log.detach().clone()
    mixer = mixer.to(torch.bfloat16)
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32 and torch.equal(mixer.A_log, A_before)
    bias = mixer.dt_bias if cls is Mamba2 else mixer.dt_proj.bias
    assert bias.dtype == torch.float32
    y, _ = mixer(torch.randn(2, 9, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_torch_path_compiles(kind):
    pytest.importorskip("torch._inductor")
    mixer = make_mixer(kind, torch.float32)
    x = torch.randn(1, 6, 16)
    expected, _ = mixer(x)
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    got, _ = compiled(x)
    assert rel_err(got, expected) < 1e-5


def test_mamba2_long_input_in_segments_equals_one_pass():
    """On CPU a sequence longer than ``segment_len`` runs in segments carrying the state: same output, final state and
    gradients as one pass (segments of 32 over T = 101: not a multiple of the segment or of the chunk, 16)."""
    mixer = make_mixer("mamba2")
    x = torch.randn(2, 101, 16, dtype=torch.float64, requires_grad=True)
    one_pass, segment_lengths = mixer._forward, []
    mixer._forward = lambda x, *args: segment_lengths.append(x.shape[1]) or one_pass(x, *args)
    results = []
    for segment_len in (32, 1000):
        mixer.segment_len = segment_len
        y, state = mixer(x)
        grads = torch.autograd.grad((y * torch.cos(y)).sum() + state.ssm.sum(), [x] + list(mixer.parameters()))
        results.append((y, state, grads))
    assert segment_lengths == [32, 32, 32, 5, 101]
    (y, state, grads), (y_ref, state_ref, grads_ref) = results
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(state.conv, state_ref.conv) < 1e-12 and rel_err(state.ssm, state_ref.ssm) < 1e-12
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-11


def _reference_mamba2(mixer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2 from its equations: in_proj, conv, the sequential SSD loop, gate-then-normalise per group, out_proj."""
    from zoo.kernels.ssd import ssd_reference

    E, H, G, N, P = mixer.d_inner, mixer.nheads, mixer.ngroups, mixer.d_state, mixer.headdim
    z, xBC, dt = torch.split(mixer.in_proj(x), [E, E + 2 * G * N, H], dim=-1)
    x_c, B, C = torch.split(reference_conv_silu(mixer.conv1d, xBC)[0], [E, G * N, G * N], dim=-1)
    y, _ = ssd_reference(x_c.unflatten(-1, (H, P)), dt, -torch.exp(mixer.A_log), B.unflatten(-1, (G, N)),
                         C.unflatten(-1, (G, N)), D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True)
    return mixer.out_proj(_reference_gated_norm(mixer.norm, y.flatten(-2), z))


def _reference_gated_norm(norm, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mamba-2's gated RMSNorm from its equation: v = y·silu(z), each group v_g / sqrt(mean(v_g²) + eps), times w."""
    v = (y * F.silu(z)).unflatten(-1, (norm.groups, -1))
    v = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps)
    return v.flatten(-2) * norm.weight


@pytest.mark.parametrize("groups", [1, 2])
def test_gated_norm_matches_equation_with_gradients(groups):
    """The fused gated RMSNorm (hand-written backward) against its equation in float64: output and the gradients of
    y, z (a strided view, as the mixer passes it) and the weight."""
    from zoo.layers.mamba2 import GroupedGatedRMSNorm

    torch.manual_seed(0)
    norm = GroupedGatedRMSNorm(12, groups).double()
    with torch.no_grad():
        norm.weight.normal_()
    y = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(2, 7, 20, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    results = []
    for fn in (norm, lambda y, z: _reference_gated_norm(norm, y, z)):
        out = fn(y, zs[..., 5:17])
        results.append((out, torch.autograd.grad((out * g).sum(), (y, zs, norm.weight))))
    (out, grads), (out_ref, grads_ref) = results
    assert rel_err(out, out_ref) < 1e-12
    for name, grad, grad_ref in zip(["y", "z", "weight"], grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-12, name
    with pytest.raises(ValueError, match="must both be"):
        norm(y, zs)


def _reference_mamba(mixer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba-1 from its equations: in_proj, conv, x_proj/dt_proj, the sequential selective scan, SiLU gate, out_proj."""
    from zoo.kernels.selective_scan import selective_scan_reference

    x_in, z = mixer.in_proj(x).chunk(2, dim=-1)
    x_c = reference_conv_silu(mixer.conv1d, x_in)[0]
    dt_low, B, C = torch.split(mixer.x_proj(x_c), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    y, _ = selective_scan_reference(x_c, dt_low @ mixer.dt_proj.weight.T, -torch.exp(mixer.A_log), B, C, mixer.D, z,
                                    mixer.dt_proj.bias, True)
    return mixer.out_proj(y)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mixer_matches_equation_reference_with_gradients(kind):
    """The whole mixer (fused conv + SiLU, chunked scan with its hand-written backward, gated norm) against a float64
    reference built from the papers' equations and the sequential scan loops: outputs and the gradients of the input
    and of every parameter. T = 37 is not a multiple of the chunk (16), so the padded tail is covered too."""
    mixer = make_mixer(kind)
    reference = _reference_mamba if kind == "mamba" else _reference_mamba2
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 37, 16, dtype=torch.float64)
    params = [x] + list(mixer.parameters())
    names = ["x"] + [name for name, _ in mixer.named_parameters()]
    y, _ = mixer(x)
    grads = torch.autograd.grad((y * g).sum(), params)
    y_ref = reference(mixer, x)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    assert rel_err(y, y_ref) < 1e-10
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-9, name

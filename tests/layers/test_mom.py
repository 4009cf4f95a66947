"""MixtureOfMemories and GatedDeltaNet against loop oracles and the mixer contract (docs/mom.md#tests, items 8–16)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import zoo.layers.mom as mom_module
from tests.helpers import check_decode_equals_full, check_stream_split, rel_err
from tests.layers.contract import check_meta_init_equals_init
from zoo.config import GDNConfig, MoMConfig, ModelConfig, from_dict
from zoo.kernels.gated_delta import gated_delta_rule_reference
from zoo.layers.mom import (CONV_SIZE, GatedDeltaNet, MixtureOfMemories, MoMState, segment_delta_rule,
                            sort_by_memory)
from zoo.layers.base import combine_aux_losses
from zoo.models.lm import LanguageModel, build_mixer
from zoo.train.task import auxiliary_loss

TINY = dict(dim=32, heads=2, head_dim=8, num_memories=3, topk=2)          # mom-tiny (docs/mom.md#configs)


def make_mom(seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    return MixtureOfMemories(**{**TINY, **options}).to(dtype)


def make_x(B, T, seed=1, dtype=torch.float64, dim=32):
    return torch.randn(B, T, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------ oracle
def conv_zero_history(z, weight):
    """Causal depthwise conv of z (L, C) with zero history; weight (C, w), the last tap multiplies z_t."""
    w = weight.shape[1]
    padded = torch.cat([z.new_zeros(w - 1, z.shape[1]), z])                              # (w−1+L, C)
    return sum(padded[j:j + z.shape[0]] * weight[:, j] for j in range(w))                  # (L, C)


def memory_branch(layer, x_sub, k_weight, v_weight, b_weight, a_weight):
    """One memory over a subsequence x_sub (L, D) from a fresh state: convs, SiLU, the reference op. -> (L, H, d)."""
    d = layer.head_dim
    q = F.silu(conv_zero_history(x_sub @ layer.q_proj.weight.T, layer.conv_q.weight))
    k = F.silu(conv_zero_history(x_sub @ k_weight.T, layer.conv_k.weight))
    v = F.silu(conv_zero_history(x_sub @ v_weight.T, layer.conv_v.weight))
    beta = torch.sigmoid(x_sub @ b_weight.T)                                               # (L, H)
    g = -layer.A_log.exp() * F.softplus(x_sub @ a_weight.T + layer.dt_bias)                # (L, H)
    q, k, v = (rearrange(z, "l (h d) -> 1 l h d", d=d) for z in (q, k, v))
    o, _ = gated_delta_rule_reference(q, k, v, g[None], beta[None], use_qk_l2norm=True)
    return o[0]                                                                            # (L, H, d)


def output_head(layer, o, x):
    """W_O(RMSNorm(o) ⊙ SiLU(x W_G)) for o (B, T, H, d) in float64."""
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    gate = rearrange(x @ layer.gate_proj.weight.T, "b t (h d) -> b t h d", d=layer.head_dim)
    return rearrange(normed * F.silu(gate), "b t h d -> b t (h d)") @ layer.o_proj.weight.T


def mom_oracle(layer, x):
    """The per-(b, m) loop oracle: route, run each memory on its own tokens in time order, mix, norm, gate, W_O."""
    B, T, _ = x.shape
    M, H, d = layer.num_memories, layer.heads, layer.head_dim
    probs = (x @ layer.router.weight.T).softmax(-1)                                        # (B, T, M)
    top_probs, top_index = probs.topk(layer.topk, dim=-1)
    weights = top_probs / top_probs.sum(-1, keepdim=True)
    o = x.new_zeros(B, T, H, d)
    for b in range(B):
        for m in range(M):
            selected = (top_index[b] == m)                                                 # (T, k)
            times = selected.any(-1).nonzero().flatten()
            if times.numel() == 0:
                continue
            weight = (weights[b] * selected).sum(-1)[times]                                 # (L,)
            o_m = memory_branch(layer, x[b, times], layer.k_proj[m], layer.v_proj[m], layer.b_proj[m],
                                layer.a_proj[m])
            o[b, times] += weight[:, None, None] * o_m
        if layer.shared_memory:
            o[b] += memory_branch(layer, x[b], layer.k_proj[M], layer.v_proj[M], layer.b_proj[M], layer.a_proj[M])
    return output_head(layer, o, x)


@torch.no_grad()
def test_matches_per_memory_loop_oracle_float64():
    layer = make_mom()
    x = make_x(2, 45)
    expected = mom_oracle(layer, x)
    y_train, _ = layer.train()(x)
    y_eval, _ = layer.eval()(x)
    assert rel_err(y_train, expected) < 1e-10
    assert rel_err(y_eval, y_train) < 1e-14                 # no training-only conv leak across segments


@torch.no_grad()
def test_matches_oracle_without_shared_memory_and_topk_one():
    layer = make_mom(num_memories=4, topk=1, shared_memory=False)
    x = make_x(2, 70, seed=3)
    assert rel_err(layer(x)[0], mom_oracle(layer, x)) < 1e-10


# ------------------------------------------------------------------------------------------------ one memory
def copy_gdn_weights(mom, gdn, memory):
    with torch.no_grad():
        for name in ("q_proj", "gate_proj", "o_proj", "conv_q", "conv_k", "conv_v", "o_norm"):
            getattr(gdn, name).load_state_dict(getattr(mom, name).state_dict())
        gdn.A_log.copy_(mom.A_log)
        gdn.dt_bias.copy_(mom.dt_bias)
        for name in ("k_proj", "v_proj", "b_proj", "a_proj"):
            getattr(gdn, name).weight.copy_(getattr(mom, name)[memory])


@torch.no_grad()
def test_one_memory_without_shared_equals_gated_deltanet():
    mom = make_mom(num_memories=1, topk=1, shared_memory=False)
    gdn = GatedDeltaNet(32, heads=2, head_dim=8).double()
    copy_gdn_weights(mom, gdn, 0)
    x = make_x(2, 70)
    (y_mom, s_mom), (y_gdn, s_gdn) = mom(x), gdn(x)
    assert rel_err(y_mom, y_gdn) < 1e-12
    assert rel_err(s_mom.S[:, 0], s_gdn.S) < 1e-12
    assert rel_err(s_mom.conv_k[:, 0], s_gdn.conv_k) < 1e-14


@torch.no_grad()
def test_one_memory_with_shared_equals_two_branches_summed_before_norm():
    mom = make_mom(num_memories=1, topk=1, shared_memory=True)
    x = make_x(2, 50)
    o = torch.stack([memory_branch(mom, x[b], mom.k_proj[0], mom.v_proj[0], mom.b_proj[0], mom.a_proj[0])
                     + memory_branch(mom, x[b], mom.k_proj[1], mom.v_proj[1], mom.b_proj[1], mom.a_proj[1])
                     for b in range(2)])
    assert rel_err(mom(x)[0], output_head(mom, o, x)) < 1e-12


# ----------------------------------------------------------------------------------------------- sort order
@torch.no_grad()
def test_sort_keeps_time_order_when_routing_ties():
    layer = make_mom()
    layer.router.weight.zero_()                             # every routing decision is a tie
    x = make_x(2, 257)
    _, top_index, _ = layer.route(x)
    order, segment, cu_seqlens = sort_by_memory(top_index, layer.num_memories)
    token = order // layer.topk
    times, batch = token % 257, token // 257
    for s in range(2 * layer.num_memories):
        span = slice(int(cu_seqlens[s]), int(cu_seqlens[s + 1]))
        assert bool((segment[span] == s).all()) and bool((batch[span] == s // layer.num_memories).all())
        assert bool((times[span][1:] > times[span][:-1]).all()), f"segment {s} is out of time order"
    first, second = layer(x)[0], layer(x)[0]
    assert torch.equal(first, second)


# ------------------------------------------------------------------------------------------------ causality
@torch.no_grad()
@pytest.mark.parametrize("t", [0, 17, 64, 100, 128])
def test_future_does_not_leak(t):
    layer = make_mom()
    x = make_x(2, 130)
    y1, _ = layer(x)
    x2 = x.clone()
    x2[:, t + 1:] = make_x(2, 130 - t - 1, seed=9)          # new future: new routing and new conv inputs
    y2, _ = layer(x2)
    assert (y1[:, :t + 1] - y2[:, :t + 1]).abs().max() <= 1e-12 * y1.abs().max()
    assert not torch.allclose(y1[:, t + 1:], y2[:, t + 1:])


@torch.no_grad()
def test_batch_samples_are_independent():
    layer = make_mom()
    x = make_x(3, 60)
    x2 = x.clone()
    x2[1] = make_x(1, 60, seed=5)[0]
    assert torch.equal(layer(x)[0][0], layer(x2)[0][0])


# ---------------------------------------------------------------------------------------- streaming, decode
@torch.no_grad()
def test_stream_split_equals_full_every_split():
    layer = make_mom()
    check_stream_split(layer, make_x(2, 40), range(0, 41), 1e-10)


@torch.no_grad()
def test_three_way_stream_split_equals_full():
    layer = make_mom()
    x = make_x(2, 40)
    full, _ = layer(x)
    for a, b in [(1, 2), (3, 30), (13, 14), (0, 39), (20, 40)]:
        y1, s = layer(x[:, :a])
        y2, s = layer(x[:, a:b], s)
        y3, _ = layer(x[:, b:], s)
        assert rel_err(torch.cat([y1, y2, y3], dim=1), full) < 1e-10


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_decode_equals_full(dtype, tolerance):
    check_decode_equals_full(make_mom(dtype=dtype), make_x(2, 24, dtype=dtype), tolerance)


@torch.no_grad()
def test_decode_equals_full_without_shared_memory():
    layer = make_mom(num_memories=4, topk=1, shared_memory=False)
    check_decode_equals_full(layer, make_x(2, 24), 1e-10)


@torch.no_grad()
def test_decode_state_holds_m_plus_one_memories():
    layer = make_mom()
    _, state = layer(make_x(2, 5))
    assert state.S.shape == (2, 3, 2, 8, 8) and state.S_shared.shape == (2, 2, 8, 8)
    assert state.conv_q.shape == (2, 4, CONV_SIZE - 1, 16) and state.S.dtype == torch.float64
    _, state = make_mom(shared_memory=False)(make_x(2, 5))
    assert state.S_shared is None and state.conv_v.shape == (2, 3, CONV_SIZE - 1, 16)


@torch.no_grad()
def test_gated_deltanet_streams_and_decodes():
    torch.manual_seed(0)
    gdn = GatedDeltaNet(32, heads=2, head_dim=8).double()
    x = make_x(2, 40)
    check_stream_split(gdn, x, [0, 1, 7, 33, 40], 1e-10)
    check_decode_equals_full(gdn, x[:, :20], 1e-10)


# -------------------------------------------------------------------------------------------------- aux loss
def test_aux_loss_equals_switch_formula_and_is_none_in_eval():
    layer = make_mom(aux_loss_scale=0.5, aux_loss_form="layer_mean").train()
    x = make_x(2, 50)
    _, state = layer(x)
    probs = (x @ layer.router.weight.detach().T).softmax(-1)                            # (B, T, M)
    chosen = F.one_hot(probs.topk(2, dim=-1).indices, 3).sum(2).double()               # (B, T, M)
    expected = 3 * (chosen.mean((0, 1)) * probs.mean((0, 1))).sum()
    assert abs(float(state.aux_loss.detach()) - 0.5 * float(expected)) < 1e-12 and state.aux_loss.dim() == 0
    assert layer.eval()(x)[1].aux_loss is None
    assert make_mom(aux_loss_scale=0.0).train()(x)[1].aux_loss is None


def test_aux_loss_is_topk_for_uniform_routing():
    layer = make_mom(aux_loss_scale=1.0, aux_loss_form="layer_mean").train()
    with torch.no_grad():
        layer.router.weight.zero_()
    assert abs(float(layer(make_x(2, 30))[1].aux_loss.detach()) - layer.topk) < 1e-12


def test_aux_loss_gradient_reaches_router_only_through_probabilities():
    layer = make_mom(aux_loss_scale=1.0, aux_loss_form="layer_mean").train()
    x = make_x(2, 50)
    aux = layer(x)[1].aux_loss
    grads = torch.autograd.grad(aux, list(layer.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in layer.named_parameters()], grads))
    assert named["router.weight"] is not None and named["router.weight"].abs().sum() > 0
    assert all(g is None or not g.any() for n, g in named.items() if n != "router.weight")
    weight = layer.router.weight.detach().requires_grad_()
    probs = (x @ weight.T).softmax(-1)
    fraction = F.one_hot(probs.topk(2, dim=-1).indices, 3).sum(2).double().mean((0, 1))  # no gradient
    (expected,) = torch.autograd.grad(3 * (fraction * probs.mean((0, 1))).sum(), weight)
    assert rel_err(named["router.weight"], expected) < 1e-12


def test_global_aux_loss_is_one_switch_loss_over_the_concatenated_layers_at_scale_0_01():
    """The official form: F and P over the router outputs of all layers together, M · Σ_e F_e P_e, times 0.01."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=32, depth=3, pattern=["mom"], mom=MoMConfig(heads=2, head_dim=8,
                                                                                          num_memories=3, topk=2))
    model = LanguageModel(config).double().train()
    assert all(b.mixer.aux_loss_form == "global" and b.mixer.aux_loss_scale == 0.01 for b in model.blocks)
    inputs = []
    for block in model.blocks:
        block.mixer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    _, state = model(tokens)
    aux = auxiliary_loss(state)
    probs = torch.cat([(x @ b.mixer.router.weight.T).softmax(-1).flatten(0, 1)               # (L·B·T, M)
                       for x, b in zip(inputs, model.blocks)])
    fraction = F.one_hot(probs.topk(2, dim=-1).indices, 3).sum(1).double().mean(0)            # (M,), no gradient
    expected = 0.01 * 3 * (fraction * probs.mean(0)).sum()
    assert abs(float(aux.detach()) - float(expected.detach())) < 1e-14
    per_layer = torch.stack([3 * (F.one_hot(p.topk(2, -1).indices, 3).sum(1).double().mean(0) * p.mean(0)).sum()
                             for p in probs.chunk(3)]).mean() * 0.01
    assert abs(float(aux.detach()) - float(per_layer.detach())) > 1e-6    # not the mean of the per-layer losses
    (grad,) = torch.autograd.grad(aux, model.blocks[1].mixer.router.weight, retain_graph=True)
    (want,) = torch.autograd.grad(expected, model.blocks[1].mixer.router.weight)
    assert rel_err(grad, want) < 1e-12 and grad.abs().sum() > 0


def test_layer_mean_form_is_the_mean_of_per_layer_losses_and_old_configs_keep_it():
    layer = make_mom(aux_loss_scale=1e-3, aux_loss_form="layer_mean").train()
    x, other = make_x(2, 30), make_x(2, 30, seed=3)
    terms = [layer(x)[1].aux_loss, layer(other)[1].aux_loss]
    assert all(t.dim() == 0 for t in terms)
    assert float(combine_aux_losses(terms).detach()) == pytest.approx(float(sum(terms).detach()) / 2, rel=1e-14)
    old = {"heads": 2, "head_dim": 16, "num_memories": 4, "topk": 2, "shared_memory": True, "aux_loss_scale": 0.001}
    section = from_dict({"model": {"pattern": ["mom"], "mom": old}}).model.mom
    assert (section.aux_loss_form, section.aux_loss_scale) == ("layer_mean", 0.001)   # saved before the option
    assert MoMConfig().aux_loss_form == "global"
    with pytest.raises(ValueError, match="MixtureOfMemories: aux_loss_form must be 'global' or 'layer_mean'"):
        make_mom(aux_loss_form="per_token")


def test_gradients_reach_every_parameter():
    layer = make_mom(num_memories=4).train()
    x = make_x(2, 80)
    y, state = layer(x)
    (y.pow(2).sum() + combine_aux_losses([state.aux_loss])).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        per_memory = param.grad.flatten(1).abs().sum(1) if param.dim() == 3 else param.grad.abs().sum()[None]
        assert bool((per_memory > 0).all()), f"{name} has a memory without gradient"


# ----------------------------------------------------------------------------------------------- host sync
def test_forward_has_no_host_sync(monkeypatch):
    def stub(q, k, v, g, beta, initial_state=None, cu_seqlens=None, **_):
        return v * 1.0, initial_state * 1.0

    def refuse(*_, **__):
        raise AssertionError("host sync in the layer's forward")

    layer = make_mom(dtype=torch.float32).train()
    x = make_x(2, 30, dtype=torch.float32)
    monkeypatch.setattr(mom_module, "gated_delta_rule", stub)
    for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch, "unique"), (torch, "nonzero"),
                        (torch.Tensor, "nonzero"), (torch.Tensor, "unique")):
        monkeypatch.setattr(owner, name, refuse)
    y, state = layer(x)
    y, state = layer(x[:, :1], state)
    assert y.shape == (2, 1, 32) and state.aux_loss is not None


# ------------------------------------------------------------------------------------- compile (dense) path
def packed_segments(lengths, H=2, d=8, seed=0):
    """Packed rows of segments with the given lengths, float64, all requiring grad: q, k, v (N, H, d), g, beta
    (N, H), initial states (S, H, d, d); then segment (N,) and cu_seqlens (S + 1,)."""
    generator = torch.Generator().manual_seed(seed)
    N, S = sum(lengths), len(lengths)
    q, k, v = (torch.randn(N, H, d, generator=generator, dtype=torch.float64) for _ in range(3))
    g = -0.5 * F.softplus(torch.randn(N, H, generator=generator, dtype=torch.float64))
    beta = torch.rand(N, H, generator=generator, dtype=torch.float64)
    state = torch.randn(S, H, d, d, generator=generator, dtype=torch.float64)
    segment = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    return [z.requires_grad_() for z in (q, k, v, g, beta, state)], segment, cu_seqlens


def outputs_and_gradients(run, inputs):
    """(o, final state, then the gradient of every input) for a fixed random loss on o and the final state."""
    o, final = run(*inputs)
    generator = torch.Generator().manual_seed(1)
    loss = sum((z * torch.randn(z.shape, generator=generator, dtype=z.dtype)).sum() for z in (o, final))
    return [o, final, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("lengths", [[70, 0, 3, 66, 1], [5, 5, 5], [0, 0, 9], [70]])
def test_segment_delta_rule_dense_equals_varlen_and_reference_float64(lengths):
    inputs, segment, cu_seqlens = packed_segments(lengths)
    length = max(70, max(lengths))                                # a bound, as T is for the routed segments

    def layer_op(dense):
        return lambda *z: segment_delta_rule(*z, segment, cu_seqlens, length, dense=dense)

    def reference(q, k, v, g, beta, state):
        o, final = gated_delta_rule_reference(q[None], k[None], v[None], g[None], beta[None], initial_state=state,
                                              cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        return o[0], final

    names = ["o", "final state", "dq", "dk", "dv", "dg", "dbeta", "dstate"]
    varlen, dense, expected = (outputs_and_gradients(run, inputs) for run in (layer_op(False), layer_op(True),
                                                                                reference))
    for name, a, b, c in zip(names, dense, varlen, expected, strict=True):
        assert rel_err(a, b) < 1e-12, f"{name}: dense vs varlen {rel_err(a, b):.2e}"
        assert rel_err(a, c) < 1e-12, f"{name}: dense vs the token-loop reference {rel_err(a, c):.2e}"


@pytest.mark.parametrize("options", [{}, dict(num_memories=4, topk=1, shared_memory=False)])
def test_compile_path_equals_eager_path_float64(monkeypatch, options):
    """The dense call torch.compile takes gives the eager (varlen) outputs, states and gradients to 1e-12."""
    layer = make_mom(**options).train()
    x, prefix = make_x(2, 75, seed=4), make_x(2, 9, seed=5)
    eager = mom_module.segment_delta_rule
    taken = []

    def run(dense_path):
        def op(*arguments, dense):
            taken.append(dense)
            return eager(*arguments, dense=dense_path)

        monkeypatch.setattr(mom_module, "segment_delta_rule", op)
        layer.zero_grad()
        start = layer(prefix)[1]._replace(aux_loss=None)
        start = MoMState(*(None if z is None else z.detach().requires_grad_() for z in start))
        xs = x.clone().requires_grad_()
        y, state = layer(xs, start)
        state = state._replace(aux_loss=combine_aux_losses([state.aux_loss]))             # the pooled loss, 0-dim
        tensors = [y, *(z for z in state if z is not None)]
        generator = torch.Generator().manual_seed(2)
        loss = sum((z * torch.randn(z.shape, generator=generator, dtype=z.dtype)).sum() for z in tensors)
        leaves = [xs, start.S, start.conv_q, start.conv_k, start.conv_v]
        grads = torch.autograd.grad(loss, leaves + list(layer.parameters()))
        return tensors + list(grads)

    varlen, dense = run(False), run(True)
    assert taken == [False] * 4                                   # eager asks for the varlen call
    for index, (a, b) in enumerate(zip(dense, varlen, strict=True)):
        assert rel_err(a, b) < 1e-12, f"tensor {index}: dense vs varlen {rel_err(a, b):.2e}"


# ---------------------------------------------------------------------------------------- init and configs
@pytest.mark.parametrize("cls, options", [(MixtureOfMemories, TINY), (GatedDeltaNet, dict(dim=32, heads=2))])
def test_meta_init_then_reset_equals_normal_build(cls, options):
    check_meta_init_equals_init(lambda: cls(**options), seed=7)


def test_language_model_meta_init_equals_normal_build():
    config = ModelConfig(dim=32, depth=2, pattern=["mom"], mom=MoMConfig(heads=2, head_dim=8, num_memories=3))
    check_meta_init_equals_init(lambda: LanguageModel(config), seed=3)


def test_config_sections_build_both_mixers():
    section = MoMConfig(heads=2, head_dim=8, num_memories=3, topk=1, shared_memory=False, aux_loss_scale=0.01)
    config = ModelConfig(dim=32, mom=section, gdn=GDNConfig(heads=2, head_dim=8))
    mom = build_mixer("mom", config)
    assert (mom.num_memories, mom.topk, mom.shared_memory, mom.aux_loss_scale) == (3, 1, False, 0.01)
    assert mom.k_proj.shape == (3, 16, 32)
    gdn = build_mixer("gdn", config)
    assert isinstance(gdn, GatedDeltaNet) and gdn.k_proj.weight.shape == (16, 32)


def test_language_model_with_mom_trains_and_reports_aux_loss():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=32, depth=2, pattern=["mom"],
                         mom=MoMConfig(heads=2, head_dim=8, num_memories=3, topk=2))
    model = LanguageModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        logits, state = model(tokens[:, :-1])
        assert all(isinstance(s, MoMState) and s.aux_loss is not None for s in state)
        aux = auxiliary_loss(state)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        assert torch.isfinite(loss)
    assert losses[-1] < losses[0] - 0.1
    assert 0 < float(aux.detach()) < 5e-2                            # ~ scale · k (0.01 · 2), one global loss
    assert model.blocks[0].mixer.router.weight.grad.abs().sum() > 0
    model.eval()
    assert all(s.aux_loss is None for s in model(tokens[:, :-1])[1])
    generated = model.generate(tokens[:2, :5], 4)
    assert generated.shape == (2, 9)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options, message", [
    (dict(topk=4), "topk"),
    (dict(topk=0), "topk"),
    (dict(num_memories=0, topk=0), "num_memories"),
    (dict(aux_loss_scale=-1.0), "aux_loss_scale"),
    (dict(head_dim=None, heads=3), "divisible"),
    (dict(heads=0), "heads"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        MixtureOfMemories(**{**TINY, **options})


def test_rule_is_not_an_option():
    """The gated delta rule is the only memory rule, so there is no ``rule=`` to pass."""
    with pytest.raises(TypeError, match="rule"):
        MixtureOfMemories(**TINY, rule="delta")


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        make_mom()(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        GatedDeltaNet(30, heads=4)

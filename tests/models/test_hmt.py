"""HMT (zoo.models.hmt) against its algebra, streaming, causality and training contracts (docs/hmt.md#tests)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import KJV_FIXTURE, run_zoo, train_losses
from tests.layers.contract import check_meta_init_equals_init
from zoo.checkpoint import export_model, load_export
from zoo.config import AttentionConfig, Config, HMTConfig, ModelConfig
from zoo.eval.metrics import IGNORE_INDEX
from zoo.models.hmt import HMT, HMTState
from zoo.models import build_model
from zoo.models.lm import LanguageModel
from zoo.train.hmt import HMTTask, last_segments_labels

L, K, J, N, D = 16, 4, 8, 4, 64                       # the CPU tiny fixture (docs/hmt.md#configs)


def make_backbone(seed=0, dtype=torch.float32, **model_options):
    """The tiny Attention LM with weights at a trained-like scale: embeddings std 1, linears (untied head included)
    1/sqrt(fan_in), so logits are O(1).

    At the LM's 0.02 init every block is close to the identity, so the memories M_n of different segments are
    nearly equal and the recall and streaming tests could not tell a right memory from a wrong one.
    """
    torch.manual_seed(seed)
    backbone = LanguageModel(ModelConfig(dim=D, depth=2, init_std=1.0, tie_embeddings=False, **model_options))
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    return backbone.to(dtype)


def make_hmt(seed=0, dtype=torch.float32, sharp_recall=False, **options):
    """The tiny fixture in eval mode; ``sharp_recall`` scales Wq so recall weights are far from uniform."""
    hmt = HMT(make_backbone(seed, dtype), L, K, N, 0.5, **options).to(dtype).eval()
    if sharp_recall:
        with torch.no_grad():
            hmt.w_q.weight.mul_(8.0)
    return hmt


def make_ids(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def spy_backbone(hmt):
    """Record [input embeddings, hidden output] of every ``forward_embeds`` call of the backbone.

    Calls are recorded on entry: a checkpoint's recomputation in backward may stop before the call returns.
    """
    calls = []
    original = hmt.backbone.forward_embeds

    def recording(h, state=None, mask=None):
        calls.append([h, None])
        hidden, new_state = original(h, state, mask)
        calls[-1][1] = hidden
        return hidden, new_state

    hmt.backbone.forward_embeds = recording
    return calls


def capture_embeddings(hmt):
    """Make each call of the backbone's embedding return a fresh leaf that requires grad; returns the leaves."""
    leaves = []

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    hmt.backbone.embed.register_forward_hook(hook)
    return leaves


def oracle_segment(hmt, memory, ids, sensory_ids=None):
    """head(F([P; E(sensory); E(x); P])) at the text positions, and the output M at the trailing P."""
    embed = hmt.backbone.embed
    parts = [memory[:, None]] + ([] if sensory_ids is None else [embed(sensory_ids)]) + [embed(ids), memory[:, None]]
    hidden, _ = hmt.backbone.forward_embeds(torch.cat(parts, dim=1))
    first = 1 + (0 if sensory_ids is None else sensory_ids.shape[1])
    return hmt.backbone.head(hidden[:, first:first + ids.shape[1]]), hidden[:, -1]


# ------------------------------------------------------------------------------------------ 1-2: the first segments
@torch.no_grad()
def test_one_segment_equals_backbone_on_memory_text_memory():
    hmt = make_hmt()
    x = make_ids(2, L)
    logits, state = hmt(x)
    m0 = hmt.m0.expand(2, D)
    hidden, _ = hmt.backbone.forward_embeds(torch.cat([m0[:, None], hmt.backbone.embed(x), m0[:, None]], dim=1))
    expected = hmt.backbone.head(hidden[:, 1:L + 1])
    assert torch.equal(logits, expected)                                  # the same call: bitwise
    assert torch.equal(state.cache[:, 0], hidden[:, -1])
    assert (state.n_done, state.offset) == (1, 0)
    assert not torch.allclose(logits, hmt.backbone(x)[0], atol=1e-3)     # the memory slots change the logits


@torch.no_grad()
def test_stage1_second_segment_reads_previous_memory_and_sensory_tail():
    hmt = make_hmt(dtype=torch.float64, recall=False)
    x = make_ids(2, 3 * L)
    logits, _ = hmt(x)
    _, m_0 = oracle_segment(hmt, hmt.m0.expand(2, D), x[:, :L])
    expected, m_1 = oracle_segment(hmt, m_0, x[:, L:2 * L], sensory_ids=x[:, L - K:L])
    assert torch.allclose(logits[:, L:2 * L], expected, rtol=0, atol=1e-12)
    expected, _ = oracle_segment(hmt, m_1, x[:, 2 * L:], sensory_ids=x[:, 2 * L - K:2 * L])
    assert torch.allclose(logits[:, 2 * L:], expected, rtol=0, atol=1e-12)   # P_2 = M_1: no recall in stage 1


@torch.no_grad()
def test_default_recall_query_is_the_papers_first_half_of_the_current_segment():
    """HMT paper eq. 1-2: S_n = F([T; E(x_n[:j]); T])[-1], P_n = softmax(S_n Wq (C Wk)^T / sqrt(d_h)) C."""
    hmt = HMT(make_backbone(dtype=torch.float64), L, K, N, 0.5).double().eval()
    assert hmt.summary_source == "current" and hmt.summary_len == J
    with torch.no_grad():
        hmt.w_q.weight.mul_(8.0)                                           # recall weights far from uniform
    x = make_ids(2, 4 * L)
    logits, _ = hmt(x)
    _, m_0 = oracle_segment(hmt, hmt.m0.expand(2, D), x[:, :L])
    _, m_1 = oracle_segment(hmt, m_0, x[:, L:2 * L], sensory_ids=x[:, L - K:L])
    memories = [m_0, m_1]
    for n in (2, 3):
        segment = x[:, n * L:(n + 1) * L]
        prompt = hmt.summary_prompt.expand(2, 1, D)
        hidden, _ = hmt.backbone.forward_embeds(torch.cat([prompt, hmt.backbone.embed(segment[:, :J]), prompt], 1))
        cache = torch.stack(memories, dim=1)                                 # (B, n, D)
        scores = torch.einsum("bd,bcd->bc", hidden[:, -1] @ hmt.w_q.weight.T, cache @ hmt.w_k.weight.T) / math.sqrt(D)
        recalled = torch.einsum("bc,bcd->bd", scores.softmax(-1), cache)   # P_n (B, D)
        expected, m_n = oracle_segment(hmt, recalled, segment, sensory_ids=x[:, n * L - K:n * L])
        assert torch.allclose(logits[:, n * L:(n + 1) * L], expected, rtol=0, atol=1e-10), n
        memories.append(m_n)
    previous = HMT(make_backbone(dtype=torch.float64), L, K, N, 0.5, summary_source="previous").double().eval()
    previous.load_state_dict(hmt.state_dict())
    assert not torch.allclose(previous(x)[0][:, 2 * L:], logits[:, 2 * L:], atol=1e-6)  # the option differs


# ---------------------------------------------------------------------------------------------------- 3: recall
def random_recall_inputs(batch=3, slots=N, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    summary = torch.randn(batch, D, generator=gen, dtype=dtype)
    cache = torch.randn(batch, slots, D, generator=gen, dtype=dtype)
    return summary, cache


@torch.no_grad()
def test_recall_with_one_memory_returns_it_for_any_projection():
    summary, cache = random_recall_inputs()
    for seed in (0, 1):
        hmt = make_hmt(seed=seed, dtype=torch.float64)
        torch.nn.init.normal_(hmt.w_q.weight, std=3.0, generator=torch.Generator().manual_seed(seed))
        memory, weights = hmt.recall_memory(summary, cache, valid=1)
        assert torch.equal(memory, cache[:, 0])
        assert torch.equal(weights[:, 0], torch.ones(3, dtype=torch.float64))
        assert torch.equal(hmt.memory_for_segment(1, None, cache), cache[:, 0])


@torch.no_grad()
def test_recall_equals_dense_softmax_attention_float64():
    hmt = HMT(make_backbone(dtype=torch.float64), L, K, N, 0.5, recall_dim=24).double()
    summary, cache = random_recall_inputs()
    for valid in (2, 3, N):
        memory, weights = hmt.recall_memory(summary, cache, valid)
        q = summary @ hmt.w_q.weight.T                                         # (B, d_h)
        keys = cache[:, :valid] @ hmt.w_k.weight.T                             # (B, c, d_h)
        dense = torch.softmax(torch.einsum("bd,bcd->bc", q, keys) / math.sqrt(24), dim=-1)
        expected = torch.einsum("bc,bcd->bd", dense, cache[:, :valid])
        assert torch.allclose(memory, expected, rtol=0, atol=1e-12)
        assert torch.allclose(weights.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(weights[:, valid:], torch.zeros_like(weights[:, valid:]))
        assert bool((weights[:, :valid] > 0).all())


@torch.no_grad()
def test_recall_ignores_the_order_of_valid_slots():
    hmt = make_hmt(dtype=torch.float64, sharp_recall=True)
    summary, cache = random_recall_inputs(slots=N)
    memory, weights = hmt.recall_memory(summary, cache, valid=3)
    permuted = cache.clone()
    permuted[:, :3] = cache[:, [2, 0, 1]]
    memory_permuted, _ = hmt.recall_memory(summary, permuted, valid=3)
    assert torch.allclose(memory, memory_permuted, rtol=0, atol=1e-12)
    assert weights[:, :3].max() > 0.5                                      # recall is not uniform: a real check


# ------------------------------------------------------------------------------------------------------ 4: FIFO
@torch.no_grad()
def test_cache_holds_the_last_n_memories_in_fifo_order():
    hmt = make_hmt()
    calls = spy_backbone(hmt)
    _, state = hmt(make_ids(2, (N + 3) * L))
    memories = [hidden[:, -1] for h, hidden in calls if h.shape[1] in (L + 2, L + K + 2)]  # M_0 .. M_{N+2}
    assert len(memories) == N + 3 and state.n_done == N + 3
    held = [next(n for n, m in enumerate(memories) if torch.equal(m, state.cache[:, slot])) for slot in range(N)]
    assert sorted(held) == list(range(3, N + 3))
    assert all(n % N == slot for slot, n in enumerate(held))             # memory n lives in slot n mod N


# ----------------------------------------------------------------------------------------------- 5: bookkeeping
@torch.no_grad()
def test_pass_lengths_sensory_ids_and_counters():
    hmt = make_hmt(summary_source="previous")
    calls = spy_backbone(hmt)
    T = 3 * L + 5
    x = make_ids(2, T)
    logits, state = hmt(x)
    assert logits.shape == (2, T, 258)
    assert (state.n_done, state.offset) == (3, 5)
    assert torch.equal(state.prev_ids, x[:, 2 * L:3 * L]) and torch.equal(state.cur_ids[:, :5], x[:, 3 * L:])
    is_summary = [torch.equal(h[:, 0], hmt.summary_prompt.expand(h.shape[0], D)) for h, _ in calls]
    summary_calls = [h for (h, _), summary in zip(calls, is_summary) if summary]
    main_calls = [h for (h, _), summary in zip(calls, is_summary) if not summary]
    assert [h.shape[1] for h in summary_calls] == [J + 2]
    embed = hmt.backbone.embed
    for row, n in enumerate((2, 3)):                                      # one batched call: segments 2 and 3
        source = summary_calls[0][2 * row:2 * row + 2, 1:J + 1]
        assert torch.equal(source, embed(x[:, n * L - J:n * L]))         # the last j ids of segment n-1
    assert [h.shape[1] for h in main_calls] == [L + 2, L + K + 2, L + K + 2, 1 + K + 5]
    assert sum(h.shape[0] for h in summary_calls) == 2 * 2                # segments 2 and 3 recall, batch 2 each
    for n, h in enumerate(main_calls[1:], start=1):
        assert torch.equal(h[:, 1:1 + K], embed(x[:, n * L - K:n * L]))   # sensory = last k ids of segment n-1


@torch.no_grad()
def test_without_sensory_or_recall_the_passes_shrink():
    hmt = HMT(make_backbone(), L, sensory_len=0, cache_size=N, recall=False).eval()
    calls = spy_backbone(hmt)
    hmt(make_ids(1, 3 * L))
    assert [h.shape[1] for h, _ in calls] == [L + 2] * 3                  # no sensory slots, no summary pass


# ------------------------------------------------------------------------------------------------ 6: streaming
@torch.no_grad()
def test_stream_split_equals_full_at_every_split():
    hmt = make_hmt(sharp_recall=True, summary_source="previous")
    T = 3 * L + 5
    x = make_ids(2, T)
    full, full_state = hmt(x)
    for t in range(1, T):
        first, state = hmt(x[:, :t])
        second, end_state = hmt(x[:, t:], state)
        assert torch.allclose(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-5), f"split at {t}"
        assert (end_state.n_done, end_state.offset) == (full_state.n_done, full_state.offset)
    assert torch.allclose(end_state.cache, full_state.cache, rtol=0, atol=1e-5)


@torch.no_grad()
def test_token_by_token_decoding_equals_full():
    hmt = make_hmt(sharp_recall=True, summary_source="previous")
    x = make_ids(2, 3 * L + 5)
    full, _ = hmt(x)
    state, outs = None, []
    for t in range(x.shape[1]):
        y, state = hmt(x[:, t:t + 1], state)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_paper_mode_streams_exactly_only_at_segment_boundaries():
    hmt = make_hmt(dtype=torch.float64, sharp_recall=True, summary_source="current")
    x = make_ids(2, 3 * L + 5)
    full, full_state = hmt(x)
    for t in (L, 2 * L, 3 * L):
        first, state = hmt(x[:, :t])
        second, _ = hmt(x[:, t:], state)
        assert torch.allclose(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-12), f"split at {t}"
    t = 2 * L + 3                                                         # inside the summary span of segment 2
    first, state = hmt(x[:, :t])
    second, end_state = hmt(x[:, t:], state)
    assert torch.allclose(second, full[:, t:], rtol=0, atol=1e-12)       # the reopened segment recomputes P_2
    assert (end_state.n_done, end_state.offset) == (full_state.n_done, full_state.offset) == (3, 5)
    assert torch.allclose(end_state.cache, full_state.cache, rtol=0, atol=1e-12)
    assert (first[:, 2 * L:] - full[:, 2 * L:t]).abs().max() > 1e-9     # the look-ahead: P_2 saw 3 tokens, not j


# ------------------------------------------------------------------------------------------------ 7: causality
def test_strict_mode_logits_have_zero_gradient_to_later_embeddings():
    hmt = make_hmt(dtype=torch.float64, sharp_recall=True, summary_source="previous")
    x = make_ids(1, 3 * L)
    leaves = capture_embeddings(hmt)
    logits, _ = hmt(x)
    gen = torch.Generator().manual_seed(0)
    for s in range(3 * L):
        weights = torch.randn(logits[:, s].shape, generator=gen, dtype=torch.float64)
        grad, = torch.autograd.grad((logits[:, s] * weights).sum(), leaves[0], retain_graph=True)
        assert torch.equal(grad[:, s + 1:], torch.zeros_like(grad[:, s + 1:])), f"position {s} sees the future"
        assert grad[:, s].abs().max() > 0
        if s >= L:
            assert grad[:, :L].abs().max() > 0                           # segment 0 reaches later segments


@torch.no_grad()
def test_perturbing_a_token_leaves_earlier_logits_bitwise_unchanged():
    hmt = make_hmt(sharp_recall=True, summary_source="previous")
    x = make_ids(2, 3 * L)
    logits, _ = hmt(x)
    for t in (1, L - 1, L, 2 * L, 2 * L + J - 1, 3 * L - 1):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        other, _ = hmt(changed)
        assert torch.equal(other[:, :t], logits[:, :t]), f"a logit before {t} changed"
        assert not torch.equal(other[:, t:], logits[:, t:])


def test_paper_mode_leaks_summary_tokens_into_the_segment_start_from_segment_two():
    hmt = make_hmt(dtype=torch.float64, sharp_recall=True, summary_source="current")
    leaves = capture_embeddings(hmt)
    logits, _ = hmt(make_ids(1, 3 * L))
    for n in range(3):
        grad, = torch.autograd.grad(logits[:, n * L].sum(), leaves[0], retain_graph=True)
        leak = grad[:, n * L + J - 1].abs().max()
        if n <= 1:
            assert leak == 0, f"segment {n} has at most one cached memory: no look-ahead"
        else:
            assert leak > 0, "the paper's recall query reads the first j tokens of its own segment"


# ------------------------------------------------------------------------------------------------------ 8: BPTT
def test_last_segment_loss_reaches_every_memory_parameter():
    hmt = make_hmt().train()
    x = make_ids(2, 3 * L)
    logits, _ = hmt(x)
    F.cross_entropy(logits[:, 2 * L:-1].flatten(0, 1), x[:, 2 * L + 1:].flatten()).backward()
    for name in ("m0", "summary_prompt", "w_q.weight", "w_k.weight"):
        grad = hmt.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name


def test_detached_state_cuts_the_gradient_between_windows():
    for detach in (False, True):
        hmt = make_hmt()
        leaves = capture_embeddings(hmt)
        _, state = hmt(make_ids(2, 2 * L, seed=1))
        first_call = leaves[0]
        logits, _ = hmt(make_ids(2, L, seed=2), state.detach() if detach else state)
        grad, = torch.autograd.grad(logits.square().sum(), first_call, allow_unused=True)
        if detach:
            assert grad is None or not grad.any()
        else:
            assert grad is not None and grad.abs().max() > 0             # the path exists without detach


def test_checkpointed_segments_give_the_same_outputs_and_gradients():
    x = make_ids(2, 3 * L + 5)
    results = []
    for checkpointed in (False, True):
        hmt = make_hmt(dtype=torch.float64, checkpoint_segments=checkpointed).train()
        calls = spy_backbone(hmt)
        logits, _ = hmt(x)
        forward_calls = len(calls)
        logits.square().mean().backward()
        assert len(calls) - forward_calls == (4 if checkpointed else 0)  # backward re-runs the 4 main passes
        results.append((logits.detach(), {n: p.grad for n, p in hmt.named_parameters()}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.allclose(plain, recomputed, rtol=0, atol=1e-12)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, recomputed_grads[name], rtol=0, atol=1e-12), name


# ------------------------------------------------------------------------------------------------ 9: stage switch
def test_stage1_checkpoint_loads_strictly_into_stage2_and_trains_no_recall_parameters():
    stage1 = make_hmt(seed=0, recall=False).train()
    x = make_ids(2, 3 * L)
    logits, _ = stage1(x)
    logits.square().mean().backward()
    for name in ("summary_prompt", "w_q.weight", "w_k.weight"):
        param = stage1.get_parameter(name)
        assert param.grad is None and not param.requires_grad, name
    assert stage1.m0.grad is not None
    stage2 = make_hmt(seed=1, recall=True)
    stage2.load_state_dict(stage1.state_dict(), strict=True)
    assert all(p.requires_grad for p in stage2.parameters())
    with torch.no_grad():
        one, _ = stage1.eval()(x)
        two, _ = stage2(x)
    assert torch.equal(one[:, :2 * L], two[:, :2 * L])                   # P_1 = M_0 in both stages
    assert not torch.allclose(one[:, 2 * L:], two[:, 2 * L:], atol=1e-6)  # recall differs from n = 2 on


# --------------------------------------------------------------------------------------- 10: no sync, no state
def test_no_graph_breaks_and_no_hidden_state():
    hmt = make_hmt()
    x = make_ids(1, 2 * L + 1)                          # two closed segments, then segment 2 with summary and recall
    assert torch._dynamo.explain(hmt)(x).graph_break_count == 0
    with torch.no_grad():
        assert torch.equal(hmt(x)[0], hmt(x)[0])


def test_streaming_calls_make_no_host_sync(monkeypatch):
    """Mid-segment continuation, the trailing step and lazy recall never read a tensor value on the host."""
    hmt = make_hmt()
    x = make_ids(2, 3 * L + 2)

    def host_sync(*args, **kwargs):
        raise AssertionError("HMT.forward read a tensor value on the host")

    with torch.no_grad():
        _, state = hmt(x[:, :L - 1])
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, host_sync)
        for t in range(L - 1, 3 * L + 2, 7):
            _, state = hmt(x[:, t:t + 7], state)
        monkeypatch.undo()
    assert (state.n_done, state.offset) == (3, 2)


# ------------------------------------------------------------------------------------------- construction, API
@pytest.mark.parametrize("options, message", [
    (dict(sensory_len=L + 1), "sensory_len must be an integer in \\[0, segment_len=16\\]"),
    (dict(sensory_len=-1), "sensory_len must be an integer in"),
    (dict(summary_fraction=0.0), "summary_fraction must be in \\(0, 1\\]"),
    (dict(summary_fraction=1.5), "summary_fraction must be in \\(0, 1\\]"),
    (dict(cache_size=0), "cache_size must be an integer >= 1"),
    (dict(summary_source="next"), "summary_source must be 'previous' or 'current'"),
    (dict(recall_dim=0), "recall_dim must be an integer >= 1 or None"),
])
def test_bad_options_raise_one_clear_line(options, message):
    arguments = {**dict(segment_len=L, sensory_len=K, cache_size=N, summary_fraction=0.5), **options}
    with pytest.raises(ValueError, match=message):
        HMT(make_backbone(), **arguments)


@pytest.mark.parametrize("model_options", [dict(pattern=["bimamba"]),
                                           dict(attention=AttentionConfig(causal=False))])
def test_noncausal_backbone_is_refused(model_options):
    with pytest.raises(ValueError, match="the backbone must be causal, but blocks.0.mixer sees the future"):
        HMT(make_backbone(**model_options), L, K, N)


def test_backbone_without_hooks_and_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="lacks embed, forward_embeds, head; wrap a zoo.models.LanguageModel"):
        HMT(torch.nn.Linear(4, 4), 64)
    hmt = make_hmt()
    with pytest.raises(ValueError, match="input_ids must be \\(B, T\\) with T >= 1"):
        hmt(make_ids(2, L)[0])
    _, state = hmt(make_ids(2, 3))
    with pytest.raises(ValueError, match="the state holds 2 rows, input_ids 1"):
        hmt(make_ids(1, 3), state)


def test_windowed_and_titans_mac_backbones_stream_across_segments():
    """Pass lengths beyond a sliding window or a Titans MAC segment are fine: no zoo mixer has a maximum length."""
    from zoo.config import TitansMACConfig, TitansMemoryConfig

    backbones = [dict(attention=AttentionConfig(heads=2, window=8)),
                 dict(pattern=["titans_mac"], titans_mac=TitansMACConfig(
                     heads=2, segment_len=8, persistent_tokens=2, memory=TitansMemoryConfig(heads=2, chunk_size=4)))]
    for options in backbones:
        hmt = HMT(make_backbone(dtype=torch.float64, **options), L, K, N).double().eval()
        x = make_ids(1, 2 * L + 5)
        with torch.no_grad():
            full, _ = hmt(x)
            first, state = hmt(x[:, :L + 7])
            second, _ = hmt(x[:, L + 7:], state)
        assert torch.allclose(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-10)


def test_parameters_init_and_weight_decay_groups():
    backbone = make_backbone()
    hmt = HMT(backbone, L, K, N)
    own = {n: p for n, p in hmt.named_parameters() if not n.startswith("backbone.")}
    assert sorted(own) == ["m0", "summary_prompt", "w_k.weight", "w_q.weight"]
    assert sum(p.numel() for p in own.values()) == 2 * D * D + 2 * D
    wide = HMT(LanguageModel(ModelConfig(dim=128, depth=1)), 64)
    assert sum(p.numel() for n, p in wide.named_parameters() if not n.startswith("backbone.")) == 33_024  # 2·D·d_h + 2D
    assert hmt.no_weight_decay() == {f"backbone.{n}" for n in backbone.no_weight_decay()} | {"m0", "summary_prompt"}
    torch.manual_seed(5)
    hmt.reset_memory_parameters()
    torch.manual_seed(5)
    scale = backbone.embed.weight.std()
    assert torch.allclose(hmt.m0, torch.randn(D) * scale) and torch.allclose(hmt.summary_prompt, torch.randn(D) * scale)
    assert hmt.summary_len == J and HMT(backbone, 5, 2, 1, 0.1).summary_len == 1


def test_meta_init_then_reset_equals_a_normal_build():
    config = tiny_config().model
    meta, normal = check_meta_init_equals_init(lambda: HMT.from_config(config), seed=7)
    backbone = LanguageModel(config)
    torch.manual_seed(7)
    backbone.reset_parameters()
    assert torch.equal(normal.m0, torch.randn(D) * backbone.embed.weight.std())  # m0 ~ randn(D) * std(E)
    x = make_ids(2, 2 * L + 3)
    with torch.no_grad():
        assert torch.equal(normal(x)[0], meta(x)[0])


def test_state_detach_copies_every_tensor_without_history():
    hmt = make_hmt(summary_source="previous")
    _, state = hmt(make_ids(2, L + 3))
    detached = state.detach()
    assert isinstance(detached, HMTState) and (detached.n_done, detached.offset) == (1, 3)
    assert detached.cache.grad_fn is None and detached.mem.grad_fn is None
    leaves = [t for layer in detached.backbone_state for t in layer if isinstance(t, torch.Tensor)]
    assert leaves and all(t.grad_fn is None for t in leaves)
    assert state.cache.grad_fn is not None                               # the original keeps its graph


@torch.no_grad()
def test_greedy_generate_equals_rerunning_the_growing_sequence():
    hmt = make_hmt(sharp_recall=True)
    prompt = make_ids(2, L + 5)
    out = hmt.generate(prompt, max_new_tokens=L + 2)
    assert out.shape == (2, 2 * L + 7) and torch.equal(out[:, :L + 5], prompt)
    expected = prompt
    for _ in range(L + 2):
        logits, _ = hmt(expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------ config, export, training
def tiny_config(**hmt_options) -> Config:
    model = ModelConfig(architecture="hmt", dim=D, depth=2,
                        hmt=HMTConfig(segment_len=L, sensory_len=K, cache_size=N, **hmt_options))
    return Config(model=model)


def test_export_and_load_round_trip(tmp_path):
    config = tiny_config(summary_source="current", recall_dim=32)
    torch.manual_seed(0)
    model = build_model(config)
    assert isinstance(model, HMT) and model.summary_source == "current" and model.recall_dim == 32
    export_model(model, config, tmp_path / "hmt")
    loaded = load_export(tmp_path / "hmt")
    x = make_ids(2, 3 * L + 1)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model.eval()(x)[0])


def test_task_scores_last_segments_and_freezes_the_backbone():
    labels = torch.arange(5 * L).reshape(1, 5 * L)
    scored = last_segments_labels(labels, L, 2)
    assert torch.equal(scored[:, 3 * L:], labels[:, 3 * L:]) and bool((scored[:, :3 * L] == IGNORE_INDEX).all())
    assert torch.equal(last_segments_labels(labels, L, None), labels)
    assert torch.equal(last_segments_labels(labels, L, 9), labels)
    window = {"labels": labels}
    default, every = HMTTask(tiny_config()), HMTTask(tiny_config(loss_last_segments=None))
    assert default.loss_last_segments == 1                                # the reference: the last segment only
    assert torch.equal(default.training_labels(window), last_segments_labels(labels, L, 1))
    assert torch.equal(every.training_labels(window), labels)             # the option: every segment
    task = HMTTask(tiny_config(freeze_backbone=True))
    trained = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert sorted(trained) == ["m0", "summary_prompt", "w_k.weight", "w_q.weight"]
    optimizer = task.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


TINY_HMT = ["model.architecture=hmt", "model.dim=64", "model.depth=2", "model.hmt.segment_len=16",
            "model.hmt.sensory_len=4", "model.hmt.cache_size=4", "model.hmt.summary_fraction=0.5", "data.name=text",
            f"data.path={KJV_FIXTURE}", "data.batch_size=4", "data.eval_batch_size=8", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1", "optim.lr=1e-3", "optim.warmup_steps=2",
            "eval.max_batches=1"]


def test_two_stage_training_loss_decreases_and_stage2_starts_from_stage1(tmp_path):
    stage1 = [*TINY_HMT, f"run.root={tmp_path}", "run.name=s1", "model.hmt.recall=false", "data.seq_len=32",
              "trainer.max_steps=30"]
    assert run_zoo("train", *stage1) == 0
    stage2 = [*TINY_HMT, f"run.root={tmp_path}", "model.hmt.recall=true", "data.seq_len=64", "trainer.max_steps=30",
              f"init_from={tmp_path / 's1' / 'model'}"]
    assert run_zoo("train", *stage2, "run.name=s2") == 0
    for run in ("s1", "s2"):
        losses = list(train_losses(tmp_path / run).values())
        assert len(losses) == 30
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, run
    assert list(train_losses(tmp_path / "s2").values())[0] < list(train_losses(tmp_path / "s1").values())[0] - 1.0
    assert run_zoo("train", *stage2, "run.name=frozen", "trainer.max_steps=2", "model.hmt.freeze_backbone=true",
                   "model.hmt.loss_last_segments=1") == 0
    before, after = load_export(tmp_path / "s1" / "model"), load_export(tmp_path / "frozen" / "model")
    for (name, old), new in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(old, new) == name.startswith("backbone."), name


def test_zoo_generate_runs_on_an_hmt_export(tmp_path, capsys):
    config = tiny_config()
    torch.manual_seed(0)
    export_model(build_model(config), config, tmp_path / "hmt")
    capsys.readouterr()
    assert run_zoo("generate", f"checkpoint={tmp_path / 'hmt'}", "prompt=In the beginning", "max_new_tokens=40") == 0
    assert capsys.readouterr().out.startswith("In the beginning")


def test_bench_hmt_cost_and_bpb_modes_run_on_tiny_models(tmp_path):
    from benchmarks.bench_hmt import WindowedLM, bpb_rows, cost_rows
    from zoo.config import DataConfig

    rows = cost_rows([(1, 2 * L, 32)], depth=1, heads=2, segment_len=L, sensory_len=K, cache_size=N, repeats=1,
                     progress=False)
    assert [r["case"] for r in rows] == ["backbone, full context", "backbone, 16-token windows", "HMT"]
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in rows)
    config = tiny_config()
    config.data = DataConfig(name="text", path=str(KJV_FIXTURE))
    torch.manual_seed(0)
    export_model(build_model(config), config, tmp_path / "hmt")
    rows, info = bpb_rows(str(tmp_path / "hmt"), None, seq_len=3 * L + 5, batch_size=2, max_batches=1)
    assert [r["model"].split(" ")[0] for r in rows] == ["backbone,", "backbone,", "HMT"]
    assert all(math.isfinite(r["bpb"]) and r["scored_positions"] == 2 * (3 * L + 5) for r in rows)
    assert rows[2]["bpb"] != rows[1]["bpb"] and info["data"] == "text"
    backbone = make_backbone()
    x = make_ids(2, 2 * L + 5)
    with torch.no_grad():
        pieces = [backbone(x[:, s:s + L])[0] for s in range(0, x.shape[1], L)]
        assert torch.allclose(WindowedLM(backbone, L)(x)[0], torch.cat(pieces, dim=1), atol=1e-5)


def test_bundled_hmt_configs_describe_the_two_stages():
    from zoo.config import parse_args

    configs = {name: parse_args([f"config={name}.yaml"]).config for name in ("hmt", "hmt_stage1", "hmt_stage2")}
    for config in configs.values():
        options = config.model.hmt
        assert config.model.architecture == "hmt" and config.data.name == "kjv"
        assert (options.segment_len, options.sensory_len, options.cache_size) == (64, 8, 32)
        assert config.data.seq_len % options.segment_len == 0
    stage1, stage2 = configs["hmt_stage1"], configs["hmt_stage2"]
    assert not stage1.model.hmt.recall and stage1.data.seq_len == 2 * 64 and stage1.init_from is None
    assert stage2.model.hmt.recall and stage2.data.seq_len == 6 * 64 and stage2.init_from == "runs/hmt_stage1/model"
    model = build_model(stage2)
    assert isinstance(model, HMT) and model.summary_len == 32 and model.backbone.config.depth == 4

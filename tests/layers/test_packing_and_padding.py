"""Document boundaries (``cu_seqlens``) and left padding (``mask``) for every registered causal mixer: a packed
forward equals the documents run one by one, a padded row equals that row run alone, outputs and gradients."""
from __future__ import annotations

import inspect

import pytest
import torch

from tests.layers.contract import rel_err
from tests.layers.test_mixer_contract import CAUSAL, build, inputs
from zoo.registry import mixer_class

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def document_lengths(T: int) -> list[int]:
    """A document of length 1, then boundaries inside chunks and segments (at 1, 10, 27 with the contract's 4- and
    8-token grids), the rest of T."""
    return [1, 9, 17, T - 27]


def outputs_and_gradients(run, x: torch.Tensor, mixer, weight: torch.Tensor):
    """run(x) -> y; returns y and the gradients of <weight, y> w.r.t. x and every parameter."""
    x = x.detach().requires_grad_()
    y = run(x)
    params = [p for p in mixer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * weight).sum(), [x, *params], allow_unused=True)
    return [y] + [g for g in grads if g is not None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CAUSAL)
def test_packed_documents_equal_separate_calls(name, dtype):
    mixer, x = build(name, dtype=dtype), inputs(name, dtype=dtype)[:1]
    lengths = document_lengths(x.shape[1])
    x = x[:, :sum(lengths)]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    weight = torch.randn_like(x[..., :1].expand_as(x))

    def separate(x):
        return torch.cat([mixer(piece)[0] for piece in x.split(lengths, dim=1)], dim=1)

    packed = outputs_and_gradients(lambda x: mixer(x, cu_seqlens=cu_seqlens)[0], x, mixer, weight)
    expected = outputs_and_gradients(separate, x, mixer, weight)
    assert len(packed) == len(expected)
    for got, want in zip(packed, expected):
        assert rel_err(got, want) < TOL[dtype], f"{name}: packed vs separate {rel_err(got, want):.2e}"


@pytest.mark.parametrize("name", CAUSAL)
def test_packed_state_continues_every_document(name):
    mixer, x = build(name), inputs(name)[:1]
    lengths = document_lengths(x.shape[1] - 2)
    T = sum(lengths)
    _, state = mixer(x[:, :T], cu_seqlens=torch.tensor([0, *lengths]).cumsum(0))
    follow = x[:, T:T + 1].expand(len(lengths), 1, -1)                          # one more token per document
    continued, _ = mixer(follow, state)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        alone, _ = mixer(torch.cat([x[:, a:b], follow[k:k + 1]], dim=1))
        assert rel_err(continued[k], alone[0, -1:]) < TOL[torch.float64], f"{name}: document {k} continued"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CAUSAL)
def test_left_padded_rows_equal_rows_alone_and_decode_on(name, dtype):
    mixer, x = build(name, dtype=dtype), inputs(name, dtype=dtype)
    pads = [0, 5]                                                                 # off every chunk grid
    T = x.shape[1]
    mask = torch.arange(T) >= torch.tensor(pads).unsqueeze(1)                    # (B, T) left padding
    weight = torch.randn_like(x)
    padded = outputs_and_gradients(lambda x: mixer(x, mask=mask)[0] * mask.unsqueeze(-1), x, mixer, weight)
    y, state = mixer(x, mask=mask)
    assert torch.equal(y[1, :pads[1]], torch.zeros_like(y[1, :pads[1]])), "pads must get output 0"

    def alone(x):
        rows = [torch.nn.functional.pad(mixer(x[b:b + 1, p:])[0], (0, 0, p, 0)) for b, p in enumerate(pads)]
        return torch.cat(rows) * mask.unsqueeze(-1)

    expected = outputs_and_gradients(alone, x, mixer, weight)
    for got, want in zip(padded, expected):
        assert rel_err(got, want) < TOL[dtype], f"{name}: padded vs alone {rel_err(got, want):.2e}"
    step = torch.randn_like(x[:, :2])
    decoded = torch.cat([mixer(step[:, :1], state)[0], mixer(step[:, 1:], mixer(step[:, :1], state)[1])[0]], dim=1)
    for b, p in enumerate(pads):
        reference, _ = mixer(torch.cat([x[b:b + 1, p:], step[b:b + 1]], dim=1))
        assert rel_err(decoded[b], reference[0, -2:]) < TOL[dtype], f"{name}: decode after padding, row {b}"


@pytest.mark.parametrize("name", CAUSAL)
def test_bad_cu_seqlens_and_masks_are_one_clear_error(name):
    mixer, x = build(name), inputs(name)[:, :12]
    one = x[:1]
    bad = {"start at 0": torch.tensor([1, 12]), "increase": torch.tensor([0, 6, 6, 12]),
           "to T=12": torch.tensor([0, 6, 11]), "int32/int64": torch.tensor([0.0, 12.0])}
    for cu_seqlens in bad.values():
        with pytest.raises(ValueError, match="start at 0|increase strictly|non-decreasing|int32/int64"):
            mixer(one, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="batch size 1"):
        mixer(x, cu_seqlens=torch.tensor([0, 12]))
    right_padded = torch.ones(2, 12, dtype=torch.bool)
    right_padded[0, -3:] = False
    with pytest.raises(ValueError, match="left padding"):
        mixer(x, mask=right_padded)


@pytest.mark.parametrize("name", ["titans", "titans_mac"])
def test_titans_rows_at_different_grid_places_share_one_state(name):
    mixer, x = build(name), inputs(name)[:, :12]
    mask = torch.arange(12) >= torch.tensor([0, 3]).unsqueeze(1)              # rows of 12 and 9 tokens
    _, state = mixer(x, mask=mask)
    counts = state.pending_rows if name == "titans" else state.filled_rows
    assert counts.tolist() == ([0, 1] if name == "titans" else [4, 1])        # chunk 4, segment 8


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_mixers_declare_mask_and_cu_seqlens(name):
    cls = mixer_class(name)
    parameters = inspect.signature(cls.forward).parameters
    assert cls.takes_mask and cls.takes_cu_seqlens, f"{cls.__name__} must take mask= and cu_seqlens="
    for key in ("mask", "cu_seqlens"):
        assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.forward: {key} keyword-only"

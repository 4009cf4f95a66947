"""The mixer contract as check functions: streaming, decoding, causality, padding, init, compile and gradients.

Each check takes a built mixer and inputs and asserts one property of ``docs/adding-a-mixer.md``'s contract;
``tests/layers/test_mixer_contract.py`` runs them for every mixer in ``zoo.registry.MIXERS``.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def state_tensors(state) -> list[torch.Tensor]:
    """The floating-point tensors of a state (a NamedTuple, possibly nested), in order."""
    return [leaf for leaf in tree_leaves(state) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def check_stream_split(mixer, x: torch.Tensor, splits, tol: float) -> None:
    """``mixer(x[:, :t])`` then ``mixer(x[:, t:], state)`` equals ``mixer(x)`` for every split t."""
    full, _ = mixer(x)
    for t in splits:
        first, state = mixer(x[:, :t])
        second, _ = mixer(x[:, t:], state)
        err = rel_err(torch.cat([first, second], dim=1), full)
        assert err < tol, f"split at {t}: relative error {err:.2e}"


def check_three_way_split(mixer, x: torch.Tensor, splits, tol: float) -> None:
    """``x[:, :a]``, ``x[:, a:b]``, ``x[:, b:]`` in three calls (the state passed twice) equal ``mixer(x)`` for every
    ``(a, b)`` in splits."""
    full, _ = mixer(x)
    for a, b in splits:
        first, state = mixer(x[:, :a])
        second, state = mixer(x[:, a:b], state)
        third, _ = mixer(x[:, b:], state)
        err = rel_err(torch.cat([first, second, third], dim=1), full)
        assert err < tol, f"splits at {a} and {b}: relative error {err:.2e}"


def check_decode_equals_full(mixer, x: torch.Tensor, tol: float) -> None:
    """Token-by-token decoding with the carried state equals one full call."""
    full, _ = mixer(x)
    state, outs = None, []
    for t in range(x.shape[1]):
        y, state = mixer(x[:, t:t + 1], state)
        outs.append(y)
    err = rel_err(torch.cat(outs, dim=1), full)
    assert err < tol, f"decode vs full: relative error {err:.2e}"


def check_future_does_not_leak(mixer, x: torch.Tensor, t: int) -> None:
    """Changing inputs after position t leaves outputs at positions <= t unchanged."""
    y1, _ = mixer(x)
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y2, _ = mixer(x2)
    assert torch.equal(y1[:, :t + 1], y2[:, :t + 1]), "an output depends on a later input"
    assert not torch.allclose(y1[:, t + 1:], y2[:, t + 1:]), "the perturbation changed nothing (test is vacuous)"


def check_state_type(mixer, x: torch.Tensor) -> None:
    """The returned state is an instance of the declared ``State`` (None when the mixer declares none)."""
    _, state = mixer(x)
    _, continued = mixer(x, state)
    for returned in (state, continued):
        if mixer.State is None:
            assert returned is None, f"{type(mixer).__name__} declares State = None but returned {type(returned)}"
        else:
            assert isinstance(returned, mixer.State), \
                f"{type(mixer).__name__} declares State = {mixer.State.__name__} but returned {type(returned)}"


def check_future_changes_the_past(mixer, x: torch.Tensor) -> None:
    """A non-causal mixer returns no state and really is bidirectional: changing the last token changes the first
    output."""
    y1, state = mixer(x)
    assert state is None, f"a non-causal mixer returned a state ({type(state)})"
    x2 = x.clone()
    x2[:, -1] = torch.randn_like(x2[:, -1])
    y2, _ = mixer(x2)
    assert not torch.allclose(y1[:, 0], y2[:, 0]), "a non-causal mixer ignores later inputs"


def check_padding_is_invisible(mixer, x: torch.Tensor, mask: torch.Tensor, tol: float) -> None:
    """Outputs at real positions (mask True, one contiguous span per row) equal each row's unpadded run, and new
    content in the pads changes none of them."""
    padded, state = mixer(x, mask=mask)
    assert state is None, f"a non-causal mixer returned a state ({type(state)})"
    for row in range(x.shape[0]):
        real = mask[row].nonzero().squeeze(-1)  # (L,)
        alone, _ = mixer(x[row:row + 1, real])
        err = rel_err(padded[row:row + 1, real], alone)
        assert err < tol, f"row {row}: padded vs unpadded relative error {err:.2e}"
    x2 = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x))
    repadded, _ = mixer(x2, mask=mask)
    assert torch.equal(padded[mask], repadded[mask]), "the content of padded positions changed a real output"


def parameters_and_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (non-persistent buffers too)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def check_meta_init_equals_init(build, seed: int = 0):
    """``build()`` on the meta device, materialised with ``to_empty`` (NaN-filled) and reset under a seed, equals a
    normal ``build()`` reset under the same seed, tensor by tensor, and leaves nothing uninitialised.

    Returns (the materialised model, the normal one)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        meta = build()
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in parameters_and_buffers(meta).values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    torch.manual_seed(seed)
    meta.reset_parameters()
    torch.manual_seed(seed)
    normal = build()
    torch.manual_seed(seed)
    normal.reset_parameters()
    materialised, expected = parameters_and_buffers(meta), parameters_and_buffers(normal)
    assert materialised.keys() == expected.keys()
    for name, tensor in materialised.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"{name}: reset_parameters() leaves it uninitialised"
        assert tensor.dtype == expected[name].dtype, f"{name}: dtype {tensor.dtype} vs {expected[name].dtype}"
        assert torch.equal(tensor, expected[name]), f"{name}: meta build + reset differs from a normal build + reset"
    return meta, normal


def check_compile_matches_eager(mixer, x: torch.Tensor, prefix: int | None, tol: float) -> None:
    """``torch.compile(mixer, fullgraph=True)`` equals eager within tol on ``x``, and, given a prefix length,
    continuing the state of ``x[:, :prefix]`` on the rest. The eager backend: Dynamo must capture each forward as one
    graph (no graph break, no host sync), which then runs op by op."""
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    with torch.no_grad():
        calls = [(x,)]
        if prefix is not None:
            calls.append((x[:, prefix:], mixer(x[:, :prefix])[1]))
        for args in calls:
            expected, expected_state = mixer(*args)
            got, got_state = compiled(*args)
            where = "with a state" if len(args) == 2 else "without a state"
            err = rel_err(got, expected)
            assert err < tol, f"compiled vs eager {where}: relative error {err:.2e}"
            for got_leaf, expected_leaf in zip(state_tensors(got_state), state_tensors(expected_state), strict=True):
                err = rel_err(got_leaf, expected_leaf)
                assert err < tol, f"compiled vs eager state {where}: relative error {err:.2e}"


def check_gradients_reach_every_parameter(mixer, x: torch.Tensor) -> None:
    """A loss on the outputs and the returned state gives every trainable parameter a finite, nonzero gradient."""
    y, state = mixer(x)
    gen = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in [y, *state_tensors(state)])
    loss.backward()
    for name, param in mixer.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, f"{name}: no gradient reaches it"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient"
        assert param.numel() == 0 or param.grad.abs().sum() > 0, f"{name}: the gradient is zero"


def check_rejects_bad_inputs(mixer, x: torch.Tensor, foreign_state, other_width_state) -> None:
    """Each malformed input or state is a ValueError naming the mixer class: x of the wrong rank, width or dtype; a
    state of another type; for a mixer that carries a state, one of another batch size and one of a layer of another
    width."""
    name = type(mixer).__name__
    bad_calls = {
        "rank 2": (x[0], None),
        "wrong width": (x[..., :-1], None),
        "integer dtype": (x.long(), None),
        "another mixer's state": (x, foreign_state),
    }
    if mixer.State is not None and mixer.causal:
        bad_calls["wrong batch size"] = (x[:1], mixer(x)[1])
        bad_calls["another width's state"] = (x, other_width_state)
    for what, (bad_x, state) in bad_calls.items():
        with pytest.raises(ValueError, match=name) as caught:
            mixer(bad_x, state)
        assert "\n" not in str(caught.value), f"{what}: the error is not one line: {caught.value}"

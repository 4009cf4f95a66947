"""The mixer contract for every mixer in ``zoo.registry.MIXERS``: registering a mixer is all it takes to test it.

Each mixer is built the model's way, ``build_mixer(name, model_config)``, from a ``ModelConfig`` of width 32 with its
section's defaults, plus the few dotted overrides in ``CASES`` that make a short input cross several chunk and
segment boundaries. Which checks run follows what the class declares (``causal``, ``has_causal_option``,
``takes_mask``, ``State``; ``zoo/layers/base.py``). The checks themselves are in ``tests/layers/contract.py``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

from tests.layers.contract import (check_compile_matches_eager, check_decode_equals_full, check_future_changes_the_past,
                                   check_future_does_not_leak, check_gradients_reach_every_parameter,
                                   check_meta_init_equals_init, check_padding_is_invisible, check_rejects_bad_inputs,
                                   check_state_type, check_stream_split, check_three_way_split)
from zoo.config import parse_args
from zoo.layers.base import Mixer
from zoo.models.lm import build_mixer
from zoo.registry import MIXERS, mixer_class, mixer_section

DIM, BATCH = 32, 2


@dataclass(frozen=True)
class Case:
    """How the contract builds and feeds one mixer: dotted config overrides and the input length."""

    overrides: tuple[str, ...] = ()
    seq_len: int = 40


# Only for speed and coverage: smaller chunks and segments so that a short input crosses several of them. A mixer
# without an entry runs with its section's defaults. (Config sections are named here and nowhere else.)
CASES: dict[str, Case] = {
    "titans": Case(("model.titans.chunk_size=4",)),
    "titans_mac": Case(("model.titans_mac.memory.chunk_size=4", "model.titans_mac.segment_len=8",
                        "model.titans_mac.persistent_tokens=2")),
    "titans_mag": Case(("model.titans_mag.memory.chunk_size=4", "model.titans_mag.window=8",
                        "model.titans_mag.persistent_tokens=2")),
    "titans_mal": Case(("model.titans_mal.memory.chunk_size=4", "model.titans_mal.window=8",
                        "model.titans_mal.persistent_tokens=2")),
    "mamba2": Case(("model.mamba2.chunk_size=8", "model.mamba2.d_state=16", "model.mamba2.headdim=16",
                    "model.mamba2.ngroups=2")),
    # the gated delta rule's chunk (64 tokens) is not a config option: a longer input crosses it
    "gdn": Case(seq_len=72),
    "mom": Case(seq_len=72),
}

# Contract checks a mixer fails today, by (mixer, check): they run as strict xfails, so a fix shows up as a failure
# until its entry goes. Never add an entry to make a new mixer pass.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

NAMES = sorted(MIXERS)
CAUSAL = [name for name in NAMES if mixer_class(name).causal]
NON_CAUSAL = [name for name in NAMES if not mixer_class(name).causal]
WITH_CAUSAL_OPTION = [name for name in NAMES if mixer_class(name).has_causal_option]
TOL = 1e-10


def case(name: str) -> Case:
    return CASES.get(name, Case())


PARAMETRIZED_CHECKS: set[str] = set()


def params(names: list[str], check: str) -> list:
    """``names`` as pytest parameters of ``check``, with the marks of KNOWN_FAILURES."""
    PARAMETRIZED_CHECKS.add(check)
    out = []
    for name in names:
        marks = []
        if (name, check) in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[name, check], strict=True))
        out.append(pytest.param(name, marks=marks))
    return out


def model_config(name: str, *extra: str):
    """The ``ModelConfig`` a one-mixer model of width DIM would have: defaults, CASES overrides, then extra."""
    return parse_args([f"model.dim={DIM}", f"model.pattern=[{name}]", *case(name).overrides, *extra]).config.model


def build(name: str, *extra: str, dtype=torch.float64, seed: int = 0) -> Mixer:
    torch.manual_seed(seed)
    return build_mixer(name, model_config(name, *extra)).to(dtype)


def inputs(name: str, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, case(name).seq_len, DIM, generator=gen, dtype=torch.float64).to(dtype)


def three_way_splits(T: int) -> list[tuple[int, int]]:
    """Split pairs (a, b): the first cut at 1, inside and on the 4- and 8-token grids the overrides set; the second
    on chunk and segment boundaries (8, 16, 32, 64 when T allows) and at T − 1."""
    return [(a, b) for a in (1, 3, 4, 8, 13) for b in (a + 1, 8, 16, 32, 64, T - 1) if a < b < T]


# ----------------------------------------------------------------------------------------------- declarations
@pytest.mark.parametrize("name", params(NAMES, "declarations"))
def test_declares_its_capabilities(name):
    cls = mixer_class(name)
    assert issubclass(cls, Mixer), f"{cls.__name__} must derive from zoo.layers.base.Mixer"
    assert isinstance(cls.causal, bool) and isinstance(cls.has_causal_option, bool)
    assert cls.State is None or (issubclass(cls.State, tuple) and hasattr(cls.State, "_fields")), \
        f"{cls.__name__}.State must be a NamedTuple or None"
    assert cls.takes_mask == ("mask" in inspect.signature(cls.forward).parameters), \
        f"{cls.__name__}.takes_mask does not match whether forward accepts mask="
    assert cls.has_causal_option == ("causal" in inspect.signature(cls.__init__).parameters), \
        f"{cls.__name__}.has_causal_option does not match whether the constructor accepts causal="


# ----------------------------------------------------------------------------------------------- causal mixers
@pytest.mark.parametrize("name", params(CAUSAL, "stream_split"))
def test_stream_split_equals_one_call(name):
    mixer, x = build(name), inputs(name)
    assert mixer.causal, f"{name} declares causal but was built non-causal from the section defaults"
    check_stream_split(mixer, x, range(x.shape[1] + 1), TOL)


@pytest.mark.parametrize("name", params(CAUSAL, "three_way_split"))
def test_three_way_split_equals_one_call(name):
    mixer, x = build(name), inputs(name)
    check_three_way_split(mixer, x, three_way_splits(x.shape[1]), TOL)


@pytest.mark.parametrize("name", params(CAUSAL, "decode"))
def test_decode_equals_full_forward(name):
    mixer, x = build(name), inputs(name)
    check_decode_equals_full(mixer, x, TOL)


@pytest.mark.parametrize("name", params(CAUSAL, "future_leak"))
def test_future_does_not_leak(name):
    mixer, x = build(name), inputs(name)
    for t in (0, 5, 8, x.shape[1] // 2 + 1, x.shape[1] - 2):
        check_future_does_not_leak(mixer, x, t)


@pytest.mark.parametrize("name", params(CAUSAL, "state_type"))
def test_state_is_the_declared_type(name):
    mixer = build(name)
    assert mixer.State is not None, f"{name} is causal, so it must declare the State it carries"
    check_state_type(mixer, inputs(name)[:, :5])


# ----------------------------------------------------------------------------------------------- non-causal mixers
def _padding_mask(T: int) -> torch.Tensor:
    """Row 0 padded on the right (3 pads), row 1 real in the middle (2 pads left, 4 right)."""
    mask = torch.ones(BATCH, T, dtype=torch.bool)
    mask[0, T - 3:] = False
    mask[1, :2] = mask[1, T - 4:] = False
    return mask


def _check_non_causal(mixer, x: torch.Tensor) -> None:
    assert not mixer.causal
    check_future_changes_the_past(mixer, x)
    if mixer.takes_mask:
        check_padding_is_invisible(mixer, x, _padding_mask(x.shape[1]), TOL)


@pytest.mark.parametrize("name", params(NON_CAUSAL, "non_causal"))
def test_non_causal_mixer(name):
    _check_non_causal(build(name), inputs(name))


@pytest.mark.parametrize("name", params(WITH_CAUSAL_OPTION, "causal_option"))
def test_causal_option_off_is_non_causal(name):
    _check_non_causal(build(name, f"model.{mixer_section(name)}.causal=false"), inputs(name))


# ----------------------------------------------------------------------------------------------- every mixer
@pytest.mark.parametrize("name", params(NAMES, "meta_init"))
def test_meta_init_equals_init(name):
    config = model_config(name)
    check_meta_init_equals_init(lambda: build_mixer(name, config))


@pytest.mark.parametrize("name", params(NAMES, "compile"))
def test_compile_fullgraph_matches_eager(name):
    mixer = build(name, dtype=torch.float32)
    x = inputs(name, dtype=torch.float32)[:, :20]
    check_compile_matches_eager(mixer, x, prefix=7 if mixer.causal else None, tol=1e-5)


@pytest.mark.parametrize("name", params(NAMES, "gradients"))
def test_gradients_reach_every_parameter(name):
    check_gradients_reach_every_parameter(build(name), inputs(name))


def _foreign_state(name: str):
    """The state of the first registered mixer whose State type differs from ``name``'s."""
    own = mixer_class(name).State
    other = next(n for n in NAMES if mixer_class(n).State not in (None, own))
    return build(other)(inputs(other)[:, :5])[1]


@pytest.mark.parametrize("name", params(NAMES, "rejects_bad_inputs"))
def test_rejects_bad_inputs_and_states(name):
    mixer, x = build(name), inputs(name)[:, :5]
    other_width_state = None
    if mixer.State is not None and mixer.causal:
        narrow_config = parse_args([f"model.dim={DIM // 2}", f"model.pattern=[{name}]", *case(name).overrides])
        torch.manual_seed(0)
        narrow = build_mixer(name, narrow_config.config.model).double()
        other_width_state = narrow(x[..., :DIM // 2])[1]
    check_rejects_bad_inputs(mixer, x, _foreign_state(name), other_width_state)


def test_known_failures_name_registered_mixers_and_checks():
    for name, check in KNOWN_FAILURES:
        assert name in MIXERS and check in PARAMETRIZED_CHECKS, f"stale KNOWN_FAILURES entry ({name}, {check})"



# ----------------------------------------------------------------------------------------------- the checks bite
class _Broken(Mixer):
    """A registered mixer with one contract violation: ``leak`` (an output sees a later input), ``forget`` (the state
    is dropped), ``no_mask`` (mask= ignored), ``dead`` (a parameter outside the graph), ``uninitialised`` (reset skips
    a parameter)."""

    takes_mask = True

    def __init__(self, fault: str):
        super().__init__()
        self.fault, self.inner = fault, build("bimamba" if fault == "no_mask" else "mamba")
        self.causal = self.inner.causal
        with_extra = fault in ("dead", "uninitialised")
        self.extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64)) if with_extra else None

    def reset_parameters(self) -> None:
        self.inner.reset_parameters()

    def forward(self, x, state=None, mask=None):
        if self.fault == "no_mask":
            return self.inner(x)
        y, state = self.inner(x, None if self.fault == "forget" else state)
        return (y + 1e-3 * x.flip(1) if self.fault == "leak" else y), state


CATCHES = {  # check -> (how it runs, what its failure says)
    "leak": (lambda mixer, x: check_future_does_not_leak(mixer, x, 5), "depends on a later input"),
    "split": (lambda mixer, x: check_stream_split(mixer, x, [5], TOL), "split at 5"),
    "three_way_split": (lambda mixer, x: check_three_way_split(mixer, x, [(1, 5)], TOL), "splits at 1 and 5"),
    "decode": (lambda mixer, x: check_decode_equals_full(mixer, x, TOL), "decode vs full"),
    "padding": (lambda mixer, x: check_padding_is_invisible(mixer, x, _padding_mask(x.shape[1]), TOL),
                "padded vs unpadded"),
    "gradients": (lambda mixer, x: check_gradients_reach_every_parameter(mixer, x), "extra: no gradient"),
    "meta_init": (lambda mixer, x: check_meta_init_equals_init(lambda: _Broken(mixer.fault)),
                  r"extra: reset_parameters\(\) leaves it uninitialised"),
}


@pytest.mark.parametrize("fault, check", [("leak", "leak"), ("forget", "split"), ("forget", "three_way_split"),
                                          ("forget", "decode"), ("no_mask", "padding"), ("dead", "gradients"),
                                          ("uninitialised", "meta_init")])
def test_checks_catch_a_broken_mixer(fault, check):
    run, message = CATCHES[check]
    with pytest.raises(AssertionError, match=message):
        run(_Broken(fault), inputs("mamba")[:, :12])

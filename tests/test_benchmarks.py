"""The benchmark harness runs cases side by side and reports ratios (no timing assertions: tests never time)."""
import torch

from benchmarks.harness import Case, compare, markdown_table, time_case, zoo_mixer_case


def test_harness_times_cases_side_by_side_and_writes_a_table():
    linear = Case("linear", lambda dim: torch.nn.Linear(dim, dim))
    rows = compare([zoo_mixer_case("attention", heads=2), linear], [(1, 16, 32), (2, 8, 32)], repeats=1,
                   progress=False)
    assert [(r["case"], r["T"]) for r in rows] == [("zoo attention", 16), ("linear", 16), ("zoo attention", 8),
                                                   ("linear", 8)]
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
    table = markdown_table(rows)
    assert table.count("\n") == 5 and "| zoo attention | 1 | 16 | 32 | fwd+bwd |" in table


def test_saved_bytes_grow_with_sequence_length():
    case = zoo_mixer_case("attention", heads=2)
    short = time_case(case, (1, 16, 32), backward=True, repeats=1)
    long = time_case(case, (1, 64, 32), backward=True, repeats=1)
    assert long["memory_bytes"] > 2 * short["memory_bytes"] > 0


def test_failing_peer_is_reported_not_fatal():
    def broken(dim):
        raise RuntimeError("needs a GPU")

    rows = compare([Case("peer", broken)], [(1, 4, 8)], repeats=1, progress=False)
    assert rows[0]["error"] == "RuntimeError: needs a GPU"

"""Per-product MATCH thresholds: the choice under budgets, and the scans file's errors."""
from __future__ import annotations

import pytest

from rxvision_trainer.data import DataError
from rxvision_trainer.match_thresholds import Scan, choose_match_thresholds, rates_at, read_scans, split_check


def _scans(spec):
    """spec: {expected: {case: [matched_at, ...]}}"""
    return [Scan(e, case, v) for e, cases in spec.items() for case, vs in cases.items() for v in vs]


def test_each_product_gets_the_loosest_threshold_its_wrong_scans_allow():
    scans = _scans({
        # A's imitations reach 0.97: A must stay above them; B's look-alikes never come near.
        "A": {"own": [0.999, 0.99, 0.98, 0.96, 0.93], "unknown": [0.97, 0.5, None]},
        "B": {"own": [0.999, 0.95, 0.92, 0.85, None], "lookalike": [0.6, None]},
    })
    choice = choose_match_thresholds(scans, 0.999, lookalike_budget=0.0, unknown_budget=0.0, floor=0.9)
    assert choice.feasible
    assert choice.thresholds == pytest.approx({"A": 0.98, "B": 0.92})
    assert (choice.automation.matched, choice.automation.n) == (6, 10)
    assert choice.false_match_unknown.matched == 0 and choice.false_match_lookalike.matched == 0
    # One threshold for both would have to sit above 0.97 too: fewer MATCHes.
    assert rates_at(scans, lambda _: 0.98)[0].matched == 4


def test_a_budget_buys_matches_only_where_they_are_cheapest():
    scans = _scans({
        "A": {"own": [0.99, 0.95, 0.94, 0.93], "unknown": [0.96]},       # one false MATCH buys 3
        "B": {"own": [0.99, 0.95], "unknown": [0.97] + [None] * 98},     # one false MATCH buys 1
    })
    # 100 unknown scans, budget 0.01: exactly one false MATCH allowed; it goes to A.
    choice = choose_match_thresholds(scans, 0.999, lookalike_budget=0.0, unknown_budget=0.01, floor=0.9)
    assert choice.feasible
    assert choice.thresholds == pytest.approx({"A": 0.93, "B": 0.99})
    assert choice.false_match_unknown.matched == 1
    assert choice.automation.matched == 5


def test_the_floor_and_unreachable_budgets():
    scans = _scans({"A": {"own": [0.95, 0.85, 0.7]}, "B": {"own": [1.0, 0.99], "unknown": [1.0]}})
    choice = choose_match_thresholds(scans, 0.999, lookalike_budget=0.0, unknown_budget=0.0, floor=0.9)
    assert choice.thresholds["A"] == pytest.approx(0.95), "no threshold below the floor"
    assert not choice.feasible, "an imitation at probability 1.0 cannot be kept out"
    # Even 1.0 lets the imitation through, so strictness buys nothing there: B keeps its MATCHes.
    assert choice.thresholds["B"] == pytest.approx(0.99)
    assert choice.false_match_unknown.matched == 1


def test_products_without_own_scans_keep_min_confidence():
    scans = _scans({"A": {"own": [0.99]}, "C": {"unknown": [0.9995, 0.99]}})
    choice = choose_match_thresholds(scans, 0.999, lookalike_budget=0.0, unknown_budget=0.5, floor=0.9)
    assert "C" not in choice.thresholds
    assert choice.false_match_unknown.matched == 1  # C's 0.9995 passes its min_confidence 0.999
    assert choice.feasible


@pytest.mark.parametrize("body, message", [
    ("file,expected,verdict,matched_at\n", "header"),
    ("file,expected,case,matched_at\na.jpg,X,own\n", "3 fields"),
    ("file,expected,case,matched_at\na.jpg,X,mine,0.5\n", "case 'mine'"),
    ("file,expected,case,matched_at\na.jpg,X,own,1.5\n", "outside 0..1"),
    ("file,expected,case,matched_at\na.jpg,X,own,high\n", "not a number"),
    ("file,expected,case,matched_at\n", "no scans"),
    ("file,expected,case,matched_at,length_px\na.jpg,X,own,0.5,10\n", "header"),
    ("file,expected,case,matched_at,length_px,width_px\na.jpg,X,own,0.5\n", "4 fields, expected 6"),
])
def test_a_bad_scans_file_is_refused_by_line(tmp_path, body, message):
    p = tmp_path / "scans.csv"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_scans(p)


def test_the_scans_file_as_rxvisiond_writes_it(tmp_path):
    p = tmp_path / "scans.csv"
    p.write_text(
        'file,expected,case,matched_at,length_px,width_px\n"a,1.jpg",X,own,0.9990000,153.0,58.0\nb.jpg,X,unknown,,,\n',
        encoding="utf-8",
    )
    assert read_scans(p) == [Scan("X", "own", 0.999, "a,1.jpg"), Scan("X", "unknown", None, "b.jpg")]


def test_a_scans_file_from_before_the_size_columns_still_reads(tmp_path):
    p = tmp_path / "scans.csv"
    p.write_text('file,expected,case,matched_at\n"a,1.jpg",X,own,0.9990000\nb.jpg,X,unknown,\n', encoding="utf-8")
    assert read_scans(p) == [Scan("X", "own", 0.999, "a,1.jpg"), Scan("X", "unknown", None, "b.jpg")]


def test_the_split_check_catches_thresholds_that_fit_only_the_imitations_they_saw():
    import zlib
    files = [f"{i}.jpg" for i in range(200)]
    half = {f: zlib.crc32(f.encode()) % 2 for f in files}
    own = [Scan("A", "own", 0.999, f"own-{f}") for f in files]
    # Half 0 (chosen on) has harmless imitations; half 1 has imitations the model is sure of.
    unknown = [Scan("A", "unknown", None if half[f] == 0 else 0.9999, f) for f in files]
    automation, _, false_unknown = split_check(own + unknown, 1.0, 0.0, 0.005, 0.9)
    assert false_unknown.matched == false_unknown.n > 0, "the held-out half's imitations all get a MATCH"
    # The same imitations in both halves: a threshold above them holds on the other half.
    steady = [Scan("A", "unknown", 0.99, f) for f in files]
    automation, _, false_unknown = split_check(own + steady, 1.0, 0.0, 0.005, 0.9)
    assert false_unknown.matched == 0 and automation.matched == automation.n

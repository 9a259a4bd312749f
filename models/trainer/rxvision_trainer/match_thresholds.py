"""Per-product MATCH thresholds, calibrated against the verification safety targets.

A verification scan expects a product; the counter answers MATCH when every
pill's top-1 is that product with at least its MATCH threshold (and the
margin). One threshold for every product must be as strict as the product
whose look-alikes and imitations fool the model most; a threshold per
expected product lets a product whose look-alikes the model tells apart
answer MATCH at a lower probability while another stays strict.

Input: the verification scans of a calibration set (``rxvisiond eval --verify
--scans FILE`` on frames rendered with a seed neither training nor the
evaluation uses): for each scan the expected NDC, its case (``own``: MATCH
is right; ``lookalike``: a known look-alike of the pill expected; ``unknown``:
a product the model does not know, imitating or looking like the expected
one) and ``matched_at``, the lowest threshold at which it answers MATCH.

Choice (``choose_match_thresholds``): maximise the own scans answered MATCH
subject to the false MATCHes of both wrong cases staying within their budgets
(set below the targets, to leave room for the fresh evaluation). A Lagrange
multiplier turns the two budgets into one price per false MATCH; for a price,
each product independently takes the threshold with the most own MATCHes net
of priced false ones (ties to the stricter threshold); the price is swept over
a grid and the feasible choice with the most MATCHes is kept (when none is
feasible, the one least over budget, and the bundle is left unchanged). Candidate
thresholds are the own scans' values at or above ``floor`` (a MATCH never rests
on a lower probability), and 1.0.

Thresholds fitted to a few imitations per product can fit those few and not
the next ones, so ``split_check`` chooses on half of the images and measures
the other half; ``calibrate-match`` writes nothing unless that half stays
within the targets (twice the budgets).
"""
from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError

CASES = ("own", "lookalike", "unknown")
HEADER = ["file", "expected", "case", "matched_at"]
# Written since 2026-12-01 after HEADER: the pill's measured size, frame pixels (not used here).
SIZE_COLUMNS = ["length_px", "width_px"]


@dataclass(frozen=True)
class Scan:
    expected: str
    case: str
    matched_at: float | None
    file: str = ""


def read_scans(path: Path) -> list[Scan]:
    """The scans of ``rxvisiond eval --verify --scans FILE``; DataError names the first bad row."""
    scans = []
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header not in (HEADER, HEADER + SIZE_COLUMNS):
            raise DataError(f"{path}: header {header} is not {HEADER} (optionally followed by {SIZE_COLUMNS})")
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, expected {len(header)}")
            file, expected, case, raw = row[: len(HEADER)]
            if case not in CASES:
                raise DataError(f"{path}:{line}: case {case!r} is not one of {', '.join(CASES)}")
            if not expected.strip():
                raise DataError(f"{path}:{line}: empty expected NDC")
            matched_at = None
            if raw:
                try:
                    matched_at = float(raw)
                except ValueError:
                    raise DataError(f"{path}:{line}: matched_at {raw!r} is not a number") from None
                if not 0.0 <= matched_at <= 1.0:
                    raise DataError(f"{path}:{line}: matched_at {matched_at} is outside 0..1")
            scans.append(Scan(expected, case, matched_at, file))
    if not scans:
        raise DataError(f"{path}: no scans")
    return scans


@dataclass
class Rate:
    matched: int
    n: int

    @property
    def rate(self) -> float:
        return self.matched / self.n if self.n else float("nan")

    def __str__(self) -> str:
        return f"{self.rate:.4f} ({self.matched}/{self.n})"


@dataclass
class MatchChoice:
    thresholds: dict[str, float]          # per expected NDC
    automation: Rate                      # own scans answered MATCH
    false_match_lookalike: Rate
    false_match_unknown: Rate
    feasible: bool                        # both budgets met on the calibration scans
    price: float                          # the Lagrange multiplier chosen (inf: no false MATCH allowed)
    budgets: dict[str, float] = field(default_factory=dict)


def rates_at(scans: list[Scan], threshold_of) -> tuple[Rate, Rate, Rate]:
    """(automation, false MATCH look-alike, false MATCH unknown) with ``threshold_of(ndc)``."""
    out = {c: Rate(0, 0) for c in CASES}
    for s in scans:
        r = out[s.case]
        r.n += 1
        r.matched += int(s.matched_at is not None and np.float32(s.matched_at) >= np.float32(threshold_of(s.expected)))
    return out["own"], out["lookalike"], out["unknown"]


def choose_match_thresholds(scans: list[Scan], min_confidence: float, lookalike_budget: float,
                            unknown_budget: float, floor: float) -> MatchChoice:
    """See the module docstring. Products without own scans keep ``min_confidence``."""
    n = {c: sum(1 for s in scans if s.case == c) for c in CASES}
    allowed_l = math.floor(lookalike_budget * n["lookalike"] + 1e-9)
    allowed_u = math.floor(unknown_budget * n["unknown"] + 1e-9)
    products = sorted({s.expected for s in scans if s.case == "own"})
    values = {p: {c: [] for c in CASES} for p in products}
    for s in scans:
        if s.expected in values and s.matched_at is not None:
            values[s.expected][s.case].append(s.matched_at)
    # Per product: candidate thresholds (ascending) with their own / look-alike / unknown MATCH counts.
    table = {}
    for p in products:
        v = {c: np.sort(np.asarray(values[p][c], dtype=np.float32)) for c in CASES}
        cand = np.unique(np.concatenate([v["own"][v["own"] >= np.float32(floor)], np.float32([1.0])]))
        above = lambda a: len(a) - np.searchsorted(a, cand, side="left")  # noqa: E731  (count >= t)
        table[p] = (cand, above(v["own"]), above(v["lookalike"]), above(v["unknown"]))
    # The false MATCHes expecting products without own scans are fixed at min_confidence.
    rest = [s for s in scans if s.expected not in table]
    _, fixed_l, fixed_u = rates_at(rest, lambda _: min_confidence)
    unit_l, unit_u = 1.0 / max(allowed_l, 1), 1.0 / max(allowed_u, 1)

    def pick(price: float) -> tuple[dict[str, float], int, int, int]:
        chosen, g_sum, l_sum, u_sum = {}, 0, fixed_l.matched, fixed_u.matched
        for p, (cand, g, l, u) in table.items():
            cost = l * unit_l + u * unit_u
            if math.isinf(price):
                best = np.lexsort((-cand, -g, cost))[0]  # least cost, then most MATCHes, then strictest
            else:
                best = np.lexsort((-cand, -(g - price * cost)))[0]  # best score, ties to the strictest
            chosen[p] = float(cand[best])
            g_sum, l_sum, u_sum = g_sum + int(g[best]), l_sum + int(l[best]), u_sum + int(u[best])
        return chosen, g_sum, l_sum, u_sum

    best = None
    for price in [*np.geomspace(1e-2, 1e5, 141), math.inf]:
        chosen, g, l, u = pick(float(price))
        feasible = l <= allowed_l and u <= allowed_u
        # Feasible: the most MATCHes, then the fewest false ones; else the least over budget.
        key = (True, g, -(l + u)) if feasible else (False, -(l * unit_l + u * unit_u), g)
        if best is None or key > best[0]:
            best = (key, chosen, float(price), feasible)
    _, chosen, price, feasible = best
    own, lk, un = rates_at(scans, lambda ndc: chosen.get(ndc, min_confidence))
    return MatchChoice(chosen, own, lk, un, feasible, price,
                       {"lookalike": lookalike_budget, "unknown": unknown_budget, "floor": floor})


def split_check(scans: list[Scan], min_confidence: float, lookalike_budget: float, unknown_budget: float,
                floor: float) -> tuple[Rate, Rate, Rate]:
    """Whether thresholds chosen this way hold on frames they were not chosen on: the images are split in
    two halves by a hash of their file name (all scans of an image in one half), thresholds are chosen on
    one half and the other half's (automation, false MATCH look-alike, false MATCH unknown) returned."""
    half = [zlib.crc32(s.file.encode("utf-8")) % 2 for s in scans]
    chosen_on = [s for s, h in zip(scans, half) if h == 0]
    held_out = [s for s, h in zip(scans, half) if h == 1]
    choice = choose_match_thresholds(chosen_on, min_confidence, lookalike_budget, unknown_budget, floor)
    return rates_at(held_out, lambda ndc: choice.thresholds.get(ndc, min_confidence))


def card_section(choice: MatchChoice, uniform: tuple[Rate, Rate, Rate], min_confidence: float, source: str,
                 held_out: tuple[Rate, Rate, Rate] | None = None) -> str:
    ts = np.asarray(sorted(choice.thresholds.values()), dtype=np.float64)
    q = lambda x: float(np.quantile(ts, x)) if len(ts) else float("nan")  # noqa: E731
    never = int((ts >= 1.0).sum())
    lines = [
        "## Per-product MATCH thresholds",
        "",
        f"Calibrated on {source}. A verification answers MATCH when the expected product is on top with at "
        "least its own threshold (`thresholds.match_confidence`); MISMATCH and identification keep "
        f"`min_confidence` = {min_confidence}. Budgets on the calibration scans: false MATCH with a look-alike "
        f"expected <= {choice.budgets['lookalike']}, for an unknown product <= {choice.budgets['unknown']} "
        f"(half the targets or less, room for fresh frames); no threshold below {choice.budgets['floor']}.",
        "",
        "| on the calibration scans | one threshold ({}) | per product |".format(min_confidence),
        "|---|---|---|",
        f"| automation (own NDC expected) | {uniform[0]} | {choice.automation} |",
        f"| false MATCH, look-alike expected | {uniform[1]} | {choice.false_match_lookalike} |",
        f"| false MATCH, unknown product | {uniform[2]} | {choice.false_match_unknown} |",
        "",
        f"{len(ts)} products: thresholds min {ts.min() if len(ts) else float('nan'):.5f}, "
        f"quartiles {q(0.25):.5f} / {q(0.5):.5f} / {q(0.75):.5f}, max {ts.max() if len(ts) else float('nan'):.5f}; "
        f"{never} at 1.0 (MATCH only at a saturated probability)."
        + ("" if choice.feasible else " **The budgets could not be met on the calibration scans.**"),
    ]
    if held_out is not None:
        lines += ["", f"Chosen on half of the calibration images and measured on the other half: automation "
                      f"{held_out[0]}, false MATCH look-alike {held_out[1]}, unknown product {held_out[2]}."]
    return "\n".join(lines) + "\n"

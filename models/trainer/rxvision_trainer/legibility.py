"""How well a bundle tells a pill from its impostors: the legibility probe of issue 17.

An impostor (``rxvision-synth dataset --impostors``) is a formulary product
with one imprint character of the face in view altered: a product that does
not exist. With an expected NDC the counter answers MATCH only when the
expected product is on top with at least the MATCH threshold, so the score a
MATCH rests on is the expected product's probability where it is the top-1,
and 0 where another class is (``match_score``). A genuine crop is scored with
its own NDC expected, an impostor with the NDC it imitates.

``separation`` reports, for each allowed share of impostors, the share of
genuine crops that pass the threshold letting at most that share of
impostors through, and the AUC of the two score sets. It reports it for every
genuine crop and for those whose face in view carries an imprint (the only
ones an impostor competes with: the renderer draws impostors only on such
faces, so a blank face passes any threshold its product's scores allow).

The crops must be cut as the bundle's counter cuts them (the recipe's
``--pill-crops`` with the bundle's crop and margin): the probe runs the model
on each image as it is, with the reference preprocessing.

    python -m rxvision_trainer legibility BUNDLE --data DIR [--impostor-rates 0.01,0.002] [--json]
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import DataError, Sample, read_dataset


def match_score(probs: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """(N, C) probabilities and (N,) expected class indices -> the probability of the expected class
    where it is the top-1 (ties to the lower index, as argmax), 0 elsewhere."""
    rows = np.arange(len(probs))
    return np.where(probs.argmax(axis=1) == expected, probs[rows, expected], 0.0)


def passing_share(genuine: np.ndarray, impostors: np.ndarray, rate: float) -> tuple[float, float]:
    """The share of ``genuine`` scores above the threshold that lets at most ``rate`` of ``impostors``
    pass (a pass is a score strictly above it), and that threshold."""
    if len(impostors) == 0 or len(genuine) == 0:
        raise ValueError("need genuine and impostor scores")
    ranked = np.sort(impostors)[::-1]
    allowed = int(np.floor(rate * len(ranked) + 1e-9))
    threshold = float(ranked[allowed]) if allowed < len(ranked) else -np.inf
    return float(np.mean(genuine > threshold)), threshold


def auc(genuine: np.ndarray, impostors: np.ndarray) -> float:
    """P(a genuine score > an impostor score), ties counted half (Mann-Whitney U / (n m))."""
    ranked = np.sort(impostors)
    below = np.searchsorted(ranked, genuine, side="left")
    not_above = np.searchsorted(ranked, genuine, side="right")
    return float(np.mean(below + 0.5 * (not_above - below)) / len(ranked))


@dataclass
class Row:
    faces: str        # "text faces" or "all faces"
    genuine: int
    impostors: int
    passing: dict     # impostor rate -> share of genuine crops passing
    thresholds: dict  # impostor rate -> the threshold
    auc: float


def separation(genuine_scores: np.ndarray, genuine_has_text: np.ndarray, impostor_scores: np.ndarray,
               rates: Sequence[float]) -> list[Row]:
    rows = []
    for faces, mask in (("text faces", genuine_has_text), ("all faces", np.ones(len(genuine_scores), bool))):
        g = genuine_scores[mask]
        if len(g) == 0:
            continue
        passing, thresholds = {}, {}
        for r in rates:
            passing[r], thresholds[r] = passing_share(g, impostor_scores, r)
        rows.append(Row(faces, int(len(g)), int(len(impostor_scores)), passing, thresholds,
                        auc(g, impostor_scores)))
    return rows


def split_samples(samples: Sequence[Sample], class_of: dict[str, int]) -> tuple[list[Sample], list[Sample]]:
    """Genuine crops of the bundle's products and impostors of them; other rows (held-out products,
    impostors of held-out products) are left out."""
    genuine = [s for s in samples if not s.imitates and s.ndc in class_of]
    impostors = [s for s in samples if s.imitates and s.imitates in class_of]
    return genuine, impostors


def probe(bundle: Path, data: Path, rates: Sequence[float]) -> list[Row]:
    from .export import ort_predict, session

    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        labels = json.loads((bundle / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{bundle}: not a bundle ({e})") from None
    class_of = {entry["ndc"]: i for i, entry in enumerate(labels)}
    samples = read_dataset(data)
    genuine, impostors = split_samples(samples, class_of)
    if not genuine or not impostors:
        raise DataError(f"{data}: needs genuine crops of the bundle's products and impostors of them "
                        f"(found {len(genuine)} and {len(impostors)}; render with --impostors)")
    if any(s.imprint is None for s in genuine):
        raise DataError(f"{data}: labels.csv has no imprint column (rendered before it existed): "
                        "text faces cannot be told from blank ones")
    size = int(manifest["input"]["width"])
    sess = session(bundle / manifest["model"])
    g_probs = ort_predict(sess, genuine, size)
    i_probs = ort_predict(sess, impostors, size)
    g_scores = match_score(g_probs, np.asarray([class_of[s.ndc] for s in genuine]))
    i_scores = match_score(i_probs, np.asarray([class_of[s.imitates] for s in impostors]))
    has_text = np.asarray([bool(s.imprint.replace(";", "").strip()) for s in genuine])
    return separation(g_scores, has_text, i_scores, rates)


def report(rows: Sequence[Row]) -> str:
    rates = list(rows[0].passing) if rows else []
    head = "| faces | genuine | impostors | " + " | ".join(f"passing at {r:.1%} of impostors" for r in rates)
    lines = [head + " | AUC |", "|" + "---|" * (len(rates) + 4)]
    for r in rows:
        cells = " | ".join(f"{r.passing[x]:.3f} (> {r.thresholds[x]:.6g})" for x in rates)
        lines.append(f"| {r.faces} | {r.genuine} | {r.impostors} | {cells} | {r.auc:.3f} |")
    return "\n".join(lines)


def as_json(rows: Sequence[Row]) -> str:
    return json.dumps([{**asdict(r), "passing": {str(k): v for k, v in r.passing.items()},
                        "thresholds": {str(k): v for k, v in r.thresholds.items()}} for r in rows])

"""The reference profile (``profile.json``): what held-out data looked like to this model.

The fleet compares each device's telemetry windows with it to detect drift
(``../shared/design/SYSTEM.md``, Drift and retraining). Two parts:

- **Drift features** (pill aspect ratio, mean R/G/B, brightness, blur,
  texture contrast, entropy) are computed by the Rust code the appliance runs,
  through ``rxvision-synth features DIR`` (CSV on stdout, one row per image,
  a header naming the columns). The trainer never re-implements them: without
  ``--synth`` the profile carries no drift features and says so.
- **Confidence**: the int8 model's top-1 probability and top-1/top-2 margin on
  the held-out in-formulary images (and, separately, on held-out products).

Each distribution is stored as summary statistics, 101 quantiles (enough for a
two-sample KS or Wasserstein estimate) and a fixed-bin histogram; features get
20 equal-width bins between their 0.5th and 99.5th percentiles, plus
under/overflow counts. Layout (``schema_version`` 1):

    {"schema_version": 1, "source": ..., "n_images": N,
     "features": {"available": bool, "note": str, "tool": str|null,
                  "columns": {name: DIST}},
     "confidence": {"top1": DIST, "margin": DIST},
     "confidence_unknown": {"top1": DIST, "margin": DIST} | null,
     "class_mix": {ndc: count}}
    DIST = {"n", "mean", "std", "min", "max", "quantiles": [101 values],
            "histogram": {"edges": [..], "counts": [..], "underflow", "overflow"}}
"""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import LABELS_HEADER, Sample, write_labels_csv

log = logging.getLogger("rxvision_trainer")

SCHEMA_VERSION = 1
CONF_EDGES = [round(i / 20, 2) for i in range(21)]


def _r(x: float) -> float:
    return float(round(float(x), 6))


def distribution(values: Sequence[float], edges: Sequence[float] | None = None, bins: int = 20) -> dict:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0}
    if edges is None:
        lo, hi = np.percentile(v, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max()) + 1e-6
        edges = np.linspace(lo, hi, bins + 1)
    edges = np.asarray(edges, np.float64)
    counts, _ = np.histogram(v, bins=edges)  # values outside the edges only in underflow/overflow
    return {
        "n": int(len(v)),
        "mean": _r(v.mean()), "std": _r(v.std()), "min": _r(v.min()), "max": _r(v.max()),
        "quantiles": [_r(q) for q in np.percentile(v, np.arange(101))],
        "histogram": {"edges": [_r(e) for e in edges], "counts": [int(c) for c in counts],
                      "underflow": int((v < edges[0]).sum()), "overflow": int((v > edges[-1]).sum())},
    }


def confidence_block(probs: np.ndarray) -> dict:
    s = np.sort(probs, axis=1)
    return {"top1": distribution(s[:, -1], CONF_EDGES), "margin": distribution(s[:, -1] - s[:, -2], CONF_EDGES)}


def run_features(synth: str | Path, samples: Sequence[Sample]) -> tuple[dict[str, list[float]], str]:
    """Runs ``synth features DIR`` over the samples (linked into a scratch dataset); numeric columns by name."""
    synth = str(synth)
    with tempfile.TemporaryDirectory(prefix="rxv-features-") as td:
        root = Path(td)
        rows = []
        for i, s in enumerate(samples):
            rel = f"images/{i:06d}{s.path.suffix.lower()}"
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(s.path, dst)
            except OSError:
                shutil.copyfile(s.path, dst)
            rows.append({k: getattr(s, k) for k in LABELS_HEADER} | {"file": rel})
        write_labels_csv(root, rows)
        cmd = [synth, "features", str(root)]
        log.info("drift features: %s (%d images)", " ".join(cmd), len(samples))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        text = proc.stdout
    reader = csv.DictReader(io.StringIO(text))
    cols: dict[str, list[float]] = {c: [] for c in (reader.fieldnames or [])}
    n_rows = 0
    for row in reader:
        n_rows += 1
        for c, v in row.items():
            try:
                cols[c].append(float(v))
            except (TypeError, ValueError):
                cols[c].append(float("nan"))
    numeric = {c: v for c, v in cols.items() if v and np.isfinite(np.asarray(v)).mean() > 0.5}
    if n_rows == 0 or not numeric:
        raise RuntimeError(f"{' '.join(cmd)} printed no numeric CSV columns")
    if n_rows != len(samples):
        log.warning("drift features: %d rows for %d images", n_rows, len(samples))
    return numeric, " ".join([Path(synth).name, "features"])


def build_profile(samples: Sequence[Sample], probs_int8: np.ndarray, probs_unknown: np.ndarray | None,
                  synth: str | Path | None, source: str) -> dict:
    features: dict = {"available": False, "tool": None, "columns": {}}
    if synth:
        cols, tool = run_features(synth, samples)
        features = {"available": True, "tool": tool,
                    "note": f"computed by the Rust drift-feature code ({tool}) on the held-out images",
                    "columns": {c: distribution(v) for c, v in sorted(cols.items())}}
    else:
        features["note"] = ("drift features NOT profiled: the trainer was run without --synth (the path to "
                            "rxvision-synth, whose `features` command is the only implementation); this "
                            "profile holds the confidence distribution only")
        log.warning("no --synth given: profile.json holds the confidence distribution only, no drift features")
    mix: dict[str, int] = {}
    for s in samples:
        mix[s.ndc] = mix.get(s.ndc, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "n_images": len(samples),
        "features": features,
        "confidence": confidence_block(probs_int8),
        "confidence_unknown": confidence_block(probs_unknown) if probs_unknown is not None and len(probs_unknown) else None,
        "class_mix": dict(sorted(mix.items())),
    }

"""Confidence calibration and the counter's decision thresholds.

- ``fit_temperature``: temperature scaling (Guo et al., 2017): one scalar T
  minimising the validation negative log-likelihood of softmax(logits / T).
  The NLL is convex in 1/T, so a golden-section search on log T finds it.
  The bundle folds 1/T into the final Gemm, so the shipped Softmax already
  outputs calibrated probabilities.
- ``ece``: expected calibration error with equal-width confidence bins (15).
- ``choose_thresholds``: the shipped ``min_confidence`` / ``min_margin``.
  A verdict is UNCERTAIN when top-1 < min_confidence or top-1 - top-2 <
  min_margin (the Rust counter's rule). With held-out products (open set), the
  pair is chosen so that at least ``target`` of their images come back
  UNCERTAIN while as many in-formulary images as possible are accepted *and*
  right; without them, the defaults are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.02, hi: float = 50.0) -> float:
    """The T > 0 minimising NLL(softmax(logits / T)); 1.0 when there is nothing to fit."""
    if len(labels) == 0:
        return 1.0
    a, b = math.log(lo), math.log(hi)
    f = lambda lt: nll(logits / math.exp(lt), labels)  # noqa: E731
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(math.exp(0.5 * (a + b)))


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # bin i holds confidences in (i/n, (i+1)/n]; 0 goes to the first bin
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for i in range(n_bins):
        m = idx == i
        if m.any():
            total += abs(correct[m].mean() - conf[m].mean()) * m.mean()
    return float(total)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 probability, top-1 minus top-2) per row."""
    s = np.sort(probs, axis=1)
    return s[:, -1], s[:, -1] - s[:, -2]


def uncertain_mask(probs: np.ndarray, min_confidence: float, min_margin: float) -> np.ndarray:
    p1, margin = top2(probs)
    # float32 like the Rust side, which compares f32 probabilities with f32 thresholds
    p1, margin = p1.astype(np.float32), margin.astype(np.float32)
    return (p1 < np.float32(min_confidence)) | (margin < np.float32(min_margin))


@dataclass
class ThresholdChoice:
    min_confidence: float
    min_margin: float
    open_set_uncertain_rate: float | None    # share of held-out-product images that are UNCERTAIN
    in_formulary_uncertain_rate: float        # share of in-formulary images that are UNCERTAIN
    in_formulary_accepted_accuracy: float     # top-1 accuracy among in-formulary images accepted
    in_formulary_accepted_correct: float      # share of in-formulary images accepted and right
    in_formulary_wrong_accept_rate: float     # share of in-formulary images accepted and wrong
    target_met: bool | None
    method: str

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


CONFIDENCE_GRID = np.unique(np.concatenate([
    np.round(np.arange(0.0, 0.99, 0.01), 4),
    [0.99, 0.992, 0.994, 0.996, 0.998, 0.999, 0.9995, 0.9999, 0.99999, 0.999999],
]))
MARGIN_GRID = np.round(np.arange(0.0, 0.96, 0.05), 4)


def _rates(probs_in, labels_in, c, m):
    unc = uncertain_mask(probs_in, c, m)
    right = probs_in.argmax(axis=1) == labels_in
    acc = ~unc
    n = max(1, len(labels_in))
    return (float(unc.mean()) if len(unc) else float("nan"),
            float(right[acc].mean()) if acc.any() else float("nan"),
            float((acc & right).sum() / n),
            float((acc & ~right).sum() / n))


def choose_thresholds(probs_in: np.ndarray, labels_in: np.ndarray, probs_out: np.ndarray | None,
                      target: float = 0.90, default: tuple[float, float] = (0.6, 0.2)) -> ThresholdChoice:
    """Picks (min_confidence, min_margin); see the module docstring."""
    if probs_out is None or len(probs_out) == 0:
        c, m = default
        unc, acc, ok, wrong = _rates(probs_in, labels_in, c, m)
        return ThresholdChoice(c, m, None, unc, acc, ok, wrong, None,
                               "defaults (no held-out products to choose on)")
    p1_in, mg_in = top2(probs_in)
    p1_out, mg_out = top2(probs_out)
    p1_in, mg_in, p1_out, mg_out = (a.astype(np.float32) for a in (p1_in, mg_in, p1_out, mg_out))
    right = probs_in.argmax(axis=1) == labels_in
    best_key, best = None, None
    fallback_key, fallback = None, None
    top1 = float(right.mean()) if len(right) else 0.0
    for c in CONFIDENCE_GRID:
        c32 = np.float32(c)
        for m in MARGIN_GRID:
            m32 = np.float32(m)
            out_rate = float(((p1_out < c32) | (mg_out < m32)).mean())
            acc_in = ~((p1_in < c32) | (mg_in < m32))
            ok = float((acc_in & right).mean())
            wrong = float((acc_in & ~right).mean())
            # prefer: most accepted-and-right, then fewest wrong accepts, then the lowest thresholds
            key = (ok, -wrong, -c, -m)
            if out_rate >= target and (best_key is None or key > best_key):
                best_key, best = key, (float(c), float(m))
            # target out of reach: the highest rate that still accepts >= 90% of what the model gets right
            if ok >= 0.9 * top1 and out_rate > 0:
                fkey = (out_rate, ok, -wrong)
                if fallback_key is None or fkey > fallback_key:
                    fallback_key, fallback = fkey, (float(c), float(m))
    met = best is not None
    if met:
        c, m = best
    elif fallback is not None:
        c, m = fallback
    else:  # nothing flags any held-out image without gutting in-formulary acceptance
        c, m = default
    unc, acc, ok, wrong = _rates(probs_in, labels_in, c, m)
    out_rate = float(uncertain_mask(probs_out, c, m).mean())
    method = (f"grid search on validation: >= {target:.0%} of held-out-product images UNCERTAIN, then most "
              f"in-formulary images accepted and right" if met else
              f"target {target:.0%} UNCERTAIN on held-out products NOT reachable; chose the highest rate that keeps "
              f">= 90% of the right in-formulary answers" if fallback is not None else
              f"target {target:.0%} UNCERTAIN on held-out products NOT reachable and no threshold flags them "
              f"without rejecting most in-formulary images; kept the defaults")
    return ThresholdChoice(float(c), float(m), out_rate, unc, acc, ok, wrong, met, method)

"""Reading the imprint: the characters on the face in view, counted.

A class head learns what tells the *known* products apart; a pill with one
imprint character altered (an impostor: a product that does not exist) looks
like the product it imitates to such a head unless the network has learnt to
read that character. Outlier exposure teaches it slowly, impostor by impostor
(ARCHITECTURE.md, "Impostors by the hundred"). A second head that *reads*
gets a lesson from every character of every training image instead.

What it reads is the imprint's **bag of characters**: for each character of
``ALPHABET``, how often it appears on the face in view - 0, 1, 2, or 3 and more
(``COUNT_BINS``). The bag needs no reading order, so it is the same for an
upright crop turned 180 degrees, for a two-line imprint and for a capsule's
cap-and-body text; and it always tells an impostor from the product it
imitates, because the renderer changes one character to *another* of its kind,
which changes two counts. Characters outside the alphabet (``-``, ``/``, the
``;`` between lines) are not counted: the renderer never alters them.

The head's output is, per character, a distribution over the count bins; the
probability that the face in view carries exactly a given imprint is the
product over the alphabet of the probabilities of its counts
(``bag_log_likelihood``). A product's imprint check takes the better of its
two faces (a blank face is the empty bag).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
COUNT_BINS = 4  # 0, 1, 2, 3 or more
UNKNOWN = -1    # a bag entry to ignore (an outlier whose imprint nobody drew)
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def bag(imprint: str) -> np.ndarray:
    """The count bin of every ``ALPHABET`` character in ``imprint`` (SPL form), int64 (len(ALPHABET),)."""
    out = np.zeros(len(ALPHABET), np.int64)
    for c in imprint:
        i = _INDEX.get(c)
        if i is not None:
            out[i] = min(out[i] + 1, COUNT_BINS - 1)
    return out


def bags(imprints: Sequence[str | None]) -> np.ndarray:
    """``bag`` of each imprint, (N, len(ALPHABET)); a row of ``UNKNOWN`` where the imprint is None."""
    out = np.full((len(imprints), len(ALPHABET)), UNKNOWN, np.int64)
    for i, text in enumerate(imprints):
        if text is not None:
            out[i] = bag(text)
    return out


def imprint_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the count bins, (N, len(ALPHABET), COUNT_BINS) logits against (N, len(ALPHABET))
    bins; rows of ``UNKNOWN`` are ignored (0 when every row is). No host synchronisation: the mask stays a tensor."""
    flat_t = target.reshape(-1)
    known = flat_t != UNKNOWN
    each = torch.nn.functional.cross_entropy(logits.reshape(-1, COUNT_BINS), flat_t.clamp(min=0), reduction="none")
    return (each * known).sum() / known.sum().clamp(min=1)


def bag_log_likelihood(log_probs: np.ndarray, bag_rows: np.ndarray) -> np.ndarray:
    """log P(the face carries exactly that bag) for each image: (N, A, B) log-probabilities of the count bins and
    (N, A) bins -> (N,)."""
    n, a, _ = log_probs.shape
    return log_probs[np.arange(n)[:, None], np.arange(a)[None, :], bag_rows].sum(axis=1)

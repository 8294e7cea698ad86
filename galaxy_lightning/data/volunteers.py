"""Simulated Galaxy Zoo volunteers: vote counts for the GZ DECaLS DR5 decision tree, given by
noisy volunteers to the galaxies the simulator draws.

What a careful volunteer would answer follows from what was drawn (:func:`true_answers`: a bar
of high surface brightness is "strong", a pitch angle under 15 degrees "tight", a bulge of 45%
of the light "dominant"...). Each galaxy is shown to 5-15 volunteers (30% of galaxies, as when
Galaxy Zoo retired galaxies early) or 30-45. Each volunteer walks the tree: a question is asked
only after the answers that lead to it, so a volunteer who calls a spiral "smooth" is then asked
how round it is, and the later questions get fewer votes than the first. A volunteer gives the
careful answer with a probability that falls with the galaxy's faintness and with the difficulty
of the question (counting arms is harder than seeing a disk); a wrong answer is more often a
neighbouring one for ordered answers (bulge sizes, roundness, winding, arm counts, disturbance).
A question with no careful answer (the volunteer is on a branch the galaxy does not belong to)
is answered at random. Deterministic: every galaxy's votes come from their own generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from galaxy_lightning.decision_tree import TREES, DecisionTree

#: The tree the simulated volunteers answer.
TREE: DecisionTree = TREES["gz_decals_dr5"]
#: Questions whose answers are ordered (a mistake is more often a neighbouring answer).
ORDERED = {"bulge-size", "how-rounded", "spiral-winding", "spiral-arm-count", "merging"}
#: How much harder than the first question each question is (the care factor's exponent).
DIFFICULTY = {"smooth-or-featured": 1.0, "disk-edge-on": 0.8, "has-spiral-arms": 1.0, "bar": 1.6,
              "bulge-size": 2.2, "how-rounded": 1.4, "edge-on-bulge": 2.0,
              "spiral-winding": 2.2, "spiral-arm-count": 2.6, "merging": 1.4}


def true_answers(truth: Mapping[str, Any]) -> dict[str, str]:
    """The answer a careful volunteer gives to each question on the galaxy's own path."""
    label = truth["label"]
    answers: dict[str, str] = {}
    if label == 0:  # a merger: its components decide smooth or featured
        answers["smooth-or-featured"] = "featured-or-disk" if truth["disks"] else "smooth"
        answers["merging"] = "merger" if truth["separation"] < 12 else "major-disturbance"
        answers.update({"disk-edge-on": "no", "has-spiral-arms": "no", "bar": "no",
                        "bulge-size": "moderate", "how-rounded": "in-between"})
        return answers
    answers["merging"] = "none"
    if label in (1, 2):
        answers["smooth-or-featured"] = "smooth"
        q = truth["axis_ratio"]
        answers["how-rounded"] = "round" if q >= 0.72 else "in-between" if q >= 0.5 \
            else "cigar-shaped"
        return answers
    answers["smooth-or-featured"] = "featured-or-disk"
    bt = truth["bulge_to_total"]
    if label == 6:
        answers["disk-edge-on"] = "yes"
        answers["edge-on-bulge"] = "none" if bt < 0.2 else \
            "boxy" if truth["bulge_axis_ratio"] < 0.75 else "rounded"
        return answers
    answers["disk-edge-on"] = "no"
    answers["has-spiral-arms"] = "yes"
    bar = truth["bar"]
    answers["bar"] = "strong" if bar >= 0.17 else "weak" if bar > 0 else "no"
    answers["bulge-size"] = "dominant" if bt >= 0.45 else "large" if bt >= 0.3 else \
        "moderate" if bt >= 0.18 else "small" if bt >= 0.08 else "none"
    pitch = truth["pitch"]
    answers["spiral-winding"] = "tight" if pitch < 15 else "medium" if pitch < 25 else "loose"
    answers["spiral-arm-count"] = str(truth["arms"])
    return answers


def _answer_probabilities(n: int, careful: int | None, care: float, ordered: bool) -> np.ndarray:
    """Probabilities of a question's ``n`` answers for one volunteer."""
    if careful is None:
        return np.full(n, 1.0 / n)
    distance = np.abs(np.arange(n) - careful).astype(np.float64)
    others = 1.0 / (1.0 + 2.0 * distance) if ordered else np.ones(n)
    others[careful] = 0.0
    p = (1.0 - care) * others / others.sum()
    p[careful] = care
    return p


def simulate_votes(truth: Mapping[str, Any], rng: np.random.Generator,
                   tree: DecisionTree = TREE) -> np.ndarray:
    """One galaxy's vote counts for every answer of ``tree`` (float32, in the tree's order)."""
    careful = true_answers(truth)
    volunteers = int(rng.integers(5, 16) if rng.random() < 0.3 else rng.integers(30, 46))
    # brighter galaxies are easier: 0.92 of careful answers at the bright end, 0.72 faint
    brightness = min(1.0, max(0.0, math.log10(truth["flux"]) - 4.3))
    care = 0.72 + 0.2 * brightness
    given = np.zeros((volunteers, tree.num_answers), dtype=bool)  # each volunteer's answers
    counts = np.zeros(tree.num_answers, dtype=np.float32)
    for question, (a, b) in zip(tree.questions, tree.slices):
        if question.after:
            leads = [tree.answer_columns.index(c) for c in question.after]
            asked = given[:, leads].any(1)
        else:
            asked = np.ones(volunteers, dtype=bool)
        n = int(asked.sum())
        if n == 0:
            continue
        truth_answer = careful.get(question.name)
        index = question.answers.index(truth_answer) if truth_answer is not None else None
        p = _answer_probabilities(b - a, index, care ** DIFFICULTY[question.name],
                                  question.name in ORDERED)
        chosen = rng.choice(b - a, size=n, p=p)
        given[np.flatnonzero(asked), a + chosen] = True
        counts[a:b] = np.bincount(chosen, minlength=b - a)
    return counts

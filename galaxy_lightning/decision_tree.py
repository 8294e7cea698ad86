"""Galaxy Zoo decision trees: the questions, their answers, which answer leads to which question,
and the likelihood of the volunteers' vote counts.

A Galaxy Zoo catalog holds, for every galaxy and every question of the tree, the number of
volunteers who gave each answer (``<question>_<answer>``) and how many answered the question
(``<question>_total-votes``). Later questions are asked only of the volunteers who gave certain
earlier answers (``disk-edge-on`` only after ``smooth-or-featured_featured-or-disk``), so the
totals differ per question and per galaxy, and are 0 for questions nobody reached.

The model predicts, for each question, Dirichlet concentrations ``alpha`` over its answers; the
volunteers' counts are a draw from the Dirichlet-multinomial of ``alpha`` and the total
(Walmsley et al. 2022, MNRAS 509, 3966: Zoobot's likelihood). A galaxy seen by 40 volunteers thus
constrains the model more than one seen by 5, and a question with no votes contributes nothing.
The expected vote fraction of an answer is ``alpha_a / sum(alpha)``.

Two trees are built in (:data:`TREES`): ``gz_decals_dr5`` (GZ DECaLS DR5 and DR8, the columns of
the public release's ``gz_decals_volunteers_5`` catalog) and ``gz_decals_dr12`` (the DR1/DR2
campaigns, ``gz_decals_volunteers_1_and_2``). Another tree (GZ2, a project's own) is a mapping
``{name, questions: [{name, answers, after}]}``, e.g. from a YAML file (:meth:`DecisionTree.from_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from galaxy_lightning.errors import ConfigError, DataError

#: Column suffix of the number of volunteers who answered a question.
TOTAL = "total-votes"


@dataclass(frozen=True)
class Question:
    """One question: its answers, in the order of the model's outputs, and the answers (as
    ``<question>_<answer>``) that lead to it; none: asked of every volunteer."""

    name: str
    answers: tuple[str, ...]
    after: tuple[str, ...] = ()

    def column(self, answer: str) -> str:
        return f"{self.name}_{answer}"

    @property
    def columns(self) -> list[str]:
        """The catalog's vote-count columns of this question's answers."""
        return [self.column(a) for a in self.answers]

    @property
    def total_column(self) -> str:
        return f"{self.name}_{TOTAL}"


@dataclass(frozen=True)
class DecisionTree:
    """The questions of a Galaxy Zoo decision tree, in the order of the model's output groups."""

    name: str
    questions: tuple[Question, ...]
    _slices: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.questions:
            raise ConfigError(f"decision tree '{self.name}' has no questions")
        names = [q.name for q in self.questions]
        if len(set(names)) != len(names):
            raise ConfigError(f"decision tree '{self.name}': question names repeat: {names}")
        seen: set[str] = set()
        for q in self.questions:
            if len(q.answers) < 2 or len(set(q.answers)) != len(q.answers):
                raise ConfigError(f"decision tree '{self.name}': question '{q.name}' needs at least "
                                  f"two distinct answers (has {list(q.answers)})")
            unknown = [a for a in q.after if a not in seen]
            if unknown:
                raise ConfigError(f"decision tree '{self.name}': question '{q.name}' follows "
                                  f"{unknown}, not an answer of an earlier question (answers are "
                                  "named <question>_<answer>; list a question after those it "
                                  "follows)")
            seen.update(q.columns)
        bounds = np.cumsum([0] + [len(q.answers) for q in self.questions])
        object.__setattr__(self, "_slices", tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist())))

    # -- shape ------------------------------------------------------------------------------------
    @property
    def num_answers(self) -> int:
        """The width of the model's output: every answer of every question."""
        return self._slices[-1][1]

    @property
    def slices(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of each question's answers in an answer vector."""
        return self._slices

    @property
    def answer_columns(self) -> list[str]:
        return [c for q in self.questions for c in q.columns]

    def question(self, name: str) -> Question:
        for q in self.questions:
            if q.name == name:
                return q
        raise ConfigError(f"decision tree '{self.name}' has no question '{name}' (questions: "
                          f"{', '.join(q.name for q in self.questions)})")

    # -- catalogs ----------------------------------------------------------------------------------
    def check_columns(self, columns: Sequence[str], path: Any) -> None:
        """Refuse, in one line, a catalog without a column of this tree."""
        have = set(columns)
        missing = [c for q in self.questions for c in (*q.columns, q.total_column)
                   if c not in have]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                              else "")
            raise DataError(f"{path}: the decision tree '{self.name}' needs vote-count columns "
                            f"<question>_<answer> and <question>_{TOTAL}; missing {shown}; choose "
                            "the tree of this catalog (gz_decals_dr5, gz_decals_dr12) or give "
                            "your own")

    def counts(self, column: Any, path: Any) -> tuple[np.ndarray, dict[str, int]]:
        """The (N, answers) vote counts of a catalog (``column(name)`` returns one column; a
        missing cell counts 0 votes), and per question the number of rows whose answers do not
        add up to its ``total-votes``. The likelihood uses the answers' sum: in the public GZ
        DECaLS DR5 catalog the totals of some questions include votes for answers that were
        renamed during the campaign (e.g. 32 merging votes of 35), so a mismatch is recorded,
        not refused."""
        counts = np.stack([np.nan_to_num(np.asarray(column(c), dtype=np.float64))
                           for c in self.answer_columns], axis=1)
        if (counts < 0).any():
            raise DataError(f"{path}: negative vote counts; the columns of tree '{self.name}' "
                            "must hold numbers of volunteers")
        differ = {}
        for q, (a, b) in zip(self.questions, self.slices):
            total = np.nan_to_num(np.asarray(column(q.total_column), dtype=np.float64))
            differ[q.name] = int((np.abs(counts[:, a:b].sum(1) - total) > 0.5).sum())
        return counts.astype(np.float32), differ

    # -- serialisation (input spec, checkpoints, exports) ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "questions": [{"name": q.name, "answers": list(q.answers), "after": list(q.after)}
                              for q in self.questions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionTree:
        try:
            questions = tuple(Question(str(q["name"]), tuple(str(a) for a in q["answers"]),
                                       tuple(str(a) for a in q.get("after") or ()))
                              for q in data["questions"])
            return cls(str(data.get("name", "custom")), questions)
        except (KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"a decision tree is {{name, questions: [{{name, answers, after}}]}} "
                              f"({type(err).__name__}: {err})") from None


def tree(spec: str | Mapping[str, Any] | DecisionTree) -> DecisionTree:
    """A built-in tree by name, or a tree given as a mapping."""
    if isinstance(spec, DecisionTree):
        return spec
    if isinstance(spec, str):
        if spec not in TREES:
            raise ConfigError(f"unknown decision tree '{spec}'; built in: {', '.join(TREES)}, or "
                              "give {name, questions: [{name, answers, after}]}")
        return TREES[spec]
    return DecisionTree.from_dict(spec)


def _tree(name: str, questions: list[tuple[str, list[str], list[str]]]) -> DecisionTree:
    return DecisionTree(name, tuple(Question(n, tuple(a), tuple(f)) for n, a, f in questions))


#: The built-in trees. GZ DECaLS DR5/DR8: the questions and dependencies of Walmsley et al. (2022)
#: Fig. 4 (as in Zoobot's ``decals_dr5_ortho`` schema); "merging" is asked after both answers
#: that are galaxies. DR1/DR2 (Zoobot's "dr12"): the earlier campaigns' answers.
TREES: dict[str, DecisionTree] = {
    "gz_decals_dr5": _tree("gz_decals_dr5", [
        ("smooth-or-featured", ["smooth", "featured-or-disk", "artifact"], []),
        ("disk-edge-on", ["yes", "no"], ["smooth-or-featured_featured-or-disk"]),
        ("has-spiral-arms", ["yes", "no"], ["disk-edge-on_no"]),
        ("bar", ["strong", "weak", "no"], ["disk-edge-on_no"]),
        ("bulge-size", ["dominant", "large", "moderate", "small", "none"], ["disk-edge-on_no"]),
        ("how-rounded", ["round", "in-between", "cigar-shaped"], ["smooth-or-featured_smooth"]),
        ("edge-on-bulge", ["boxy", "none", "rounded"], ["disk-edge-on_yes"]),
        ("spiral-winding", ["tight", "medium", "loose"], ["has-spiral-arms_yes"]),
        ("spiral-arm-count", ["1", "2", "3", "4", "more-than-4", "cant-tell"],
         ["has-spiral-arms_yes"]),
        ("merging", ["none", "minor-disturbance", "major-disturbance", "merger"],
         ["smooth-or-featured_smooth", "smooth-or-featured_featured-or-disk"]),
    ]),
    "gz_decals_dr12": _tree("gz_decals_dr12", [
        ("smooth-or-featured", ["smooth", "featured-or-disk", "artifact"], []),
        ("disk-edge-on", ["yes", "no"], ["smooth-or-featured_featured-or-disk"]),
        ("has-spiral-arms", ["yes", "no"], ["disk-edge-on_no"]),
        ("bar", ["yes", "no"], ["disk-edge-on_no"]),
        ("bulge-size", ["dominant", "obvious", "none"], ["disk-edge-on_no"]),
        ("how-rounded", ["completely", "in-between", "cigar-shaped"],
         ["smooth-or-featured_smooth"]),
        ("edge-on-bulge", ["boxy", "none", "rounded"], ["disk-edge-on_yes"]),
        ("spiral-winding", ["tight", "medium", "loose"], ["has-spiral-arms_yes"]),
        ("spiral-arm-count", ["1", "2", "3", "4", "more-than-4"], ["has-spiral-arms_yes"]),
        ("merging", ["merger", "tidal-debris", "both", "neither"],
         ["smooth-or-featured_smooth", "smooth-or-featured_featured-or-disk"]),
    ]),
}


# -- the likelihood ------------------------------------------------------------------------------
def dirichlet_multinomial_nll(counts: torch.Tensor, concentrations: torch.Tensor,
                              tree: DecisionTree) -> torch.Tensor:
    """Negative log-likelihood of each question's vote counts, ``(N, questions)``.

    ``counts`` and ``concentrations`` are ``(N, answers)`` (concentrations > 0). Per question,
    with ``n`` the votes and ``A = sum(alpha)``::

        log p(k | n, alpha) = log n! - sum log k_a!
                              + log Gamma(A) - log Gamma(n + A)
                              + sum [log Gamma(k_a + alpha_a) - log Gamma(alpha_a)]

    which is exactly 0 for a question nobody answered (n = 0): it contributes nothing.
    """
    counts = counts.to(concentrations.dtype)
    log_coeff = torch.lgamma(counts + concentrations) - torch.lgamma(concentrations) \
        - torch.lgamma(counts + 1)
    losses = []
    for a, b in tree.slices:
        k, alpha = counts[:, a:b], concentrations[:, a:b]
        n, total = k.sum(1), alpha.sum(1)
        log_p = torch.lgamma(n + 1) + torch.lgamma(total) - torch.lgamma(n + total) \
            + log_coeff[:, a:b].sum(1)
        losses.append(-log_p)
    return torch.stack(losses, dim=1)


def expected_fractions(concentrations: torch.Tensor, tree: DecisionTree) -> torch.Tensor:
    """The expected vote fraction of every answer, ``alpha_a / sum(alpha)`` per question."""
    parts = [concentrations[:, a:b] / concentrations[:, a:b].sum(1, keepdim=True)
             for a, b in tree.slices]
    return torch.cat(parts, dim=1)


# -- the task: what a run learns ------------------------------------------------------------------
#: The keys of ``task`` (``conf/task/``) and their defaults for a decision tree.
TASK_DEFAULTS: dict[str, Any] = {"name": "classification", "loss": "dirichlet",
                                 "class_weight": 1.0, "confident": 0.8, "min_votes": 10,
                                 "questions": None}


def check_task(task: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``task`` config with its defaults, refused in one line when a value is wrong."""
    task = dict(task or {})
    unknown = sorted(set(task) - set(TASK_DEFAULTS))
    if unknown:
        raise ConfigError(f"task has unknown keys {unknown}; it takes {list(TASK_DEFAULTS)}")
    task = {**TASK_DEFAULTS, **task}
    if task["name"] not in ("classification", "decision_tree"):
        raise ConfigError(f"task.name={task['name']!r} must be classification or decision_tree "
                          "(task=classification or task=decision_tree)")
    if task["loss"] not in ("dirichlet", "fractions"):
        raise ConfigError(f"task.loss={task['loss']!r} must be dirichlet (the Dirichlet-"
                          "multinomial of the vote counts) or fractions (soft-label cross-entropy)")
    if not (isinstance(task["class_weight"], (int, float)) and task["class_weight"] >= 0):
        raise ConfigError(f"task.class_weight={task['class_weight']} must be 0 or more")
    if not (isinstance(task["confident"], (int, float)) and 0.5 <= task["confident"] <= 1):
        raise ConfigError(f"task.confident={task['confident']} must be a vote fraction in "
                          "[0.5, 1]")
    if not (isinstance(task["min_votes"], int) and task["min_votes"] >= 1):
        raise ConfigError(f"task.min_votes={task['min_votes']} must be a positive integer")
    questions = task["questions"]
    if questions is not None and (not isinstance(questions, (list, tuple)) or not questions
                                  or not all(isinstance(q, str) for q in questions)):
        raise ConfigError(f"task.questions={questions} must be null (every question) or a "
                          "non-empty list of question names")
    return task


def question_mask(tree: DecisionTree, questions: Sequence[str] | None) -> list[bool]:
    """Which of the tree's questions a run learns (``task.questions``; None: all); a name the
    tree does not have is refused in one line."""
    if questions is None:
        return [True] * len(tree.questions)
    for name in questions:
        tree.question(name)  # refuses an unknown name, listing the tree's questions
    return [q.name in questions for q in tree.questions]


def concentrations(outputs: torch.Tensor) -> torch.Tensor:
    """Dirichlet concentrations in [1, 100] from the network's tree outputs (Zoobot's range:
    at least 1, so that no answer is ruled out; at most 100, so that no prediction is certain)."""
    return 1.0 + 99.0 * torch.sigmoid(outputs.float())


def tree_risk(outputs: torch.Tensor, votes: torch.Tensor, tree: DecisionTree,
              loss: str = "dirichlet", learned: Sequence[bool] | None = None) -> torch.Tensor:
    """The mean over galaxies of the summed per-question loss of the vote counts: the
    Dirichlet-multinomial negative log-likelihood, or (``fractions``) the cross-entropy of each
    question's softmax against its observed vote fractions; questions without votes add 0, and
    so do those ``learned`` leaves out (a single-question model)."""
    learned = list(learned) if learned is not None else [True] * len(tree.questions)
    if loss == "dirichlet":
        nll = dirichlet_multinomial_nll(votes, concentrations(outputs), tree)
        return nll[:, torch.tensor(learned, device=nll.device)].sum(1).mean()
    total = outputs.new_zeros(len(outputs), dtype=torch.float32)
    for (a, b), keep in zip(tree.slices, learned):
        if not keep:
            continue
        k = votes[:, a:b].float()
        n = k.sum(1, keepdim=True)
        fractions = k / n.clamp(min=1)
        total = total - (fractions * torch.log_softmax(outputs[:, a:b].float(), dim=1)).sum(1)
    return total.mean()


def predicted_fractions(outputs: torch.Tensor, tree: DecisionTree,
                        loss: str = "dirichlet") -> torch.Tensor:
    """Every answer's predicted vote fraction: the Dirichlet's mean, or each group's softmax."""
    if loss == "dirichlet":
        return expected_fractions(concentrations(outputs), tree)
    return torch.cat([torch.softmax(outputs[:, a:b].float(), dim=1) for a, b in tree.slices], 1)


def fraction_intervals(concentrations: torch.Tensor, tree: DecisionTree,
                       level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``level`` interval of every answer's vote fraction under the predicted
    Dirichlet: its marginal is ``Beta(alpha_a, sum(alpha) - alpha_a)`` (scipy's exact
    quantiles; torch's Beta has no inverse CDF)."""
    from scipy.stats import beta  # deferred: only predictions ask for intervals

    alpha = concentrations.detach().double().cpu().numpy()
    low, high = np.empty_like(alpha), np.empty_like(alpha)
    tail = (1 - level) / 2
    for a, b in tree.slices:
        rest = alpha[:, a:b].sum(1, keepdims=True) - alpha[:, a:b]
        low[:, a:b] = beta.ppf(tail, alpha[:, a:b], rest)
        high[:, a:b] = beta.ppf(1 - tail, alpha[:, a:b], rest)
    return torch.from_numpy(low).float(), torch.from_numpy(high).float()

"""Galaxy Zoo decision trees: the schema against real catalogs, and the Dirichlet-multinomial
likelihood of vote counts against direct evaluations by hand."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from galaxy_lightning.config import validate_config
from galaxy_lightning.data.catalog import CatalogSource
from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.data.synthetic import SyntheticGalaxies, simulate
from galaxy_lightning.decision_tree import (
    TREES,
    DecisionTree,
    concentrations,
    dirichlet_multinomial_nll,
    expected_fractions,
    question_mask,
    tree,
    tree_risk,
)
from galaxy_lightning.errors import CheckpointError, ConfigError, DataError
from galaxy_lightning.evaluate import evaluate
from galaxy_lightning.checkpoints import check_model_of_checkpoint, load_classifier
from galaxy_lightning.export import export, load_exported
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.module import QuestionMetrics
from galaxy_lightning.predict import predict
from galaxy_lightning.train import build_and_prepare, train

from .helpers import write_prepared

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gz_decals_sample"
TWO = DecisionTree.from_dict({"name": "two", "questions": [
    {"name": "q", "answers": ["a", "b"]},
    {"name": "r", "answers": ["x", "y", "z"], "after": ["q_a"]}]})


def nll(counts: list[float], alpha: list[float], schema: DecisionTree = TWO) -> torch.Tensor:
    return dirichlet_multinomial_nll(torch.tensor([counts], dtype=torch.float64),
                                     torch.tensor([alpha], dtype=torch.float64), schema)[0]


def test_the_likelihood_equals_direct_evaluations() -> None:
    # alpha = 1: every split of n votes is equally likely: 1/(n+1) for two answers, and
    # 1/C(n+2, 2) for three (the compositions of n into 3 parts)
    assert torch.allclose(nll([1, 0, 0, 0, 0], [1, 1, 1, 1, 1]), torch.tensor([math.log(2), 0.0],
                                                                             dtype=torch.float64))
    assert torch.allclose(nll([2, 1, 1, 1, 0], [1, 1, 1, 1, 1]),
                          torch.tensor([math.log(4), math.log(6)], dtype=torch.float64))
    # alpha = (2, 3), one vote each: C(2,1) B(3, 4) / B(2, 3) = 2 (2! 3! / 6!) / (1! 2! / 4!) = 0.4
    assert math.isclose(nll([1, 1, 0, 0, 0], [2, 3, 1, 1, 1])[0].item(), -math.log(0.4))
    # very large concentrations: the multinomial of the expected fractions, 3 x 0.2 x 0.8^2
    big = nll([1, 2, 0, 0, 0], [2e7, 8e7, 1, 1, 1])[0].item()
    assert math.isclose(big, -math.log(3 * 0.2 * 0.8 ** 2), rel_tol=1e-5)


def test_the_likelihood_sums_to_one_over_every_outcome() -> None:
    alpha = [0.7, 2.5, 1.3]
    schema = DecisionTree.from_dict({"name": "one", "questions": [
        {"name": "q", "answers": ["a", "b", "c"]}]})
    total = sum(math.exp(-nll(list(k), alpha, schema)[0].item())
                for k in itertools.product(range(5), repeat=3) if sum(k) == 4)
    assert math.isclose(total, 1.0, rel_tol=1e-9)


def test_a_question_nobody_was_asked_contributes_nothing() -> None:
    alpha = torch.tensor([[3.0, 1.0, 5.0, 0.5, 2.0]], requires_grad=True)
    loss = dirichlet_multinomial_nll(torch.tensor([[4.0, 2.0, 0.0, 0.0, 0.0]]), alpha, TWO)
    assert loss[0, 1].item() == 0.0
    loss.sum().backward()
    assert alpha.grad is not None
    assert torch.all(alpha.grad[0, 2:] == 0) and torch.all(alpha.grad[0, :2] != 0)
    fractions = expected_fractions(alpha.detach(), TWO)
    assert torch.allclose(fractions[0], torch.tensor([0.75, 0.25, 5 / 7.5, 0.5 / 7.5, 2 / 7.5]))


def test_fraction_calibration_counts_the_bias_not_the_volunteers_scatter() -> None:
    metric = QuestionMetrics(TWO, confident=0.8, min_votes=10)
    # 0.5 for galaxies that 10 volunteers called all-a and all-b: calibrated (error 0) though
    # every fraction is 0.5 off; 0.9/0.1 for galaxies split 5/5: 0.4 off in both bins
    predicted = torch.tensor([[0.5, 0.5, 1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3],
                              [0.9, 0.1, 1 / 3, 1 / 3, 1 / 3], [0.1, 0.9, 1 / 3, 1 / 3, 1 / 3]])
    votes = torch.tensor([[10.0, 0, 0, 0, 0], [0, 10, 0, 0, 0], [5, 5, 0, 0, 0], [5, 5, 0, 0, 0]])
    metric.update(predicted[:2], votes[:2])
    first = metric.compute()
    assert first["q/calibration_error"].item() == pytest.approx(0.0)
    assert first["q/mae"].item() == pytest.approx(0.5)
    metric.update(predicted[2:], votes[2:])
    both = metric.compute()
    # 8 predicted fractions: 4 in the 0.5 bin (gap 0), 2 at 0.9 and 2 at 0.1 (gaps 2 x 0.4 each)
    assert both["q/calibration_error"].item() == pytest.approx((0.8 + 0.8) / 8)
    assert math.isnan(both["r/calibration_error"].item())  # nobody reached r
    assert both["calibration_error"].item() == pytest.approx(0.2)


def read(name: str) -> list[dict[str, str]]:
    with open(SAMPLE / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name, catalog", [("gz_decals_dr5", "gz_decals_volunteers_5.csv"),
                                           ("gz_decals_dr12", "gz_decals_volunteers_1_and_2.csv")])
def test_the_built_in_trees_read_the_real_catalogs(name: str, catalog: str) -> None:
    rows = read(catalog)
    schema = tree(name)
    schema.check_columns(list(rows[0]), catalog)
    counts, differ = schema.counts(lambda c: [float(r[c] or "nan") for r in rows], catalog)
    assert counts.shape == (6, schema.num_answers)
    first = schema.question("smooth-or-featured")
    a, b = schema.slices[0]
    assert counts[:, a:b].sum(1).tolist() == [float(r[first.total_column]) for r in rows]
    # a question that follows answers nobody gave has no votes: the tree's dependencies hold
    checked = 0
    for q, (a, b) in zip(schema.questions, schema.slices):
        if not q.after:
            continue
        reached = counts[:, [schema.answer_columns.index(c) for c in q.after]].sum(1)
        assert all(counts[i, a:b].sum() == 0 for i in range(6) if reached[i] == 0), q.name
        checked += int((reached == 0).sum())
    assert checked > 0
    assert sum(differ.values()) == (2 if name == "gz_decals_dr5" else 0)  # merging, in DR5


def test_a_catalog_without_the_trees_columns_is_refused_in_one_line() -> None:
    rows = read("gz_decals_volunteers_1_and_2.csv")
    with pytest.raises(DataError, match=r"gz_decals_volunteers_1_and_2.csv: the decision tree "
                                        r"'gz_decals_dr5' needs vote-count columns .* missing "
                                        r"bar_strong, bar_weak, bulge-size_large, "
                                        r"bulge-size_moderate and \d+ more; choose the tree"):
        TREES["gz_decals_dr5"].check_columns(list(rows[0]), "gz_decals_volunteers_1_and_2.csv")


@pytest.mark.parametrize("bad, message", [
    ({"name": "t", "questions": [{"name": "q", "answers": ["a"]}]}, "at least two distinct"),
    ({"name": "t", "questions": [{"name": "q", "answers": ["a", "b"], "after": ["q_c"]}]},
     r"follows \['q_c'\], not an answer of an earlier question"),
    ({"name": "t", "questions": [{"name": "q", "answers": ["a", "b"]},
                                 {"name": "q", "answers": ["c", "d"]}]}, "question names repeat"),
    ({"name": "t"}, r"a decision tree is \{name, questions"),
    ("gz3", "unknown decision tree 'gz3'; built in: gz_decals_dr5, gz_decals_dr12"),
])
def test_bad_trees_are_refused_in_one_line(bad: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tree(bad)  # type: ignore[arg-type]


def test_a_tree_round_trips_through_its_dict() -> None:
    for schema in (*TREES.values(), TWO):
        assert DecisionTree.from_dict(schema.to_dict()) == schema


def test_a_catalog_prepares_with_the_vote_counts_of_its_tree(tmp_path: Path) -> None:

    def source(catalog: str, schema: str) -> CatalogSource:
        return CatalogSource(str(SAMPLE / catalog), ["png_loc"], image_root=str(SAMPLE),
                             match="name", tree=schema, crop=256, resize=32, min_per_class=0,
                             id_column="iauname")

    data = read_prepared(source("gz_decals_volunteers_5.csv", "gz_decals_dr5").prepare(
        tmp_path, progress=False))
    rows = read("gz_decals_volunteers_5.csv")
    schema = TREES["gz_decals_dr5"]
    assert data.info.spec.tree == schema.to_dict()  # the schema travels with the data
    assert data.info.class_names == ["smooth", "featured-or-disk", "artifact"]
    by_id = {r["iauname"]: r for r in rows}
    for ident, votes, label in zip(data.columns["id"], data.columns["votes"], data.labels):
        row = by_id[ident]
        assert votes.tolist() == [float(row[c]) for c in schema.answer_columns]
        assert label == votes[:3].argmax()  # labelled by the first question's most-voted answer
    assert data.info.provenance["counts"]["totals_differ"]["merging"] == 2
    with pytest.raises(DataError, match="needs vote-count columns"):
        source("gz_decals_volunteers_1_and_2.csv", "gz_decals_dr5").prepare(tmp_path / "other",
                                                                            progress=False)


def test_simulated_volunteers_walk_the_tree(tmp_path: Path) -> None:
    """Later questions are asked only of the volunteers who gave the answers that lead to them,
    the numbers of volunteers vary, the votes follow what was drawn, and the images do not
    change when volunteers are simulated."""
    images, labels, votes = simulate(20, image_size=32, seed=1, votes=True)
    assert np.array_equal(images, simulate(20, image_size=32, seed=1)[0])
    schema = TREES["gz_decals_dr5"]
    totals = np.stack([votes[:, a:b].sum(1) for a, b in schema.slices], axis=1)
    for j, q in enumerate(schema.questions):
        if q.after:
            leads = [schema.answer_columns.index(c) for c in q.after]
            assert np.array_equal(totals[:, j], votes[:, leads].sum(1)), q.name
    first = totals[:, 0]
    assert first.min() >= 5 and first.max() <= 45 and (first < 16).any() and (first >= 30).any()
    # the volunteers' majority follows the simulated physics (noisy, not always)
    smooth = votes[:, 0] > votes[:, 1]
    assert smooth[np.isin(labels, [1, 2])].mean() > 0.9
    assert not smooth[np.isin(labels, [3, 4, 5, 6])].any()
    edge = schema.answer_columns.index("disk-edge-on_yes")
    assert (votes[labels == 6, edge] > votes[labels == 6, edge + 1]).mean() > 0.9
    bar = schema.answer_columns.index("bar_no")
    barred = votes[labels == 3]
    assert (barred[:, bar] < barred[:, bar - 2] + barred[:, bar - 1]).mean() > 0.8  # a bar seen

    data = read_prepared(SyntheticGalaxies(3, image_size=32, seed=1, tree="gz_decals_dr5")
                         .prepare(tmp_path, progress=False))
    assert data.info.spec.tree == schema.to_dict()
    assert np.array_equal(data.columns["votes"], simulate(3, 32, 1, votes=True)[2])
    with pytest.raises(ConfigError, match="simulated volunteers answer the gz_decals_dr5 tree"):
        SyntheticGalaxies(3, tree="gz2")


@pytest.mark.slow
def test_a_decision_tree_run_learns_every_question_and_evaluates_again(
        tmp_path: Path, make_cfg: object) -> None:
    """task=decision_tree end to end: one network with the class logits and an output group
    per question, trained on simulated volunteers' votes; per-question metrics in metrics.json;
    its checkpoint evaluates again with the same metrics."""
    cfg = make_cfg("task=decision_tree", "data.source.tree=gz_decals_dr5",  # type: ignore[operator]
                   "task.class_weight=0.5", "task.min_votes=5", "callbacks.run_artifacts.figures=true")
    metrics = train(cfg)
    assert math.isfinite(metrics["test/tree_loss"]) and 0 < metrics["test/tree/mae"] < 1
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for q in TREES["gz_decals_dr5"].questions:
        slug = q.name.replace("-", "_")
        assert 0 <= written[f"test/tree/{slug}/mae"] <= 1, q.name
        assert f"test/tree/{slug}/acc_confident" in written
        assert f"test/tree/{slug}/calibration_error" in written
    assert 0 <= written["test/tree/calibration_error"] < 1
    assert written["test/tree/smooth_or_featured/n_confident"] > 0
    assert written["train/exploding_at_step"] is None  # the votes' likelihood is not "exploding"
    assert (tmp_path / "run" / "tree_questions.png").stat().st_size > 0  # the per-question figure
    assert "Every question of the decision tree" in (tmp_path / "run" / "report.html").read_text()
    again = evaluate(written["checkpoint"], tmp_path / "eval", accelerator="cpu")
    assert math.isclose(again["test/tree/mae"], written["test/tree/mae"], rel_tol=1e-4)
    assert math.isclose(again["test/tree_loss"], written["test/tree_loss"], rel_tol=1e-4)
    # another prepared file: with the votes, every question is measured; without, the classes
    data_dir = Path(cfg.paths.data_dir)
    with_votes = evaluate(written["checkpoint"], tmp_path / "eval_votes", accelerator="cpu",
                          prepared=str(data_dir / "synthetic_galaxies_n60_s32_seed0_votes.h5"))
    assert 0 < with_votes["test/tree/mae"] < 1
    plain = SyntheticGalaxies(60, image_size=32, seed=0).prepare(data_dir, progress=False)
    classes_only = evaluate(written["checkpoint"], tmp_path / "eval_plain", accelerator="cpu",
                            prepared=str(plain))
    assert 0 <= classes_only["test/acc"] <= 1 and "test/tree/mae" not in classes_only
    with pytest.raises(CheckpointError, match="was trained with task=decision_tree, not "
                                              "task=classification"):
        saved = torch.load(written["checkpoint"], weights_only=True)
        check_model_of_checkpoint(written["checkpoint"], saved,
                                  saved["hyper_parameters"]["model"], {"name": "classification"})

    # predictions: every answer's fraction with its interval; exports carry the tree

    images, labels = simulate(2, image_size=32, seed=9)
    h5 = write_prepared(tmp_path / "new.h5", images, labels,
                        InputSpec(class_names=tuple("abcdefg"), channels=3, image_size=32), {})
    done, _ = predict(written["checkpoint"], [str(h5)], tmp_path / "p.csv", progress=False)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    schema = TREES["gz_decals_dr5"]
    assert done == len(rows) == 14
    for row in rows:
        for q in schema.questions:
            values = np.array([float(row[f"{c}_fraction"]) for c in q.columns])
            assert abs(values.sum() - 1) < 2e-3, q.name
            for c in q.columns:
                assert float(row[f"{c}_fraction_low"]) <= float(row[f"{c}_fraction"]) \
                    <= float(row[f"{c}_fraction_high"])
    export(written["checkpoint"], tmp_path / "export", formats=("pt2",))
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["input_spec"]["tree"] == schema.to_dict()
    exported = load_exported(tmp_path / "export" / "model.pt2")
    assert exported.tree == schema
    module = load_classifier(written["checkpoint"])
    batch = torch.from_numpy(images)
    assert np.allclose(exported(images), module.probabilities(batch).numpy(), atol=1e-5)
    assert np.allclose(exported.answer_fractions(images), module.answer_fractions(batch)[0].numpy(),
                       atol=1e-5)


def test_a_decision_tree_needs_vote_counts(make_cfg: object) -> None:

    with pytest.raises(ConfigError, match="has no vote counts, which task=decision_tree learns"):
        build_and_prepare(make_cfg("task=decision_tree"))  # type: ignore[operator]

    with pytest.raises(ConfigError, match="task.loss='votes' must be dirichlet"):
        validate_config(make_cfg("task=decision_tree", "task.loss=votes"))  # type: ignore[operator]


def test_a_single_question_model_learns_only_its_question() -> None:
    schema = TREES["gz_decals_dr5"]
    votes = torch.tensor(simulate(2, image_size=16, seed=0, votes=True)[2])
    outputs = torch.randn(len(votes), schema.num_answers)
    per_question = dirichlet_multinomial_nll(votes, concentrations(outputs), schema).mean(0)
    mask = question_mask(schema, ["bar"])
    assert math.isclose(tree_risk(outputs, votes, schema, "dirichlet", mask).item(),
                        per_question[schema.questions.index(schema.question("bar"))].item(),
                        rel_tol=1e-5)
    assert math.isclose(tree_risk(outputs, votes, schema).item(), per_question.sum().item(),
                        rel_tol=1e-5)
    with pytest.raises(ConfigError, match="has no question 'bars'"):
        question_mask(schema, ["bars"])

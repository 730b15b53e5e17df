"""pipeline.scoring.metrics against scikit-learn and hand-checked cases; plots written atomically."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.scoring.metrics import (
    SingleClassWarning,
    binary_metrics,
    equal_error_rate,
    plot_confusion,
    plot_history,
    plot_pr,
    plot_roc,
    plot_score_hist,
    to_jsonable,
)


def test_hand_checked_case():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    m = binary_metrics(y, s)
    assert (m["n"], m["n_real"], m["n_fake"]) == (8, 4, 4)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(15 / 16)
    assert m["eer"] == pytest.approx(0.25)
    assert 0.4 <= m["eer_threshold"] <= 0.7
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)


def test_threshold_changes_predictions():
    y = [0, 0, 1, 1]
    s = [0.1, 0.55, 0.6, 0.9]
    assert binary_metrics(y, s, threshold=0.5)["accuracy"] == pytest.approx(0.75)
    assert binary_metrics(y, s, threshold=0.58)["accuracy"] == pytest.approx(1.0)


def test_perfect_and_inverted_scores():
    y = [0, 0, 1, 1]
    assert binary_metrics(y, [0.1, 0.2, 0.8, 0.9])["eer"] == pytest.approx(0.0)
    inv = binary_metrics(y, [0.9, 0.8, 0.2, 0.1])
    assert inv["roc_auc"] == pytest.approx(0.0) and inv["eer"] == pytest.approx(1.0)


def test_gaussian_scores_match_theory():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    s = rng.normal(y * 1.0, 1.0)
    m = binary_metrics(y, s, threshold=0.5)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    # Two unit Gaussians one sigma apart: EER = Phi(-0.5) = 0.3085.
    assert m["eer"] == pytest.approx(0.3085, abs=0.01)
    assert m["accuracy_at_eer"] == pytest.approx(1 - m["eer"], abs=0.01)


def test_eer_interpolates_between_roc_points():
    # fnr - fpr changes sign between thresholds: interpolation gives a value between the two points.
    eer, thr = equal_error_rate([0, 0, 0, 1, 1], [0.1, 0.4, 0.35, 0.3, 0.8])
    assert 0 < eer < 1 and 0.1 <= thr <= 0.8


def test_single_class_gives_nan_and_a_warning():
    with pytest.warns(SingleClassWarning, match="only real samples"):
        m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["average_precision"]) and math.isnan(m["eer"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert json.loads(json.dumps(to_jsonable(m)))["roc_auc"] is None


@pytest.mark.parametrize(
    "labels, scores, match",
    [([0, 1], [0.5], "differ in length"), ([], [], "empty"), ([0, 2], [0.1, 0.2], "0 \\(real\\) or 1"),
     ([0, 1], [0.1, float("nan")], "NaN")],
)
def test_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(labels, scores)


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = 1 / (1 + np.exp(-rng.normal(y * 2.0 - 1, 1.0)))
    paths = [
        plot_roc({"model": (y, s), "one class": (np.zeros(3), [0.1, 0.2, 0.3])}, tmp_path / "roc.png"),
        plot_pr({"model": (y, s)}, tmp_path / "pr.png"),
        plot_score_hist(y, s, tmp_path / "hist.png", threshold=0.5),
        plot_confusion(binary_metrics(y, s)["confusion_matrix"], tmp_path / "cm.png"),
        plot_history([{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_accuracy": 0.6, "val_roc_auc": 0.7},
                      {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_accuracy": 0.7, "val_roc_auc": 0.8}],
                     tmp_path / "curves.png"),
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob(".tmp-*"))

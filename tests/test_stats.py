"""stats.py: AUROC as scikit-learn computes it, DeLong's interval at its nominal coverage on
simulated data, thresholds that reach their target on the data they are chosen from (also once
written as a short decimal), and the ROC and calibration points the plots draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from xrvd.stats import (
    NotEnoughData,
    at_threshold,
    auroc,
    calibration,
    delong_interval,
    round_threshold,
    roc_curve,
    threshold_for,
)


def test_known_areas():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 0, 1]) == 0.5  # all tied: half
    # Positives 0.4, 0.8 against negatives 0.2, 0.4, 0.6: pairs won 1 + 0.5 + 0 + 1 + 1 + 1.
    assert auroc([0.4, 0.8, 0.2, 0.4, 0.6], [1, 1, 0, 0, 0]) == 4.5 / 6


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 3000))
    labels = rng.integers(0, 2, size)
    labels[:2] = (0, 1)
    scores = rng.normal(labels * rng.uniform(0, 2), 1.0)
    if seed % 2:  # coarse scores: many ties, as rounded model outputs have
        scores = np.round(scores, 1)
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-9


def test_delong_interval_covers_the_true_area_at_its_nominal_rate():
    """Binormal scores (negatives N(0, 1), positives N(d, 1)) have AUROC Phi(d / sqrt 2)."""
    from statistics import NormalDist

    rng = np.random.default_rng(19)
    d = 1.0
    true_area = NormalDist().cdf(d / math.sqrt(2))
    runs, covered = 1000, 0
    for _ in range(runs):
        labels = np.r_[np.ones(60, int), np.zeros(140, int)]
        scores = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 140)]
        interval = delong_interval(scores, labels, 0.95)
        covered += interval.low <= true_area <= interval.high
        assert interval.low <= interval.auroc <= interval.high
    # 95 % nominal; with 1000 runs the binomial standard error is 0.7 % (DeLong's normal
    # interval runs slightly narrow at 60 positives: 93.4 % on this seed).
    assert 0.925 <= covered / runs <= 0.975, covered / runs


def test_thresholds_reach_their_target_on_the_data_they_were_chosen_from():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 2)  # ties included
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        threshold = threshold_for(scores, labels, sensitivity=target)
        assert at_threshold(scores, labels, threshold).sensitivity >= target
        # the highest such threshold: just above it, the sensitivity falls short
        above = at_threshold(scores, labels, float(np.nextafter(threshold, math.inf)))
        assert above.sensitivity < target
        threshold = threshold_for(scores, labels, specificity=target)
        assert at_threshold(scores, labels, threshold).specificity >= target
        below = at_threshold(scores, labels, float(np.nextafter(threshold, -math.inf)))
        assert below.specificity < target
    assert threshold_for(scores, labels, sensitivity=0.0) > scores.max()


def test_the_confusion_matrix_at_a_threshold():
    result = at_threshold([0.9, 0.6, 0.4, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0, 0], 0.5)
    assert (result.true_positives, result.false_negatives) == (2, 1)
    assert (result.false_positives, result.true_negatives) == (1, 2)
    assert (result.sensitivity, result.specificity) == (2 / 3, 2 / 3)
    assert (result.ppv, result.npv) == (2 / 3, 2 / 3)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(NotEnoughData, match="needs both"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.2], [1, -1])
    with pytest.raises(ValueError, match="finite"):
        auroc([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="one target"):
        threshold_for([0.1, 0.2], [1, 0])


def _calls(scores, labels, threshold):
    called = at_threshold(scores, labels, threshold)
    return (called.true_positives, called.false_positives, called.true_negatives,
            called.false_negatives)


@pytest.mark.parametrize("seed", range(10))
def test_a_threshold_rounded_for_the_config_calls_the_data_the_same(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, int(rng.integers(20, 400)))
    labels[:2] = (0, 1)
    scores = 1 / (1 + np.exp(-rng.normal(labels * 1.5 - 0.5, 1.0)))
    if seed % 2:
        scores = np.round(scores, 3)  # ties
    for target in (0.5, 0.8, 0.9, 0.95, 1.0):
        for chosen in (threshold_for(scores, labels, sensitivity=target),
                       threshold_for(scores, labels, specificity=target)):
            short = round_threshold(scores, chosen)
            assert 0.0 <= short <= 1.0
            assert _calls(scores, labels, short) == _calls(scores, labels, chosen)
            # what YAML writes and reads back is that very number
            assert float(repr(short)) == short and len(repr(short)) <= len(repr(chosen))
        short = round_threshold(scores, threshold_for(scores, labels, sensitivity=target))
        assert at_threshold(scores, labels, short).sensitivity >= target


def test_a_rounded_threshold_is_as_short_as_the_gap_allows():
    scores = [0.1, 0.40, 0.6213456, 0.9]
    assert round_threshold(scores, 0.6213456) == 0.6  # anything in (0.40, 0.6213456]
    assert round_threshold([0.61, 0.6213456], 0.6213456) == 0.62
    assert round_threshold([0.6213, 0.6213456], 0.6213456) == 0.62134
    assert round_threshold(scores, float(np.nextafter(0.9, 1))) == 1.0  # nothing positive
    assert round_threshold(scores, 0.05) == 0.0  # everything positive
    assert round_threshold([0.5, 1.0], float(np.nextafter(1.0, 2))) > 1.0  # cannot be written


@pytest.mark.parametrize("seed", range(10))
def test_roc_curve_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, int(rng.integers(2, 500)))
    labels[:2] = (0, 1)
    scores = rng.normal(labels, 1.0)
    if seed % 2:
        scores = np.round(scores, 1)
    curve = roc_curve(scores, labels)
    fpr, tpr, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.false_positive_rate, fpr, atol=1e-12)
    np.testing.assert_allclose(curve.true_positive_rate, tpr, atol=1e-12)
    np.testing.assert_array_equal(curve.thresholds[1:], thresholds[1:])
    # the area under its corners is the AUROC
    assert abs(np.trapezoid(curve.true_positive_rate, curve.false_positive_rate)
               - auroc(scores, labels)) < 1e-9


def test_calibration_bins_equal_scikit_learn():
    rng = np.random.default_rng(5)
    scores = rng.uniform(0, 1, 2000)
    labels = (rng.uniform(0, 1, 2000) < scores ** 2).astype(int)
    scores[:3] = (0.0, 1.0, 0.1)  # the bin edges
    points = calibration(scores, labels, bins=10)
    observed, predicted = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(points.mean_score, predicted, atol=1e-12)
    np.testing.assert_allclose(points.fraction_positive, observed, atol=1e-12)
    assert points.count.sum() == 2000
    # empty bins are left out; one class is enough
    one_class = calibration([0.05, 0.07, 0.95], [0, 0, 0], bins=10)
    assert list(one_class.count) == [2, 1] and list(one_class.fraction_positive) == [0, 0]

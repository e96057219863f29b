"""The statistics of a local validation (`xrvd evaluate`, issue 19): how well a model's scores
separate a site's labelled images, per label. numpy and the standard library only, so that a
service install can run them.

- AUROC as the Mann-Whitney statistic with ties counted half (midranks): what scikit-learn's
  `roc_auc_score` computes, without building the curve.
- Its confidence interval by DeLong's method (DeLong, DeLong and Clarke-Pearson 1988), in the
  fast midrank form of Sun and Xu (2014): the variance from the structural components of the
  positive and negative scores, a normal interval, clipped to [0, 1].
- Sensitivity, specificity, PPV and NPV at a threshold (a score at or above it is positive, as
  in xrvd's reports), and the threshold that reaches a target sensitivity or specificity on
  the data it is chosen from, written as the shortest decimal that calls those data the same
  (what goes into a config file).
- The points of the ROC curve and of a reliability (calibration) diagram, for the plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from statistics import NormalDist

import numpy as np


class NotEnoughData(ValueError):
    """Both classes are needed (an AUROC of one class is undefined)."""


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(scores as float64, labels) as flat arrays, of the same length, labels 1/0
    (True/False), scores finite."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (leave unlabelled images out)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, labels


def _split(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(positive scores, negative scores) as float64."""
    scores, labels = _checked(scores, labels)
    positive, negative = scores[labels == 1], scores[labels == 0]
    if not len(positive) or not len(negative):
        raise NotEnoughData(f"{len(positive)} positive and {len(negative)} negative images: "
                            "an AUROC needs both")
    return positive, negative


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """The area under the ROC curve: the chance that a positive image scores above a negative
    one, ties counting half."""
    positive, negative = _split(scores, labels)
    ranks = _midranks(np.concatenate([positive, negative]))
    m, n = len(positive), len(negative)
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


@dataclass(frozen=True)
class Interval:
    auroc: float
    low: float
    high: float
    standard_error: float
    level: float


def delong_interval(scores, labels, level: float = 0.95) -> Interval:
    """AUROC with DeLong's normal confidence interval at `level`."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    positive, negative = _split(scores, labels)
    m, n = len(positive), len(negative)
    together = _midranks(np.concatenate([positive, negative]))
    within_positive, within_negative = _midranks(positive), _midranks(negative)
    area = (together[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    # Structural components: for each positive, the share of negatives below it; for each
    # negative, the share of positives above it.
    v10 = (together[:m] - within_positive) / n
    v01 = 1.0 - (together[m:] - within_negative) / m
    variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + \
        (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    error = math.sqrt(max(variance, 0.0))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return Interval(float(area), max(0.0, area - z * error), min(1.0, area + z * error),
                    error, level)


@dataclass(frozen=True)
class AtThreshold:
    threshold: float
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int

    @property
    def sensitivity(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def specificity(self) -> float:
        return _ratio(self.true_negatives, self.true_negatives + self.false_positives)

    @property
    def ppv(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def npv(self) -> float:
        return _ratio(self.true_negatives, self.true_negatives + self.false_negatives)


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def at_threshold(scores, labels, threshold: float) -> AtThreshold:
    """The confusion matrix when a score at or above `threshold` is called positive."""
    positive, negative = _split(scores, labels)
    tp = int((positive >= threshold).sum())
    fp = int((negative >= threshold).sum())
    return AtThreshold(float(threshold), tp, fp, len(negative) - fp, len(positive) - tp)


def threshold_for(scores, labels, *, sensitivity: float | None = None,
                  specificity: float | None = None) -> float:
    """The threshold that reaches the target on these data: for a sensitivity, the highest
    threshold with at least that sensitivity (the fewest false positives that keep it): a
    positive image's score; for a specificity, the lowest threshold with at least that
    specificity (the most true positives that keep it): just above a negative image's
    score."""
    if (sensitivity is None) == (specificity is None):
        raise ValueError("give one target: a sensitivity or a specificity")
    target = sensitivity if sensitivity is not None else specificity
    if not 0 <= target <= 1:
        raise ValueError(f"a target must be between 0 and 1, got {target}")
    positive, negative = _split(scores, labels)
    if sensitivity is not None:
        # The k-th highest positive score as the threshold keeps k positives at or above it.
        needed = math.ceil(sensitivity * len(positive) - 1e-12)
        if needed == 0:
            return float(np.nextafter(max(positive.max(), negative.max()), math.inf))
        return float(np.sort(positive)[::-1][needed - 1])
    # At or above t is positive: a specificity s needs ceil(s * n) negatives below t.
    needed = math.ceil(specificity * len(negative) - 1e-12)
    if needed == 0:
        return float(min(positive.min(), negative.min()))
    return float(np.nextafter(np.sort(negative)[needed - 1], math.inf))


def round_threshold(scores, threshold: float) -> float:
    """The shortest decimal in [0, 1] that calls every one of `scores` as `threshold` does:
    any value above the highest score below the threshold, up to the lowest score at or above
    it, gives the same calls, so a config can say 0.62 rather than 0.6213456789. `threshold`
    itself when no such value lies in [0, 1] (a threshold above a score of exactly 1)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    below = values[values < threshold]
    above = values[values >= threshold]
    low = float(below.max()) if below.size else -math.inf
    high = min(float(above.min()) if above.size else 1.0, 1.0)
    if not low < high:
        return float(threshold)
    for digits in range(18):
        step = Decimal(1).scaleb(-digits)
        # Rounded to nearest (0.353 is a double just below 0.353, so only this finds it) or
        # down; back in a double, the value is checked to lie in the interval all the same.
        for rounding in (ROUND_HALF_EVEN, ROUND_FLOOR):
            candidate = float(Decimal(high).quantize(step, rounding=rounding))
            if low < candidate <= high and candidate >= 0.0:
                return candidate
    return high


@dataclass(frozen=True)
class RocCurve:
    false_positive_rate: np.ndarray
    true_positive_rate: np.ndarray
    thresholds: np.ndarray  # descending; the first (infinite) calls nothing positive


def roc_curve(scores, labels) -> RocCurve:
    """The ROC curve's corners: one point per distinct score, from (0, 0) (nothing called
    positive) to (1, 1), tied scores moving together (scikit-learn's roc_curve with
    drop_intermediate=False)."""
    positive, negative = _split(scores, labels)
    values = np.concatenate([positive, negative])
    truth = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    order = np.argsort(-values, kind="mergesort")
    values, truth = values[order], truth[order]
    # The last index of each run of tied scores: the curve moves a whole tie at once.
    ends = np.r_[np.flatnonzero(values[1:] != values[:-1]), len(values) - 1]
    true_positives = np.cumsum(truth)[ends]
    false_positives = (ends + 1) - true_positives
    return RocCurve(np.r_[0.0, false_positives / len(negative)],
                    np.r_[0.0, true_positives / len(positive)],
                    np.r_[math.inf, values[ends]])


@dataclass(frozen=True)
class Calibration:
    mean_score: np.ndarray  # per bin that holds any image
    fraction_positive: np.ndarray
    count: np.ndarray


def calibration(scores, labels, bins: int = 10) -> Calibration:
    """A reliability diagram's points: the scores cut into `bins` equal bins over [0, 1]
    (each closed above, the first also below: scikit-learn's calibration_curve), each bin's
    mean score against its share of positive images. Empty bins are left out. One class is
    enough (the share is then 0 or 1 throughout)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    values, truth = _checked(scores, labels)
    index = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], values, side="left")
    count = np.bincount(index, minlength=bins)
    total = np.bincount(index, weights=values, minlength=bins)
    positives = np.bincount(index, weights=truth.astype(np.float64), minlength=bins)
    held = count > 0
    return Calibration(total[held] / count[held], positives[held] / count[held], count[held])

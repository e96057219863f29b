"""UNTRAINED weights (pipeline/untrained.py), for tests and benchmarks only: they carry a loud
marker, and refuse to run unless the caller or the environment variable says so in its loud
words."""

import pytest

from xrvd.errors import UntrainedWeightsError
from xrvd.pipeline import weights
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec
from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV, UNTRAINED_BANNER

DENSENET = "densenet121-res224-nih"
RESNET = "resnet50-res512-all"


def test_untrained_weights_refuse_to_run_by_default(weights_copy, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTRAINED_ENV, raising=False)
    folder = weights_copy(DENSENET)
    with pytest.raises(UntrainedWeightsError, match="UNTRAINED"):
        Classifier.load(DENSENET, folder)
    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "1")  # only the loud value opts in
    with pytest.raises(UntrainedWeightsError):
        Classifier.load(DENSENET, folder)
    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "yes-these-scores-are-meaningless")
    assert Classifier.load(DENSENET, folder).identity.untrained


def test_untrained_marker_text_is_loud(untrained_weights):
    loaded = weights.load_network(get_spec(RESNET),
                                  untrained_weights(RESNET) / get_spec(RESNET).weights_file)
    assert loaded.untrained == UNTRAINED_BANNER
    assert "NOT a diagnosis" in UNTRAINED_BANNER

"""The registry (pipeline/registry.py): the nine supported models, their labels and settings
as TorchXRayVision has them, and each architecture built from its weights file and run."""

import math
import os

import numpy as np
import pytest

from xrvd.errors import UnknownModelError
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import MODELS, get_spec

EXPECTED = {
    "densenet121-res224-all", "densenet121-res224-nih", "densenet121-res224-pc",
    "densenet121-res224-chex", "densenet121-res224-mimic_nb", "densenet121-res224-mimic_ch",
    "densenet121-res224-rsna", "resnet50-res512-all", "jfhealthcare-densenet121-res512",
}


def test_registry_names_all_nine_models():
    assert set(MODELS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED - {"jfhealthcare-densenet121-res512"}))
def test_registry_matches_torchxrayvision(name):
    """Labels, operating points, resolution and file name, as TorchXRayVision defines them;
    empty labels and labels with a NaN operating point are never reported."""
    import torchxrayvision as xrv

    spec = get_spec(name)
    upstream = xrv.models.model_urls[name]
    assert spec.resolution == upstream["input_resolution"]
    assert spec.weights_url == upstream["weights_url"]
    assert spec.weights_file == os.path.basename(upstream["weights_url"])
    predicted = [
        (i, label, thresh)
        for i, (label, thresh) in enumerate(zip(upstream["labels"], upstream["op_threshs"]))
        if label and not math.isnan(thresh)
    ]
    assert [(lab.index, lab.name) for lab in spec.labels] == [(i, n) for i, n, _ in predicted]
    assert [lab.operating_point for lab in spec.labels] == pytest.approx(
        [t for _, _, t in predicted])


def test_label_sets():
    assert get_spec("densenet121-res224-rsna").label_names == ("Pneumonia", "Lung Opacity")
    assert len(get_spec("densenet121-res224-all").labels) == 18
    assert len(get_spec("densenet121-res224-nih").labels) == 14
    assert "Fracture" in get_spec("densenet121-res224-pc").label_names
    resnet = get_spec("resnet50-res512-all").label_names
    assert len(resnet) == 16 and "Lung Lesion" not in resnet
    assert "Enlarged Cardiomediastinum" not in resnet


def test_jfhealthcare_matches_torchxrayvision():
    from torchxrayvision.baseline_models.jfhealthcare import DenseNet

    spec = get_spec("jfhealthcare-densenet121-res512")
    assert spec.resolution == 512
    assert spec.label_names == tuple(DenseNet.targets)
    assert set(spec.label_names) == {
        "Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Effusion"}


def test_unknown_model_lists_the_choices():
    with pytest.raises(UnknownModelError, match="densenet121-res224-all"):
        get_spec("densenet")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_architecture_builds_and_predicts(name, exported_weights):
    spec = get_spec(name)
    classifier = Classifier.load(name, exported_weights(name)[0], allow_untrained=True)
    import torchxrayvision as xrv

    expected_type = {
        "densenet121": xrv.models.DenseNet,
        "resnet50": xrv.models.ResNet,
        "jfhealthcare-densenet121": xrv.baseline_models.jfhealthcare.DenseNet,
    }[spec.architecture]
    assert isinstance(classifier.network, expected_type)
    ramp = np.linspace(-1024, 1024, spec.resolution, dtype=np.float32)
    batch = np.stack([np.broadcast_to(ramp, (1, spec.resolution, spec.resolution)),
                      np.broadcast_to(ramp[:, None], (1, spec.resolution, spec.resolution))])
    scores = classifier.predict(batch)
    assert scores.shape == (2, len(spec.labels))
    assert np.all((scores >= 0) & (scores <= 1))
    assert classifier.identity.untrained is True

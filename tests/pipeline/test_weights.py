"""Weights files (pipeline/weights.py): a missing, corrupt, truncated or foreign file is a clear
error that says what to do; import verifies before it installs; fetch and a download allowed by
config never leave a partial file; networks are built as TorchXRayVision builds them, from the
configured folder only. Files that would run code are in test_safeload.py, the record of
installed weights in test_trust.py."""

import pytest
import torch

from xrvd.errors import (
    DownloadError,
    UntrainedWeightsError,
    WeightsCorruptError,
    WeightsMissingError,
)
from xrvd.pipeline import trust, weights
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec

from ..harness import Mirror, strip_marker

DENSENET = "densenet121-res224-nih"
RESNET = "resnet50-res512-all"
JF = "jfhealthcare-densenet121-res512"


def test_missing_weights_name_file_folder_and_both_commands(tmp_path):
    spec = get_spec(DENSENET)
    with pytest.raises(WeightsMissingError) as info:
        Classifier.load(DENSENET, tmp_path)
    message = str(info.value)
    assert spec.weights_file in message
    assert str(tmp_path) in message
    assert f"xrvd models fetch {DENSENET}" in message
    assert f"xrvd models import {DENSENET}" in message


def test_missing_weights_never_download_unless_allowed(tmp_path):
    # No server listens on port 9 of loopback: a download attempt would fail loudly.
    with pytest.raises(WeightsMissingError):
        Classifier.load(DENSENET, tmp_path, download_url="http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        Classifier.load(DENSENET, tmp_path, allow_download=True,
                        download_url="http://127.0.0.1:9")
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


@pytest.mark.parametrize("content", [b"", b"not a pytorch file at all", b"PK\x03\x04trunc"])
def test_corrupt_weights_are_refused(tmp_path, content):
    (tmp_path / get_spec(DENSENET).weights_file).write_bytes(content)
    with pytest.raises(WeightsCorruptError, match="cannot read the weights file"):
        Classifier.load(DENSENET, tmp_path, allow_untrained=True)


def test_truncated_weights_are_refused(weights_copy):
    folder = weights_copy(RESNET)
    path = folder / get_spec(RESNET).weights_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsCorruptError):
        Classifier.load(RESNET, folder, allow_untrained=True)


def test_weights_of_another_architecture_are_refused(untrained_weights, tmp_path):
    source = untrained_weights(RESNET) / get_spec(RESNET).weights_file
    (tmp_path / get_spec(JF).weights_file).write_bytes(source.read_bytes())
    with pytest.raises(WeightsCorruptError, match="does not load into jfhealthcare"):
        Classifier.load(JF, tmp_path, allow_untrained=True)
    (tmp_path / get_spec(DENSENET).weights_file).write_bytes(source.read_bytes())
    with pytest.raises(WeightsCorruptError, match="pickled TorchXRayVision model"):
        Classifier.load(DENSENET, tmp_path, allow_untrained=True)


@pytest.mark.parametrize("name", [DENSENET, RESNET, JF])
def test_import_verifies_and_installs(name, untrained_weights, tmp_path):
    carried = strip_marker(name, untrained_weights(name), tmp_path / "usb")
    target = tmp_path / "weights"
    installed = weights.import_file(get_spec(name), carried, target)
    assert installed == target / get_spec(name).weights_file
    assert installed.read_bytes() == carried.read_bytes()
    assert [p.name for p in target.iterdir()] == [installed.name]  # no staging left
    # Loaded on torch: exporting a graph is tested in test_onnxrt.py, and takes long at 512 px.
    classifier = Classifier.load(name, target, backend="torch")
    assert not classifier.identity.untrained
    assert classifier.identity.weights_sha256 == trust.sha256(carried)


def test_import_refuses_wrong_and_untrained_files(untrained_weights, tmp_path):
    target = tmp_path / "weights"
    wrong = untrained_weights(RESNET) / get_spec(RESNET).weights_file
    with pytest.raises(WeightsCorruptError):
        weights.import_file(get_spec(DENSENET), wrong, target)
    untrained = untrained_weights(DENSENET) / get_spec(DENSENET).weights_file
    with pytest.raises(UntrainedWeightsError):
        weights.import_file(get_spec(DENSENET), untrained, target)
    assert list(target.iterdir()) == []


def test_interrupted_fetch_never_looks_complete(mirror, untrained_weights, tmp_path):
    root, url = mirror
    (root / "v1").mkdir()
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), root / "v1")
    Mirror.truncate = {carried.name}
    target = tmp_path / "weights"
    with pytest.raises(DownloadError, match="run the command again|cannot download"):
        weights.fetch(get_spec(DENSENET), target, base_url=url)
    assert list(target.iterdir()) == []
    with pytest.raises(DownloadError, match="404|Not Found"):
        weights.fetch(get_spec(RESNET), target, base_url=url)
    assert list(target.iterdir()) == []


def test_load_downloads_when_config_allows(mirror, untrained_weights, tmp_path):
    root, url = mirror
    (root / "v1").mkdir()
    strip_marker(DENSENET, untrained_weights(DENSENET), root / "v1")
    classifier = Classifier.load(DENSENET, tmp_path / "w", allow_download=True,
                                 download_url=url, backend="torch")  # (no graph to export)
    assert (tmp_path / "w" / get_spec(DENSENET).weights_file).is_file()
    assert classifier.labels == get_spec(DENSENET).label_names


def test_jfhealthcare_uses_the_configured_folder_only(ready_weights, tmp_path, monkeypatch):
    """TorchXRayVision's own JF constructor reads ~/.torchxrayvision and downloads ImageNet
    weights from the network; xrvd must do neither. (The graph is in the folder already, as
    exported once per session: the network is built when it is asked for.)"""
    folder = ready_weights(JF, recorded=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    classifier = Classifier.load(JF, folder, allow_untrained=True)
    assert classifier.network.weights_filename_local == str(folder / get_spec(JF).weights_file)
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("name", [DENSENET, RESNET])
def test_networks_are_built_as_torchxrayvision_builds_them(name, untrained_weights):
    """xrvd builds the network around tensors it read itself; TorchXRayVision's constructor
    (which reads the file with weights_only=False: here a file this test wrote) must give
    the same model."""
    import torchxrayvision as xrv

    spec = get_spec(name)
    folder = untrained_weights(name)
    ours = weights.load_network(spec, folder / spec.weights_file).network
    upstream = {"densenet121": xrv.models.DenseNet, "resnet50": xrv.models.ResNet}
    theirs = upstream[spec.architecture](weights=name, cache_dir=str(folder))
    assert type(ours) is type(theirs) and ours.training == theirs.training is False
    assert set(vars(ours)) == set(vars(theirs))
    for key, value in vars(theirs).items():
        if not key.startswith("_"):
            assert getattr(ours, key) == value, key
    assert repr(ours) == repr(theirs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in theirs_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=0, atol=0,
                                   equal_nan=True)
    batch = torch.linspace(-1024, 1024, spec.resolution ** 2).reshape(
        1, 1, spec.resolution, spec.resolution)
    with torch.no_grad():
        torch.testing.assert_close(ours(batch), theirs(batch), rtol=0, atol=0)

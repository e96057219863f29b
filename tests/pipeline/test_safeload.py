"""Weights files never run code (pipeline/safeload.py): files that would, in every format torch
and TorchXRayVision write, are refused by `xrvd models import`, at start-up and by `xrvd
classify`; the allow-list is exactly what the real formats name; torch's legacy format loads;
a tensor larger than its storage is refused; nothing else in xrvd reads weights."""

import io
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from xrvd.cli import main
from xrvd.config import load_config
from xrvd.errors import WeightsUnsafeError
from xrvd.pipeline import safeload, trust, weights
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import MODELS, get_spec
from xrvd.pipeline.untrained import UNTRAINED_BANNER

from ..harness import NIH_SC, REPO, torch_config

DENSENET = "densenet121-res224-nih"
RESNET = "resnet50-res512-all"
JF = "jfhealthcare-densenet121-res512"


class _RunsCode:
    """What a malicious weights file holds: unpickling it creates `marker`."""

    def __init__(self, marker: Path, how: str = "system"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "open":
            return (open, (self.marker, "w"))
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class _CallsDenseNet:
    """A pickle may call a class it is allowed to name: TorchXRayVision's DenseNet constructor,
    given a cache_dir, unpickles the file it finds there with no restriction."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = str(cache_dir)

    def __reduce__(self):
        import torchxrayvision as xrv

        return (xrv.models.DenseNet, (32, (6, 12, 24, 16), 64, 4, 0, 18, 1,
                                      "densenet121-res224-all", self.cache_dir))


def _plain_pickle(target: Path, marker: Path, model: Path) -> Path:
    target.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    return target


def _torch_file(target: Path, marker: Path, model: Path) -> Path:
    torch.save({"state_dict": _RunsCode(marker, "open")}, target)
    return target


def _torch_legacy_file(target: Path, marker: Path, model: Path) -> Path:
    torch.save(_RunsCode(marker), target, _use_new_zipfile_serialization=False)
    return target


def _model_carrying_code(target: Path, marker: Path, model: Path, legacy: bool = False) -> Path:
    network = torch.load(model, weights_only=False)
    network.features.norm5.extra = _RunsCode(marker)
    torch.save(network, target, _use_new_zipfile_serialization=not legacy)
    return target


def _legacy_model_carrying_code(target: Path, marker: Path, model: Path) -> Path:
    return _model_carrying_code(target, marker, model, legacy=True)


def _calls_the_densenet_constructor(target: Path, marker: Path, model: Path) -> Path:
    import torchxrayvision as xrv

    cache = target.parent / "cache"
    cache.mkdir(exist_ok=True)
    url = xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    _plain_pickle(cache / os.path.basename(url), marker, model)
    torch.save(_CallsDenseNet(cache), target)
    return target


MALICIOUS = [_plain_pickle, _torch_file, _torch_legacy_file, _model_carrying_code,
             _legacy_model_carrying_code, _calls_the_densenet_constructor]


@pytest.mark.parametrize(("name", "make"), [(DENSENET, make) for make in MALICIOUS]
                         + [(RESNET, _torch_file), (JF, _plain_pickle)],
                         ids=lambda v: v.__name__.strip("_") if callable(v) else v)
def test_models_import_refuses_a_file_that_would_run_code(name, make, untrained_weights,
                                                          tmp_path, capsys):
    model = untrained_weights(DENSENET) / get_spec(DENSENET).weights_file
    marker = tmp_path / "code-ran"
    carried = make(tmp_path / "evil.pt", marker, model)
    config = torch_config(tmp_path, name=name)
    assert main(["models", "import", name, str(carried), "-c", str(config)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "not a TorchXRayVision weights file" in err and "without running anything" in err
    assert not (tmp_path / "state" / "models" / get_spec(name).weights_file).exists()
    assert not (tmp_path / "state" / trust.TRUST_FILE).exists()


@pytest.mark.parametrize("make", [_torch_legacy_file, _model_carrying_code,
                                  _legacy_model_carrying_code, _calls_the_densenet_constructor],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_file_that_would_run_code_is_refused_at_start_and_by_classify(
        make, untrained_weights, tmp_path, capsys):
    spec = get_spec(DENSENET)
    model = untrained_weights(DENSENET) / spec.weights_file
    folder = tmp_path / "models"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    path = make(folder / spec.weights_file, marker, model)
    config = torch_config(tmp_path, folder)
    with pytest.raises(WeightsUnsafeError, match="not a TorchXRayVision weights file") as info:
        try:
            Classifier.from_config(load_config(config))  # what `xrvd serve` and back-fills do
        finally:
            assert not marker.exists()
    assert info.value.reason == "weights_unsafe"
    assert main(["classify", str(NIH_SC), "-c", str(config)]) == 2
    assert not marker.exists()
    assert "not a TorchXRayVision weights file" in capsys.readouterr().err
    assert trust.TrustedHashes(tmp_path / "state").entry(path) is None  # never trusted


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_allow_list_is_what_every_models_files_name(name, untrained_weights):
    """Untrained weights are written in TorchXRayVision's own formats: the classes they name
    are exactly the allow-list (none for state dicts), and they load under it."""
    spec = get_spec(name)
    path = untrained_weights(name) / spec.weights_file
    named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert named == set(safeload.allowed_classes(spec.architecture))
    assert bool(named) == spec.pickled_model
    assert weights.load_network(spec, path).untrained == UNTRAINED_BANNER


def test_a_pickled_model_in_torchs_legacy_format_loads(untrained_weights, tmp_path):
    """TorchXRayVision's DenseNet files were written by torch < 1.6, in the format torch's
    weights_only reader refuses for whole models; old torch also pickled `_backend`."""
    from torch.nn.backends import thnn

    class Backend:
        def __reduce__(self):
            return (thnn._get_thnn_function_backend, ())

    spec = get_spec(DENSENET)
    source = untrained_weights(DENSENET) / spec.weights_file
    network = torch.load(source, weights_only=False)
    network._backend = network.features.conv0._backend = Backend()
    legacy = tmp_path / spec.weights_file
    torch.save(network, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:4] != b"PK\x03\x04"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(legacy, weights_only=True)
    expected = weights.load_network(spec, source)
    loaded = weights.load_network(spec, legacy)
    assert loaded.untrained == expected.untrained == UNTRAINED_BANNER
    ours, theirs = loaded.network.state_dict(), expected.network.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, equal_nan=True)


class _ClaimsMore:
    """A tensor of 2**28 elements over a storage of 4: torch's set_ would grow the storage."""

    def __reduce__(self):
        from collections import OrderedDict

        storage = torch.zeros(4)._typed_storage()
        return (torch._utils._rebuild_tensor_v2,
                (storage, 0, (1 << 28,), (1,), False, OrderedDict()))


def test_a_tensor_larger_than_its_storage_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save(_ClaimsMore(), buffer, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsUnsafeError, match="larger than its storage"):
        safeload.read_checkpoint(get_spec(DENSENET), buffer.getvalue(), tmp_path / "big.pt")


def test_weights_are_read_only_by_the_loader_with_the_allow_list():
    readers = sorted(str(p.relative_to(REPO)) for p in (REPO / "xrvd").rglob("*.py")
                     if "torch.load(" in p.read_text())
    assert readers == ["xrvd/pipeline/safeload.py"]

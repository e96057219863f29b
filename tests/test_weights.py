import http.server
import io
import json
import os
import pickle
import shlex
import threading
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from xrvd.cli import main
from xrvd.config import load_config
from xrvd.errors import (
    DownloadError,
    TrustRecordError,
    UntrainedWeightsError,
    WeightsChangedError,
    WeightsCorruptError,
    WeightsMissingError,
    WeightsUnsafeError,
)
from xrvd.pipeline import safeload, trust, weights
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import MODELS, get_spec
from xrvd.pipeline.untrained import UNTRAINED_BANNER

from .conftest import NIH_SC, REPO

DENSENET = "densenet121-res224-nih"
RESNET = "resnet50-res512-all"
JF = "jfhealthcare-densenet121-res512"


def strip_marker(name: str, source: Path, target: Path) -> Path:
    """Random weights without the untrained marker: stands in for a real published file."""
    spec = get_spec(name)
    checkpoint = torch.load(source / spec.weights_file, weights_only=False)
    delattr(checkpoint, weights.UNTRAINED_MARKER)
    target.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target / spec.weights_file)
    return target / spec.weights_file


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


def test_untrained_weights_refuse_to_run_by_default(weights_copy, monkeypatch):
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    monkeypatch.delenv(ALLOW_UNTRAINED_ENV, raising=False)
    folder = weights_copy(DENSENET)
    with pytest.raises(UntrainedWeightsError, match="UNTRAINED"):
        Classifier.load(DENSENET, folder)
    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "1")  # only the loud value opts in
    with pytest.raises(UntrainedWeightsError):
        Classifier.load(DENSENET, folder)
    monkeypatch.setenv(ALLOW_UNTRAINED_ENV, "yes-these-scores-are-meaningless")
    assert Classifier.load(DENSENET, folder).identity.untrained


@pytest.mark.parametrize("name", [DENSENET, RESNET, JF])
def test_import_verifies_and_installs(name, untrained_weights, tmp_path):
    carried = strip_marker(name, untrained_weights(name), tmp_path / "usb")
    target = tmp_path / "weights"
    installed = weights.import_file(get_spec(name), carried, target)
    assert installed == target / get_spec(name).weights_file
    assert installed.read_bytes() == carried.read_bytes()
    assert [p.name for p in target.iterdir()] == [installed.name]  # no staging left
    classifier = Classifier.load(name, target)
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


def test_import_command(untrained_weights, tmp_path, capsys):
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), tmp_path / "usb")
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["models", "import", DENSENET, str(carried), "-c", str(config)]) == 0
    assert "verified and installed" in capsys.readouterr().out
    assert main(["models", "list", "-c", str(config), "--verify"]) == 0
    listing = capsys.readouterr().out
    line = next(row for row in listing.splitlines() if row.startswith(DENSENET))
    assert "ok (" in line
    assert "missing" in next(r for r in listing.splitlines() if r.startswith(RESNET))
    assert main(["models", "import", DENSENET, str(tmp_path / "nope.pt"), "-c",
                 str(config)]) == 2
    assert "no such file" in capsys.readouterr().err


class _Mirror(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a file named in `truncate` is sent with a lying Content-Length."""

    truncate: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = os.path.basename(self.path)
        if name in self.truncate:
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()

    def handler(*args, **kwargs):
        return _Mirror(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join()
    _Mirror.truncate = set()


def test_fetch_from_a_mirror(mirror, untrained_weights, tmp_path, capsys):
    root, url = mirror
    (root / "v1").mkdir()
    strip_marker(DENSENET, untrained_weights(DENSENET), root / "v1")
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["models", "fetch", DENSENET, "--url", url, "-c", str(config)]) == 0
    installed = tmp_path / "state" / "models" / get_spec(DENSENET).weights_file
    assert installed.read_bytes() == (root / "v1" / installed.name).read_bytes()
    entry = trust.TrustedHashes(tmp_path / "state").entry(installed)
    assert entry["sha256"] == trust.sha256(installed) and entry["source"] == "fetch"


def test_interrupted_fetch_never_looks_complete(mirror, untrained_weights, tmp_path):
    root, url = mirror
    (root / "v1").mkdir()
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), root / "v1")
    _Mirror.truncate = {carried.name}
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
                                 download_url=url)
    assert (tmp_path / "w" / get_spec(DENSENET).weights_file).is_file()
    assert classifier.labels == get_spec(DENSENET).label_names


def test_jfhealthcare_uses_the_configured_folder_only(weights_copy, tmp_path, monkeypatch):
    """TorchXRayVision's own JF constructor reads ~/.torchxrayvision and downloads ImageNet
    weights from the network; xrvd must do neither."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    folder = weights_copy(JF)
    classifier = Classifier.load(JF, folder, allow_untrained=True)
    assert classifier.network.weights_filename_local == str(folder / get_spec(JF).weights_file)
    assert list(home.iterdir()) == []


def test_untrained_marker_text_is_loud(untrained_weights):
    loaded = weights.load_network(get_spec(RESNET),
                                  untrained_weights(RESNET) / get_spec(RESNET).weights_file)
    assert loaded.untrained == UNTRAINED_BANNER
    assert "NOT a diagnosis" in UNTRAINED_BANNER


# --- weights files never run code -------------------------------------------------------------


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


def _config(tmp_path: Path, weights_dir: Path | None = None, name: str = DENSENET) -> Path:
    lines = [f"state_dir: {tmp_path / 'state'}", "model:", f"  name: {name}",
             "  backend: torch", "  threads: 1"]
    if weights_dir is not None:
        lines.append(f"  weights_dir: {weights_dir}")
    config = tmp_path / "xrvd.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize(("name", "make"), [(DENSENET, make) for make in MALICIOUS]
                         + [(RESNET, _torch_file), (JF, _plain_pickle)],
                         ids=lambda v: v.__name__.strip("_") if callable(v) else v)
def test_models_import_refuses_a_file_that_would_run_code(name, make, untrained_weights,
                                                          tmp_path, capsys):
    model = untrained_weights(DENSENET) / get_spec(DENSENET).weights_file
    marker = tmp_path / "code-ran"
    carried = make(tmp_path / "evil.pt", marker, model)
    config = _config(tmp_path, name=name)
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
    config = _config(tmp_path, folder)
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


def test_weights_changed_after_import_are_refused_until_imported_again(untrained_weights,
                                                                       tmp_path, capsys):
    spec = get_spec(DENSENET)
    carried = strip_marker(DENSENET, untrained_weights(DENSENET), tmp_path / "usb")
    config = _config(tmp_path)
    assert main(["models", "import", DENSENET, str(carried), "-c", str(config)]) == 0
    installed = tmp_path / "state" / "models" / spec.weights_file
    record = json.loads((tmp_path / "state" / trust.TRUST_FILE).read_text())
    assert record["files"][str(installed)]["sha256"] == trust.sha256(carried)
    assert record["files"][str(installed)]["source"] == "import"
    assert not Classifier.from_config(load_config(config)).identity.untrained

    # The same architecture with other numbers, written over the installed file.
    network = torch.load(installed, weights_only=False)
    with torch.no_grad():
        network.classifier.bias += 1.0
    torch.save(network, installed)
    with pytest.raises(WeightsChangedError, match=f"xrvd models import {DENSENET}") as info:
        Classifier.from_config(load_config(config))
    assert info.value.reason == "weights_changed"
    assert main(["classify", str(NIH_SC), "-c", str(config)]) == 2
    assert "re-import it" in capsys.readouterr().err
    assert main(["models", "export", DENSENET, "-c", str(config)]) == 2
    assert "re-import it" in capsys.readouterr().err
    assert main(["models", "list", "--verify", "-c", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "changed" in next(row for row in listing.splitlines() if row.startswith(DENSENET))

    assert main(["models", "import", DENSENET, str(installed), "-c", str(config)]) == 0
    changed = Classifier.from_config(load_config(config))
    assert changed.identity.weights_sha256 == trust.sha256(installed)


def test_weights_without_a_record_are_trusted_on_first_use(weights_copy, allow_untrained,
                                                           tmp_path):
    folder = weights_copy(DENSENET)
    path = folder / get_spec(DENSENET).weights_file
    config = _config(tmp_path, folder)
    with capture_logs() as logs:
        Classifier.from_config(load_config(config))
    [recorded] = [e for e in logs if e["event"] == "weights.recorded"]
    assert recorded["log_level"] == "warning" and recorded["source"] == "first use"
    assert recorded["sha256"] == trust.sha256(path)
    assert trust.TrustedHashes(tmp_path / "state").entry(path)["sha256"] == recorded["sha256"]
    with capture_logs() as logs:
        Classifier.from_config(load_config(config))
    assert [e for e in logs if e["event"] == "weights.recorded"] == []

    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsChangedError):
        Classifier.from_config(load_config(config))


def test_an_unreadable_record_refuses_to_start(weights_copy, allow_untrained, tmp_path):
    folder = weights_copy(DENSENET)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / trust.TRUST_FILE).write_text("{ not json")
    with pytest.raises(TrustRecordError, match="delete it"):
        Classifier.from_config(load_config(_config(tmp_path, folder)))


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


def test_weights_are_read_only_by_the_loader_with_the_allow_list():
    readers = sorted(str(p.relative_to(REPO)) for p in (REPO / "xrvd").rglob("*.py")
                     if "torch.load(" in p.read_text())
    assert readers == ["xrvd/pipeline/safeload.py"]

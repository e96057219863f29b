import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from xrvd.cli import main
from xrvd.errors import (
    DownloadError,
    UntrainedWeightsError,
    WeightsCorruptError,
    WeightsMissingError,
)
from xrvd.pipeline import weights
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import get_spec
from xrvd.pipeline.untrained import UNTRAINED_BANNER

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
    assert classifier.identity.weights_sha256 == weights.sha256(carried)


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

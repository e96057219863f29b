"""package.py: a model package scores as the weights it was exported from, without them, and
every kind of damage or substitution is refused before the package scores anything."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest

from xrvd.commands import models as modeladmin
from xrvd.errors import UntrainedWeightsError
from xrvd.pipeline import models as models_module
from xrvd.pipeline import onnxrt, package
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.package import PackageError
from xrvd.pipeline.registry import get_spec
from xrvd.pipeline.trust import TrustedHashes

NAME = "densenet121-res224-rsna"  # the quickest to export


@pytest.fixture(scope="module")
def exported_once(exported_weights, tmp_path_factory):
    """(weights folder, package path, export record), exported once for the module from the
    session's untrained weights and graph. Tests read it; changes go to copies."""
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    source, graph = exported_weights(NAME)
    folder = tmp_path_factory.mktemp("packaged")
    for path in (source / get_spec(NAME).weights_file, graph,
                 graph.with_name(graph.name + ".json")):
        shutil.copy(path, folder / path.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ALLOW_UNTRAINED_ENV, "yes-these-scores-are-meaningless")
        record = modeladmin.export(NAME, folder, threads=1)
    return folder, package.package_path(get_spec(NAME), folder), record


@pytest.fixture
def exported(exported_once, allow_untrained):
    return exported_once


@pytest.fixture(scope="module")
def with_maps(exported_once) -> bytes:
    """The module's package, its manifest made again with PyTorch's maps on the check input
    (as `xrvd models export` makes it when it passes them): a package with heatmaps."""
    from xrvd.pipeline.cam import torch_scores_and_maps
    from xrvd.pipeline.weights import load_network

    folder, path, _ = exported_once
    spec = get_spec(NAME)
    found = package.read(path)
    network = load_network(spec, folder / spec.weights_file).network
    check = found.manifest["check"]
    manifest = package.build_manifest(
        spec, found.graph, weights_sha256=found.weights_sha256,
        untrained=found.manifest["untrained"],
        torchxrayvision_version=found.manifest["torchxrayvision_version"],
        reference=np.asarray(check["pytorch_scores"]), difference=check["max_abs_diff"],
        maps_reference=torch_scores_and_maps(network, onnxrt.check_input(224))[1])
    return package.encode(manifest, found.graph)


def batch() -> np.ndarray:
    return onnxrt.check_input(224, 4) * np.float32(0.5)


def test_a_package_scores_as_its_weights_without_them(exported, tmp_path):
    folder, path, record = exported
    manifest = package.read(path).manifest
    assert manifest["weights_sha256"] == record["weights_sha256"]
    assert manifest["check"]["max_abs_diff"] <= onnxrt.TOLERANCE
    assert manifest["labels"] == package.labels_of(get_spec(NAME))
    from_weights = Classifier.load(NAME, folder, threads=1, allow_untrained=True,
                                   backend="onnxruntime")
    alone = tmp_path / "service-weights"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    from_package = Classifier.load(NAME, alone, threads=1, allow_untrained=True)
    assert from_package.backend == "onnxruntime"
    assert from_package.identity == from_weights.identity  # the same reports, UIDs included
    np.testing.assert_array_equal(from_package.predict(batch()), from_weights.predict(batch()))
    with pytest.raises(Exception, match="loaded from its model package"):
        from_package.network  # noqa: B018 - the network needs the weights


def test_import_package_verifies_installs_and_records(exported, tmp_path, capsys):
    from xrvd.cli import main

    _, path, record = exported
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'site'}\n")
    assert main(["models", "import-package", str(path), "-c", str(config)]) == 0
    installed = tmp_path / "site" / "models" / path.name
    assert f"installed at {installed}" in capsys.readouterr().out
    assert installed.read_bytes() == path.read_bytes()
    entry = TrustedHashes(tmp_path / "site").entry(installed)
    assert entry["source"] == "package import"
    assert entry["weights_sha256"] == record["weights_sha256"]
    classifier = Classifier.load(NAME, installed.parent, threads=1, allow_untrained=True,
                                 trusted=TrustedHashes(tmp_path / "site"))
    assert classifier.identity.weights_sha256 == record["weights_sha256"]

    # Replaced afterwards by another (valid) package: refused, as changed weights are.
    other = package.read(installed)
    manifest = {**other.manifest, "created_at": "2000-01-01T00:00:00Z"}
    installed.write_bytes(package.encode(manifest, other.graph))
    with pytest.raises(PackageError, match="not the package that was installed"):
        Classifier.load(NAME, installed.parent, threads=1, allow_untrained=True,
                        trusted=TrustedHashes(tmp_path / "site"))


def repacked(path, *, manifest=None, graph=None) -> bytes:
    found = package.read(path)
    return package.encode(manifest if manifest is not None else found.manifest,
                          graph if graph is not None else found.graph)


def with_members(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def damaged(path, how: str) -> bytes:
    found = package.read(path)
    manifest, graph = found.manifest, found.graph
    text = json.dumps(manifest).encode()
    if how == "truncated":
        return path.read_bytes()[:len(graph) // 2]
    if how == "graph changed":
        flipped = bytearray(graph)
        flipped[len(flipped) // 2] ^= 0xFF
        return with_members({package.MANIFEST: text, package.GRAPH: bytes(flipped)})
    if how == "extra member":
        return with_members({package.MANIFEST: text, package.GRAPH: graph, "run.py": b"!"})
    if how == "compressed":
        return with_members({package.MANIFEST: text, package.GRAPH: graph}, zipfile.ZIP_DEFLATED)
    if how == "other model":
        return repacked(path, manifest={**manifest, "model": "densenet121-res224-nih"})
    if how == "labels changed":
        labels = [dict(label) for label in manifest["labels"]]
        labels[0]["operating_point"] = 0.99
        return repacked(path, manifest={**manifest, "labels": labels})
    if how == "scores changed":
        check = dict(manifest["check"], tolerance=1.0)  # xrvd's bound holds, not the claim
        check["pytorch_scores"] = [[v + 0.01 for v in row] for row in check["pytorch_scores"]]
        return repacked(path, manifest={**manifest, "check": check})
    if how == "other format":
        return repacked(path, manifest={**manifest, "format": 99})
    raise AssertionError(how)


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a readable model package"),
    ("graph changed", "does not match the sha256 in its manifest"),
    ("extra member", "not exactly manifest.json and model.onnx"),
    ("compressed", "compressed or larger"),
    ("other model", "it is a package of 'densenet121-res224-nih'"),
    ("labels changed", "operating points differ"),
    ("scores changed", "not the model it claims to be"),
    ("other format", "not a format-1"),
])
def test_a_damaged_or_substituted_package_is_refused(exported, tmp_path, how, message):
    _, path, _ = exported
    alone = tmp_path / "service-weights"
    alone.mkdir()
    (alone / path.name).write_bytes(damaged(path, how))
    with pytest.raises(PackageError, match=message):
        Classifier.load(NAME, alone, threads=1, allow_untrained=True)
    with pytest.raises(PackageError):  # nor installed (for whichever model it claims)
        package.install(alone / path.name, get_spec, tmp_path / "elsewhere", threads=1,
                        trusted=None)
    assert not (tmp_path / "elsewhere" / path.name).exists()


def test_a_file_larger_than_any_package_is_not_read(exported, tmp_path, monkeypatch):
    _, path, _ = exported
    monkeypatch.setattr(package, "MAX_PACKAGE_BYTES", path.stat().st_size - 1)
    with pytest.raises(PackageError, match="larger than any model package"):
        package.read(path)


def test_weights_other_than_the_packages_decide(exported, tmp_path, monkeypatch, events):
    from xrvd.pipeline.untrained import write_untrained_weights

    _, path, record = exported
    mixed = tmp_path / "mixed"
    write_untrained_weights(NAME, mixed, seed=1)  # new weights; the package is of the old
    shutil.copy(path, mixed / path.name)
    classifier = Classifier.load(NAME, mixed, threads=1, allow_untrained=True)
    assert classifier.identity.weights_sha256 != record["weights_sha256"]
    [ignored] = [e for e in events if e["event"] == "model.package_ignored"]
    assert ignored["reason"] == "exported from other weights than the weights file's"
    # Without PyTorch the new weights cannot run, and the package is not theirs: refused.
    monkeypatch.setattr(models_module, "torch_installed", lambda: False)
    with pytest.raises(PackageError, match="exported from other weights"):
        Classifier.load(NAME, mixed, threads=1, allow_untrained=True)


def test_an_untrained_package_is_refused_unless_allowed(exported, tmp_path, monkeypatch):
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    _, path, _ = exported
    monkeypatch.delenv(ALLOW_UNTRAINED_ENV)
    alone = tmp_path / "service-weights"
    alone.mkdir()
    shutil.copy(path, alone / path.name)
    with pytest.raises(UntrainedWeightsError, match="UNTRAINED"):
        Classifier.load(NAME, alone, threads=1)


def test_without_torch_and_without_a_package_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(models_module, "torch_installed", lambda: False)
    with pytest.raises(Exception, match="xrvd models import-package") as raised:
        Classifier.load(NAME, tmp_path, threads=1)
    assert f"xrvd models export {NAME}" in str(raised.value)


def test_without_torch_the_torch_backend_says_so(exported, monkeypatch):
    folder, _, _ = exported
    monkeypatch.setattr(models_module, "torch_installed", lambda: False)
    with pytest.raises(Exception, match="backend torch needs PyTorch"):
        Classifier.load(NAME, folder, threads=1, allow_untrained=True, backend="torch")



def test_a_full_install_with_its_weights_is_not_stopped_by_a_bad_package(exported, tmp_path,
                                                                          events):
    folder, path, record = exported
    mixed = tmp_path / "full"
    mixed.mkdir()
    for item in folder.iterdir():
        if item.is_file():
            shutil.copy(item, mixed / item.name)
    (mixed / path.name).write_bytes(damaged(path, "labels changed"))
    classifier = Classifier.load(NAME, mixed, threads=1, allow_untrained=True)
    assert classifier.identity.weights_sha256 == record["weights_sha256"]
    [ignored] = [e for e in events if e["event"] == "model.package_ignored"]
    assert "operating points differ" in ignored["reason"]


def installed(tmp_path, data: bytes):
    alone = tmp_path / "service-weights"
    alone.mkdir(exist_ok=True)
    (alone / f"{NAME}{package.SUFFIX}").write_bytes(data)
    return alone


def from_cache(exported_weights) -> Classifier:
    """The same graph from the session's ONNX cache (no package beside it)."""
    folder, _ = exported_weights(NAME)
    classifier = Classifier.load(NAME, folder, threads=1, allow_untrained=True,
                                 backend="onnxruntime")
    assert classifier.backend == "onnxruntime" and classifier.maps_unavailable is None
    return classifier


def test_a_package_with_maps_serves_the_graphs_heatmaps(exported, with_maps, tmp_path,
                                                        exported_weights):
    manifest = package.parse(tmp_path / "p", with_maps).manifest
    assert manifest["maps"] is True
    assert manifest["check"]["maps_max_abs_diff"] <= manifest["check"]["maps_tolerance"]
    from_package = Classifier.load(NAME, installed(tmp_path, with_maps), threads=1,
                                   allow_untrained=True)
    assert from_package.maps_unavailable is None
    for got, expected in zip(from_package.predict_with_maps(batch()),
                             from_cache(exported_weights).predict_with_maps(batch()),
                             strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("manifest_says", ["maps false", "no maps key (older package)"])
def test_a_package_without_maps_scores_and_says_it_has_no_heatmaps(exported, with_maps,
                                                                   tmp_path, manifest_says,
                                                                   exported_weights):
    from xrvd.pipeline.models import MapsUnavailableError

    found = package.parse(tmp_path / "p", with_maps)
    manifest = {**found.manifest, "check": {
        k: v for k, v in found.manifest["check"].items() if not k.startswith(("maps",
                                                                             "pytorch_maps"))}}
    if manifest_says == "maps false":
        manifest["maps"] = False
    else:
        del manifest["maps"]
    classifier = Classifier.load(NAME, installed(tmp_path, package.encode(manifest,
                                                                          found.graph)),
                                 threads=1, allow_untrained=True)
    np.testing.assert_array_equal(classifier.predict(batch()),
                                  from_cache(exported_weights).predict(batch()))
    assert "export it again" in classifier.maps_unavailable
    with pytest.raises(MapsUnavailableError):
        classifier.predict_with_maps(batch())


def test_a_package_whose_maps_are_not_its_graphs_is_refused(with_maps, tmp_path):
    import base64

    found = package.parse(tmp_path / "p", with_maps)
    check = dict(found.manifest["check"])
    maps = package.recorded_maps(found.manifest).copy()
    maps[0, 0] = maps[0, 0, ::-1]  # the first map mirrored: same mean, wrong place
    check["pytorch_maps"] = {"shape": list(maps.shape), "float32_le_base64":
                             base64.b64encode(maps.astype("<f4").tobytes()).decode()}
    mirrored = package.encode({**found.manifest, "check": check}, found.graph)
    with pytest.raises(PackageError, match="maps on the check input differ"):
        Classifier.load(NAME, installed(tmp_path, mirrored), threads=1, allow_untrained=True)
    del check["pytorch_maps"]
    missing = package.encode({**found.manifest, "check": check}, found.graph)
    with pytest.raises(PackageError, match="lacks PyTorch's maps"):
        Classifier.load(NAME, installed(tmp_path, missing), threads=1, allow_untrained=True)

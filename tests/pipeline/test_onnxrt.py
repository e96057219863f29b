"""The ONNX Runtime backend (pipeline/onnxrt.py): same scores as PyTorch for every model, a
cache that is rebuilt when the weights or the exporter change and never trusted when damaged
or not recorded, a fallback to torch that says why, and a cached graph that runs without
torch. A test about exporting starts from weights alone, in a folder of its own
(weights_copy); one that needs a cache to damage, forge or load starts from a copy of the
graph exported once per session (ready_weights)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from structlog.testing import capture_logs

from xrvd.errors import ImageError
from xrvd.pipeline import onnxrt
from xrvd.pipeline.convert import prepare_file
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import MODELS, get_spec
from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

from ..harness import CXR, REPO

# Info events reach capture_logs even after a CLI call configured logging at warning.
pytestmark = pytest.mark.usefixtures("every_event_level")

DENSENET = "densenet121-res224-rsna"  # the quickest to export


@pytest.fixture(scope="session")
def fixture_inputs():
    """resolution -> every shared fixture image that converts, as one (N, 1, R, R) batch."""
    batches: dict[int, np.ndarray] = {}

    def inputs(resolution: int) -> np.ndarray:
        if resolution not in batches:
            arrays = []
            for path in sorted(CXR.iterdir()):
                try:
                    arrays.append(prepare_file(path, resolution).array)
                except ImageError:
                    continue
            batches[resolution] = np.concatenate(arrays)
        return batches[resolution]

    return inputs


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def graphs(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.json")))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_scores_the_same_on_both_backends(name, exported_weights, fixture_inputs):
    spec = get_spec(name)
    folder, _ = exported_weights(name)  # exported once per run, through Classifier.load
    fast = Classifier.load(name, folder, allow_untrained=True, backend="onnxruntime")
    eager = Classifier.load(name, folder, allow_untrained=True, backend="torch")
    assert (fast.backend, eager.backend) == ("onnxruntime", "torch")
    assert fast.identity == eager.identity
    batch = fixture_inputs(spec.resolution)
    assert len(batch) >= 5
    expected = eager.predict(batch)
    # Batches of 4 then the rest: the graph's batch axis is dynamic.
    scores = fast.predict_many(list(batch[:, None]), batch_size=4)
    assert scores.shape == (len(batch), len(spec.labels)) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert np.abs(scores - expected).max() <= 1e-4
    # The comparison means something only if the scores depend on the image.
    assert np.ptp(expected, axis=0).max() > 1e-3
    # Heatmaps on both backends exactly where the architecture has them (test_cam.py).
    assert (fast.maps_unavailable is None) == (eager.maps_unavailable is None) == (
        spec.maps_unsupported is None)


def test_a_cached_graph_loads_without_torch(ready_weights, allow_untrained):
    folder = ready_weights(DENSENET, recorded=False)  # the graph exported once per session
    assert Classifier.load(DENSENET, folder).backend == "onnxruntime"
    probe = (
        "import sys\n"
        "import numpy as np\n"
        "from xrvd.pipeline.models import Classifier\n"
        f"c = Classifier.load({DENSENET!r}, {str(folder)!r})\n"
        "s = c.predict(np.zeros((2, 1, 224, 224), np.float32))\n"
        "print(c.backend, s.shape, 'torch' in sys.modules, 'torchxrayvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, ALLOW_UNTRAINED_ENV:
                                         "yes-these-scores-are-meaningless"}, timeout=120)
    assert done.returncode == 0, done.stderr
    # (the last line: unconfigured structlog prints the load's events first)
    assert done.stdout.splitlines()[-1].split() == ["onnxruntime", "(2,", "2)", "False", "False"]


def test_export_is_rebuilt_when_the_weights_or_the_exporter_change(weights_copy, allow_untrained,
                                                                  monkeypatch, fixture_inputs):
    import torch

    folder = weights_copy(DENSENET)
    path = folder / get_spec(DENSENET).weights_file
    batch = fixture_inputs(224)
    with capture_logs() as logs:
        first = Classifier.load(DENSENET, folder)
        again = Classifier.load(DENSENET, folder)
    assert [e["source"] for e in events(logs, "model.backend")] == ["exported", "cache"]
    assert len(events(logs, "model.exported")) == 1
    before = graphs(folder)
    assert len(before) == 2 and first.identity.weights_sha256[:16] in before[0]
    assert np.array_equal(first.predict(batch), again.predict(batch))

    # New weights (the same marker, a shifted classifier bias): a new graph, the old one goes.
    network = torch.load(path, weights_only=False)
    with torch.no_grad():
        network.classifier.bias += 1.0
    torch.save(network, path)
    with capture_logs() as logs:
        changed = Classifier.load(DENSENET, folder)
    assert events(logs, "model.exported")[0]["verified"] is True
    assert changed.identity.weights_sha256 != first.identity.weights_sha256
    after = graphs(folder)
    assert len(after) == 2 and not set(after) & set(before)
    eager = Classifier.load(DENSENET, folder, backend="torch")
    scores = changed.predict(batch)
    assert np.abs(scores - eager.predict(batch)).max() <= 1e-4
    assert np.abs(scores - first.predict(batch)).max() > 1e-3

    # A new exporter version (torch upgrade, export code change): rebuilt too.
    monkeypatch.setattr(onnxrt, "EXPORT_REVISION", onnxrt.EXPORT_REVISION + 1)
    with capture_logs() as logs:
        assert Classifier.load(DENSENET, folder).backend == "onnxruntime"
    assert len(events(logs, "model.exported")) == 1
    assert len(graphs(folder)) == 2 and not set(graphs(folder)) & set(after)


def _truncate(graph, sidecar):
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])


def _garbage_of_the_same_size(graph, sidecar):
    graph.write_bytes(os.urandom(graph.stat().st_size))


def _garbage_with_a_matching_sidecar(graph, sidecar):
    """Damage the sha256 check cannot see: the graph itself must fail to load."""
    data = b"not an onnx graph" * 1000
    graph.write_bytes(data)
    record = json.loads(sidecar.read_text())
    record.update(onnx_size=len(data), onnx_sha256=hashlib.sha256(data).hexdigest())
    sidecar.write_text(json.dumps(record))


def _garbage_sidecar(graph, sidecar):
    sidecar.write_bytes(b"\x00{ not json")


def _graph_missing(graph, sidecar):
    graph.unlink()


def _sidecar_missing(graph, sidecar):
    sidecar.unlink()


@pytest.mark.parametrize("damage", [
    _truncate, _garbage_of_the_same_size, _garbage_sidecar, _graph_missing, _sidecar_missing,
], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_never_trusted(damage, ready_weights, allow_untrained):
    """Damage the sidecar or the sha256 check sees: the cache is invalid, with its reason
    (Classifier.load rebuilds every invalid cache alike; see the test below)."""
    folder = ready_weights(DENSENET, recorded=False)  # the graph exported once per session
    weights_sha256 = Classifier.load(DENSENET, folder).identity.weights_sha256
    spec = get_spec(DENSENET)
    graph = folder / next(n for n in graphs(folder) if n.endswith(".onnx"))
    assert onnxrt.check_cache(spec, folder, weights_sha256).status == "verified"
    damage(graph, graph.with_name(graph.name + ".json"))
    cached = onnxrt.check_cache(spec, folder, weights_sha256)
    assert (cached.status, cached.path, cached.graph) == ("invalid", graph, None)
    assert cached.reason


@pytest.mark.parametrize("damage", [_truncate, _garbage_with_a_matching_sidecar],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_rebuilt(damage, ready_weights, allow_untrained, fixture_inputs):
    """An invalid cache is exported again; a graph whose damage the sha256 check cannot see
    (its sidecar rewritten to match) fails to load and is rebuilt too."""
    folder = ready_weights(DENSENET, recorded=False)  # the graph exported once per session
    first = Classifier.load(DENSENET, folder)
    graph = folder / next(n for n in graphs(folder) if n.endswith(".onnx"))
    sidecar = graph.with_name(graph.name + ".json")
    intact = graph.read_bytes()
    damage(graph, sidecar)
    with capture_logs() as logs:
        rebuilt = Classifier.load(DENSENET, folder)
    assert events(logs, "model.export_invalid")[0]["path"] == str(graph)
    assert events(logs, "model.backend")[0]["source"] == "exported"
    assert rebuilt.backend == "onnxruntime"
    assert graph.read_bytes() == intact  # the export is deterministic
    assert onnxrt.check_cache(get_spec(DENSENET), folder,
                              first.identity.weights_sha256).status == "verified"
    batch = fixture_inputs(224)
    assert np.array_equal(rebuilt.predict(batch), first.predict(batch))


def _config_with_state(tmp_path, folder):
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  name: {DENSENET}\n"
                      f"  weights_dir: {folder}\n")
    return config


def test_a_graph_changed_after_export_is_rebuilt_even_with_a_matching_sidecar(
        ready_weights, allow_untrained, tmp_path, fixture_inputs):
    """The sidecar sits beside the graph: whoever can write one can write both. Only the
    record in the state directory tells the exported graph from another one."""
    import torch

    from xrvd.config import load_config
    from xrvd.pipeline import weights

    spec = get_spec(DENSENET)
    folder = ready_weights(DENSENET)  # exported once per session, recorded in the state dir
    config = _config_with_state(tmp_path, folder)
    first = Classifier.from_config(load_config(config))
    graph = folder / next(n for n in graphs(folder) if n.endswith(".onnx"))
    sidecar = graph.with_name(graph.name + ".json")
    intact = graph.read_bytes()

    # A graph that runs and scores otherwise, with a sidecar rewritten to vouch for it.
    network = weights.load_network(spec, folder / spec.weights_file).network
    with torch.no_grad():
        network.classifier.bias += 3.0
    forged = onnxrt.export_graph(network, spec)
    graph.write_bytes(forged)
    record = json.loads(sidecar.read_text())
    record.update(onnx_size=len(forged), onnx_sha256=hashlib.sha256(forged).hexdigest())
    sidecar.write_text(json.dumps(record))
    assert onnxrt.check_cache(spec, folder, first.identity.weights_sha256).status == "verified"

    with capture_logs() as logs:
        rebuilt = Classifier.from_config(load_config(config))
    [invalid] = events(logs, "model.export_invalid")
    assert invalid["path"] == str(graph) and "recorded" in invalid["reason"]
    assert events(logs, "model.backend")[0]["source"] == "exported"
    assert graph.read_bytes() == intact
    batch = fixture_inputs(224)
    assert np.array_equal(rebuilt.predict(batch), first.predict(batch))


def test_a_graph_exported_without_a_record_is_rebuilt_once(ready_weights, allow_untrained,
                                                           tmp_path):
    from xrvd.config import load_config

    folder = ready_weights(DENSENET, recorded=False)  # exported with no state dir
    assert Classifier.load(DENSENET, folder).backend == "onnxruntime"
    config = _config_with_state(tmp_path, folder)
    with capture_logs() as logs:
        Classifier.from_config(load_config(config))
    assert "not recorded" in events(logs, "model.export_invalid")[0]["reason"]
    assert events(logs, "model.backend")[0]["source"] == "exported"
    with capture_logs() as logs:
        assert Classifier.from_config(load_config(config)).backend == "onnxruntime"
    assert events(logs, "model.backend")[0]["source"] == "cache"


def test_a_model_that_cannot_be_exported_runs_on_torch(weights_copy, allow_untrained,
                                                       monkeypatch, fixture_inputs):
    def refuse(network, spec):
        raise RuntimeError("Exporting the operator 'aten::something' is not supported")

    monkeypatch.setattr(onnxrt, "export_graph", refuse)
    folder = weights_copy(DENSENET)
    with capture_logs() as logs:
        classifier = Classifier.load(DENSENET, folder)
    assert classifier.backend == "torch"
    [fallback] = events(logs, "model.backend_fallback")
    assert fallback["log_level"] == "warning" and fallback["reason"] == "export_failed"
    assert "aten::something" in fallback["error"]
    assert graphs(folder) == []  # nothing cached: the next start tries again
    assert classifier.predict(fixture_inputs(224)).shape == (len(fixture_inputs(224)), 2)


def test_a_graph_that_differs_from_torch_is_refused(weights_copy, allow_untrained, monkeypatch):
    real = onnxrt.torch_scores
    monkeypatch.setattr(onnxrt, "torch_scores", lambda net, batch: real(net, batch) + 3e-4)
    folder = weights_copy(DENSENET)
    with capture_logs() as logs:
        assert Classifier.load(DENSENET, folder).backend == "torch"
    [fallback] = events(logs, "model.backend_fallback")
    assert fallback["reason"] == "scores_differ"
    assert fallback["max_abs_diff"] == pytest.approx(3e-4, rel=0.05)
    assert fallback["tolerance"] == 1e-4
    # The verdict is recorded (no graph kept): the next start does not export again.
    [sidecar] = graphs(folder)
    assert json.loads((folder / sidecar).read_text())["verified"] is False
    monkeypatch.setattr(onnxrt, "torch_scores", real)
    with capture_logs() as logs:
        assert Classifier.load(DENSENET, folder).backend == "torch"
    assert events(logs, "model.backend_fallback")[0]["reason"] == "scores_differ"
    assert events(logs, "model.exported") == []


def test_untrained_weights_refuse_to_run_from_a_cached_graph(ready_weights, monkeypatch):
    from xrvd.errors import UntrainedWeightsError

    folder = ready_weights(DENSENET, recorded=False)
    assert Classifier.load(DENSENET, folder, allow_untrained=True).backend == "onnxruntime"
    monkeypatch.delenv(ALLOW_UNTRAINED_ENV, raising=False)
    with pytest.raises(UntrainedWeightsError, match="UNTRAINED"):
        Classifier.load(DENSENET, folder)


def test_the_maps_output_leaves_the_scores_as_they_were(ready_weights, allow_untrained,
                                                         fixture_inputs):
    """The graph before it had maps (`network(x)` exported alone) and the graph with them
    give the very same scores; the maps were checked at export, and the record says so."""
    import contextlib
    import io
    import warnings

    import torch

    from xrvd.pipeline import weights

    spec = get_spec(DENSENET)
    folder = ready_weights(DENSENET, recorded=False)
    network = weights.load_network(spec, folder / spec.weights_file).network
    before = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.from_numpy(onnxrt.check_input(224, 2)),), before,
                          dynamo=False, opset_version=onnxrt.OPSET, input_names=["image"],
                          output_names=["scores"], do_constant_folding=True,
                          dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})
    graph = folder / next(n for n in graphs(folder) if n.endswith(".onnx"))
    record = json.loads(graph.with_name(graph.name + ".json").read_text())
    assert record["maps"] is True
    assert record["maps_max_abs_diff"] <= record["maps_tolerance"]
    batch = fixture_inputs(224)
    old = onnxrt.Runner(before.getvalue(), spec, threads=1)
    new = onnxrt.Runner(graph.read_bytes(), spec, threads=1)
    assert (old.has_maps, new.has_maps) == (False, True)
    np.testing.assert_array_equal(new.run(batch), old.run(batch))
    np.testing.assert_array_equal(new.run_with_maps(batch)[0], old.run(batch))


def test_maps_that_differ_from_torch_leave_the_scores_in_service(weights_copy, allow_untrained,
                                                                 monkeypatch, fixture_inputs):
    from xrvd.pipeline import cam
    from xrvd.pipeline.models import MapsUnavailableError

    real = cam.torch_scores_and_maps

    def maps_off_by_a_hundredth(network, batch):
        scores, maps = real(network, batch)
        return scores, maps + 0.01

    monkeypatch.setattr(cam, "torch_scores_and_maps", maps_off_by_a_hundredth)
    folder = weights_copy(DENSENET)
    with capture_logs() as logs:
        classifier = Classifier.load(DENSENET, folder)
    [differ] = events(logs, "model.maps_differ")
    assert differ["max_abs_diff"] == pytest.approx(0.01, rel=0.01)
    assert classifier.backend == "onnxruntime" and "no checked maps" in \
        classifier.maps_unavailable
    with pytest.raises(MapsUnavailableError):
        classifier.predict_with_maps(fixture_inputs(224))
    # The verdict is kept with the graph: from the cache, still scores without maps.
    monkeypatch.setattr(cam, "torch_scores_and_maps", real)
    sidecar = folder / next(n for n in graphs(folder) if n.endswith(".json"))
    assert json.loads(sidecar.read_text())["maps"] is False
    with capture_logs() as logs:
        again = Classifier.load(DENSENET, folder)
    assert events(logs, "model.backend")[0]["source"] == "cache"
    assert again.maps_unavailable is not None
    assert Classifier.load(DENSENET, folder, backend="torch").maps_unavailable is None

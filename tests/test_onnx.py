"""The ONNX Runtime backend: same scores as PyTorch for every model, a cache that is rebuilt
when the weights or the exporter change and never trusted when damaged, a fallback to torch
that says why, `xrvd models export`, and thread counts that respect affinity and cgroups."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from structlog.testing import capture_logs

from xrvd.cli import main
from xrvd.errors import ImageError
from xrvd.pipeline import models as models_module
from xrvd.pipeline import onnxrt
from xrvd.pipeline.convert import prepare_file
from xrvd.cpus import available_cpus
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.registry import MODELS, get_spec
from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

from .conftest import CXR, REPO

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


@pytest.fixture(autouse=True)
def every_event_level():
    """Info events reach capture_logs even after a CLI call configured logging at warning."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def graphs(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.json")))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_scores_the_same_on_both_backends(name, untrained_weights, fixture_inputs):
    spec = get_spec(name)
    folder = untrained_weights(name)  # shared by the session: each model is exported once
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


def test_a_cached_graph_loads_without_torch(weights_copy, allow_untrained):
    folder = weights_copy(DENSENET)
    assert Classifier.load(DENSENET, folder).backend == "onnxruntime"  # exports
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
    _truncate, _garbage_of_the_same_size, _garbage_with_a_matching_sidecar, _garbage_sidecar,
    _graph_missing, _sidecar_missing,
], ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_rebuilt_never_trusted(damage, weights_copy, allow_untrained,
                                                  fixture_inputs):
    folder = weights_copy(DENSENET)
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
        weights_copy, allow_untrained, tmp_path, fixture_inputs):
    """The sidecar sits beside the graph: whoever can write one can write both. Only the
    record in the state directory tells the exported graph from another one."""
    import torch

    from xrvd.config import load_config
    from xrvd.pipeline import weights

    spec = get_spec(DENSENET)
    folder = weights_copy(DENSENET)
    config = _config_with_state(tmp_path, folder)
    first = Classifier.from_config(load_config(config))  # exports and records the graph
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


def test_a_graph_exported_without_a_record_is_rebuilt_once(weights_copy, allow_untrained,
                                                           tmp_path):
    from xrvd.config import load_config

    folder = weights_copy(DENSENET)
    assert Classifier.load(DENSENET, folder).backend == "onnxruntime"  # no state dir
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


def test_untrained_weights_refuse_to_run_from_a_cached_graph(weights_copy, monkeypatch):
    from xrvd.errors import UntrainedWeightsError

    folder = weights_copy(DENSENET)
    assert Classifier.load(DENSENET, folder, allow_untrained=True).backend == "onnxruntime"
    monkeypatch.delenv(ALLOW_UNTRAINED_ENV, raising=False)
    with pytest.raises(UntrainedWeightsError, match="UNTRAINED"):
        Classifier.load(DENSENET, folder)


def test_backend_torch_and_the_config(weights_copy, allow_untrained, tmp_path):
    from xrvd.config import load_config

    folder = weights_copy(DENSENET)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  name: {DENSENET}\n"
                      f"  weights_dir: {folder}\n  backend: torch\n  threads: 1\n")
    classifier = Classifier.from_config(load_config(config))
    assert classifier.backend == "torch"
    assert graphs(folder) == []  # torch never exports
    assert load_config(None).model.backend == "auto"


def test_models_export_command(weights_copy, allow_untrained, tmp_path, capsys):
    from xrvd.config import load_config

    folder = weights_copy(DENSENET)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nmodel:\n  weights_dir: {folder}\n")
    assert main(["models", "export", DENSENET, "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    path = out.strip()
    assert path.endswith(".onnx") and os.path.dirname(path) == str(folder)
    assert "verified against PyTorch" in err
    record = json.loads(open(path + ".json").read())
    assert record["verified"] is True and record["max_abs_diff"] <= 1e-4
    assert record["weights_sha256"] == hashlib.sha256(
        (folder / get_spec(DENSENET).weights_file).read_bytes()).hexdigest()
    written = os.stat(path).st_mtime_ns, os.stat(path + ".json").st_mtime_ns
    assert main(["models", "export", DENSENET, "-c", str(config)]) == 0  # found, not rebuilt
    assert capsys.readouterr().out.strip() == path
    assert (os.stat(path).st_mtime_ns, os.stat(path + ".json").st_mtime_ns) == written
    assert main(["models", "export", DENSENET, "--force", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == path
    assert os.stat(path + ".json").st_mtime_ns != written[1]
    # The daemon's way in finds it too: the command recorded it in the state directory.
    from xrvd.pipeline.weights import TrustedHashes

    assert onnxrt.check_cache(get_spec(DENSENET), folder, record["weights_sha256"],
                              trusted=TrustedHashes(tmp_path / "state")).status == "verified"
    classifier = Classifier.from_config(load_config(config), name=DENSENET)
    assert classifier.backend == "onnxruntime"

    empty = tmp_path / "empty.yaml"
    empty.write_text(f"state_dir: {tmp_path / 'other'}\n")
    assert main(["models", "export", DENSENET, "-c", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and f"xrvd models fetch {DENSENET}" in err


# --- threads -------------------------------------------------------------------------------


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def fake_root(tmp_path, cgroup_line: str, files: dict[str, str]):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup_line + "\n")
    for name, text in files.items():
        target = tmp_path / "sys/fs/cgroup" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return tmp_path


def test_threads_follow_cpu_affinity(four_cpus, tmp_path):
    root = fake_root(tmp_path, "0::/system.slice/xrvd.service",
                     {"system.slice/xrvd.service/cpu.max": "max 100000\n"})
    assert available_cpus(root) == 4
    assert available_cpus(tmp_path / "no-proc-here") == 4


@pytest.mark.parametrize(("files", "expected"), [
    ({"system.slice/xrvd.service/cpu.max": "200000 100000\n"}, 2),
    ({"system.slice/xrvd.service/cpu.max": "150000 100000\n"}, 1),  # rounded down
    ({"system.slice/xrvd.service/cpu.max": "50000 100000\n"}, 1),   # never 0
    ({"system.slice/xrvd.service/cpu.max": "max 100000\n",           # a parent's quota counts
      "system.slice/cpu.max": "300000 100000\n"}, 3),
    ({"cpu.max": "200000 100000\n"}, 2),  # a container: only the mount's root is visible
    ({"system.slice/xrvd.service/cpu.max": "800000 100000\n"}, 4),  # affinity is lower
])
def test_threads_follow_the_cgroup_v2_quota(four_cpus, tmp_path, files, expected):
    root = fake_root(tmp_path, "0::/system.slice/xrvd.service", files)
    assert available_cpus(root) == expected


def test_threads_follow_the_cgroup_v1_quota(four_cpus, tmp_path):
    root = fake_root(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert available_cpus(root) == 2
    (root / "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(root) == 4


def test_threads_zero_means_the_available_cpus(weights_copy, allow_untrained, monkeypatch):
    monkeypatch.setattr(models_module, "available_cpus", lambda: 1)
    folder = weights_copy(DENSENET)
    with capture_logs() as logs:
        Classifier.load(DENSENET, folder)
    assert events(logs, "model.backend")[0]["threads"] == 1

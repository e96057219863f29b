"""`xrvd backfill --engine ray` on a real Ray cluster of three nodes on this machine (a head and
two workers, on loopback, started once for the module): the folder back-fill's archive gives
the local engine's journal rows, scores (within 1e-5), reports and heatmaps; files prepared on the
cluster give the local arrays bit for bit and the local skip reasons; a worker node killed
midway and a driver killed midway leave every image classified once and one report per
study; without Ray the engine says how to install it."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xrvd.cli import main
from xrvd.cluster import ClusterError, RaySubmit, actor_count, connect, ray_module
from xrvd.commands.backfill import BackfillRequest, interruptible
from xrvd.commands.backfill_ray import RayBackfill
from xrvd.config import BackfillConfig
from xrvd.errors import EXIT_ERROR, EXIT_OK
from xrvd.events import ImagesClassified
from xrvd.pipeline.convert import ConvertOptions
from xrvd.pipeline.prepare import PrepareJob, prepare_instance
from xrvd.pipeline.select import SelectRules

from ..harness import (
    FRONTAL,
    MODEL,
    REJECT,
    TINY_CR,
    WG04_CR,
    DaemonProcess,
    build_archive,
    journal_rows,
    reports_by_study,
    runs_per_image,
    write_config,
)

# Loopback, but not 127.0.0.1: Ray takes that (and localhost) for this machine's own address
# on the network and would connect there.
NODE_IP = "127.0.0.2"
STORE_BYTES = 80 * 2**20


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (1 CPU: the driver's node) and two worker nodes (2 CPUs each), each with its own
    raylet and object store; node failures are noticed within about 3 s."""
    ray_module()  # imported as the engine imports it
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": NODE_IP, "num_cpus": 1, "object_store_memory": STORE_BYTES,
        "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    try:
        for _ in range(2):
            cluster.add_node(node_ip_address=NODE_IP, num_cpus=2,
                             object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def configure(folder: Path, weights: Path, engine: str, address: str, batch_size: int = 2,
              actors: int = 2, **output) -> Path:
    return write_config(folder, weights, output={"folder": str(folder / "out"), **output},
                        model={"batch_size": batch_size},
                        backfill={"engine": engine, "ray_address": address, "actors": actors})


def journal(state: Path) -> dict[str, list]:
    return {
        "instances": sorted(journal_rows(state, "SELECT sop_uid, state, reason, selected "
                                                "FROM instances")),
        "files": sorted(journal_rows(state, "SELECT path, outcome, reason FROM archive_files")),
        "studies": sorted(journal_rows(state, "SELECT study_uid, state, attempts FROM studies")),
    }


def scores(state: Path) -> dict[tuple[str, str], float]:
    return {(sop, label): score for sop, label, score in journal_rows(
        state, "SELECT i.sop_uid, s.label, s.score FROM scores s "
               "JOIN instances i ON i.id = s.instance_id")}


def sidecar_scores(output: Path) -> dict[tuple[str, str], float]:
    found = {}
    for path in output.rglob("*.json"):
        for image in json.loads(path.read_text())["images"]:
            for finding in image["findings"]:
                found[image["sop_instance_uid"], finding["label"]] = finding["score"]
    return found


def test_the_ray_engine_gives_the_local_engines_journal_scores_and_reports(
        tmp_path, ready_weights, allow_untrained, ray_cluster, capsys):
    archive = tmp_path / "archive"
    expected_sops, expected_studies = build_archive(archive, copies=2)
    weights = ready_weights(MODEL, tmp_path / "local" / "state")
    ready_weights(MODEL, tmp_path / "ray" / "state")
    local = configure(tmp_path / "local", weights, "local", ray_cluster.address, heatmaps=True)
    on_ray = configure(tmp_path / "ray", weights, "ray", ray_cluster.address, heatmaps=True)

    assert main(["backfill", "-c", str(local), "-r", "--workers", "0", str(archive)]) == EXIT_OK
    assert main(["backfill", "-c", str(on_ray), "-r", str(archive)]) == EXIT_OK
    table = dict(line.strip().split("  ", 1) for line in capsys.readouterr().err.splitlines()
                 if line.startswith("  ") and "  " in line.strip())
    assert table["engine"].strip() == f"ray at {ray_cluster.address}: 3 nodes, 5 CPUs, 0 GPUs"
    assert table["model actors"].strip() == "2 on 2 nodes (2 onnxruntime on cpu)", table

    here, there = tmp_path / "local" / "state", tmp_path / "ray" / "state"
    assert journal(there) == journal(here)
    skipped = {reason for _, state, reason, _ in journal(there)["instances"]
               if state == "skipped"}
    assert {"modality", "lateral_view", "too_small", "not_an_image", "truncated"} <= skipped
    local_scores, ray_scores = scores(here), scores(there)
    assert {sop for sop, _ in ray_scores} == expected_sops
    assert ray_scores.keys() == local_scores.keys()
    assert max(abs(ray_scores[key] - local_scores[key]) for key in local_scores) <= 1e-5
    assert set(runs_per_image(there).values()) == {1}

    local_reports, ray_reports = (
        {study: [path.name for path in paths] for study, paths in reports_by_study(out).items()}
        for out in (tmp_path / "local" / "out", tmp_path / "ray" / "out"))
    assert len(ray_reports) == len(expected_studies)
    assert ray_reports == local_reports  # one per study, under the same names
    assert all(len(files) == 1 for files in ray_reports.values())
    heatmaps = {engine: sorted(str(path.relative_to(tmp_path / engine / "out"))
                               for path in (tmp_path / engine / "out").rglob("*-heatmaps/*.dcm"))
                for engine in ("local", "ray")}
    assert heatmaps["ray"] == heatmaps["local"] and len(heatmaps["ray"]) >= len(expected_sops)
    local_sidecars = sidecar_scores(tmp_path / "local" / "out")
    ray_sidecars = sidecar_scores(tmp_path / "ray" / "out")
    assert ray_sidecars.keys() == local_sidecars.keys()
    assert all(abs(ray_sidecars[key] - local_sidecars[key]) <= 1e-5 for key in local_sidecars)


def test_files_prepared_on_the_cluster_give_the_local_arrays_and_reasons(
        tmp_path, ray_cluster, crafted):
    files = [*FRONTAL, TINY_CR, *sorted(REJECT.glob("*.dcm")), *crafted.values()]
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(WG04_CR.read_bytes()[:WG04_CR.stat().st_size // 2])
    files += [truncated, tmp_path / "gone.dcm"]
    jobs = [PrepareJob(n, str(path)) for n, path in enumerate(files)]
    function = functools.partial(prepare_instance, rules=SelectRules(), options=ConvertOptions(),
                                 resolution=224)
    local = [function(job) for job in jobs]

    with connect(ray_cluster.address) as cluster:
        remote = RaySubmit(cluster.ray, chunk=3)(function, jobs)()
        arrays = [None if p.array is None else p.array.fetch(cluster.ray) for p in remote]
        # (and the actors' default count: one per node with a CPU for one; GPUs: none here)
        assert (cluster.nodes, cluster.cpus) == (3, 5)
        assert actor_count(cluster, BackfillConfig()) == 3
        with pytest.raises(ClusterError, match="no GPUs for actors of 0.5 GPU"):
            actor_count(cluster, BackfillConfig(gpus_per_actor=0.5))

    assert [p.instance_id for p in remote] == [p.instance_id for p in local]
    for here, there, array in zip(local, remote, arrays, strict=True):
        assert (there.skip_reason, there.skip_detail, there.error) == (
            here.skip_reason, here.skip_detail, here.error)
        assert there.header == here.header
        if here.array is None:
            assert array is None
        else:
            assert array.dtype == here.array.dtype and array.shape == here.array.shape
            assert array.tobytes() == here.array.tobytes()
    assert sum(p.array is not None for p in local) == 3  # the three frontal images
    assert {p.skip_reason for p in local} >= {"no_pixel_data", "modality", "truncated",
                                              "invalid_header", "file_missing"}


def test_the_driver_killed_midway_resumes_without_reporting_twice(
        tmp_path, ready_weights, ray_cluster):
    archive = tmp_path / "archive"
    expected_sops, expected_studies = build_archive(archive, copies=3)
    config = configure(tmp_path, ready_weights(MODEL), "ray", ray_cluster.address,
                       batch_size=1)
    command = ("backfill", str(archive), "--recursive")

    first = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    try:
        first.wait_until(lambda: any(e["classified"] for e in first.find("study.classified")),
                         timeout=240, what="a first study with a classified image")
        first.kill()
    finally:
        first.stop()
    done_before_kill = sum(e["classified"] for e in first.find("study.classified"))
    assert 0 < done_before_kill < len(expected_sops), "the kill must land part-way"

    second = DaemonProcess(config, tmp_path / "state", command, ready=None).start()
    assert second.wait(timeout=240) == 0, second.stderr[-3000:]
    assert second.find("backfill.cluster")
    runs = runs_per_image(tmp_path / "state")
    assert set(runs) == expected_sops and set(runs.values()) == {1}
    output = reports_by_study(tmp_path / "out")
    assert len(output) == len(expected_studies)
    assert all(len(files) == 1 for files in output.values())


def test_a_worker_node_lost_midway_loses_and_repeats_nothing(
        tmp_path, ready_weights, allow_untrained, ray_cluster):
    """Its raylet, object store, workers and model actor killed (SIGKILL) once the first study
    is recorded: its tasks run again elsewhere, its batches are made again, its actor restarts
    on another node, and the run ends with every image classified once."""
    archive = tmp_path / "archive"
    expected_sops, expected_studies = build_archive(archive, copies=5)
    config_path = configure(tmp_path, ready_weights(MODEL), "ray", ray_cluster.address,
                            batch_size=1)
    from xrvd.config import load_config

    config = load_config(config_path)
    request = BackfillRequest(paths=(archive,), recursive=True)
    killed: list[str] = []
    recorded_before: list[int] = []

    def kill_a_node_with_an_actor(backfill: RayBackfill, event) -> None:
        if killed or not (isinstance(event, ImagesClassified) and event.images):
            return  # (a study whose images were all skipped is recorded with none)
        on = {info["node"] for info in backfill.described}
        [node, *_] = [node for node in ray_cluster.worker_nodes if node.node_id in on]
        ray_cluster.remove_node(node, allow_graceful=False)
        killed.append(node.node_id)
        recorded_before.append(backfill.tally.classified)

    out = io.StringIO()
    try:
        with connect(config.backfill.ray_address) as cluster:
            backfill = RayBackfill(config, request, out, cluster)
            backfill.observe = functools.partial(kill_a_node_with_an_actor, backfill)
            assert interruptible(backfill.run) == EXIT_OK, out.getvalue()
    finally:
        while len(ray_cluster.worker_nodes) < 2:  # as the module's other tests expect it
            ray_cluster.add_node(node_ip_address=NODE_IP, num_cpus=2,
                                 object_store_memory=STORE_BYTES)

    assert killed and 0 < recorded_before[0] < len(expected_sops), "the kill must land midway"
    state = tmp_path / "state"
    runs = runs_per_image(state)
    assert set(runs) == expected_sops and set(runs.values()) == {1}
    assert journal_rows(state, "SELECT COUNT(*) FROM studies WHERE attempts > 0") == [(0,)]
    output = reports_by_study(tmp_path / "out")
    assert len(output) == len(expected_studies)
    assert all(len(files) == 1 for files in output.values())
    assert backfill.tally.classified == len(expected_sops)  # the whole archive in this run
    assert backfill.scorer.replaced == 1  # the actor on the lost node, started elsewhere


def test_without_ray_the_engine_says_how_to_install_it(tmp_path, untrained_weights):
    config = configure(tmp_path, untrained_weights(MODEL), "ray", "auto")
    (tmp_path / "archive").mkdir()
    script = ("import sys; sys.modules['ray'] = None\n"  # as if the extra were not installed
              "from xrvd.cli import main\n"
              f"sys.exit(main(['backfill', '-c', {str(config)!r}, {str(tmp_path / 'archive')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == EXIT_ERROR, done.stderr
    assert "needs Ray" in done.stderr and "uv sync --extra ray" in done.stderr


def test_a_pacs_source_is_refused_on_the_ray_engine(tmp_path, untrained_weights, capsys):
    config = configure(tmp_path, untrained_weights(MODEL), "local", "auto")
    assert main(["backfill", "-c", str(config), "--source", "pacs", "--engine", "ray"]) == \
        EXIT_ERROR
    assert "the Ray engine back-fills folders" in capsys.readouterr().err
    assert main(["backfill", "-c", str(config), "--engine", "ray", "--address", "nowhere",
                 str(tmp_path)]) == EXIT_ERROR
    assert "backfill.ray_address: must be auto, local" in capsys.readouterr().err

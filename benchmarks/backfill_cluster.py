"""`benchmarks/backfill.py --engine ray`: the Ray engine against the local one on this machine.

1. The local engine (`xrvd backfill`, its default worker processes) and the Ray engine on a
   one-node Ray cluster with the same cores: Ray's overhead (target: >= 0.85x).
2. The Ray engine on 1..N simulated nodes on this box (a head for the driver, N nodes of
   this box's cores each, one model actor per node, the engine's default): on a box of 2
   cores they can only share the same cores, so the table shows what each node costs
   (throughput lost, memory) rather than a speed-up.
3. What bounds the cluster's size: the driver. Its CPU time per image in the Ray runs'
   classify phase (the driver's own process: collecting outcomes, claims, journal, events),
   and its journal rate alone: the journal work per study (claim, list the instances, find an
   earlier report, record the run with every label's score in one fsync'd transaction), in
   outcomes (images) per second. A cluster scores at most about as many images per second as
   the lower of the two bounds allows, whatever its size.
Ray's nodes run on 127.0.0.2 (loopback, which Ray does not take for this machine's own
network address as it does 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

NODE_IP = "127.0.0.2"
STORE_BYTES = 200 * 2**20


def record_graph(weights: Path, state_dir: Path) -> None:
    """The exported ONNX graph recorded in a fresh state directory, as `xrvd models export`
    records it: each run loads it from the cache instead of exporting it again."""
    from xrvd.pipeline.trust import TrustedHashes

    for sidecar in weights.glob("*.onnx.json"):
        record = json.loads(sidecar.read_text())
        if record.get("verified") is True:
            TrustedHashes(state_dir).record(sidecar.with_name(record["onnx_file"]),
                                            record["onnx_sha256"], "export",
                                            weights_sha256=record["weights_sha256"])


def export_graph(args, model: str) -> None:
    from xrvd.pipeline.models import Classifier

    Classifier.load(model, Path(args.weights), allow_untrained=True, backend=args.backend)


class Cluster:
    """A Ray cluster on this box: a head without CPUs (the driver's node) and `nodes` nodes
    of `cpus` CPUs each. Its processes are children of this one (for the memory figures)."""

    def __init__(self, nodes: int, cpus: int):
        from xrvd.cluster import ray_module

        ray_module()  # imported as the engine imports it (Ray's uv run switch off)
        from ray.cluster_utils import Cluster as RayCluster

        self.cluster = RayCluster(initialize_head=True, head_node_args={
            "node_ip_address": NODE_IP, "num_cpus": 0, "object_store_memory": STORE_BYTES,
            "include_dashboard": False})
        for _ in range(nodes):
            self.cluster.add_node(node_ip_address=NODE_IP, num_cpus=cpus,
                                  object_store_memory=STORE_BYTES)
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address

    def close(self) -> None:
        self.cluster.shutdown()


def journal_rate(folder: Path, scratch: Path, model: str) -> dict:
    """Outcomes per second the driver records, on this machine's disk."""
    from xrvd.config import FINDING_NAMES
    from xrvd.store import Store
    from xrvd.store.archive import ArchiveFile
    from xrvd.store.records import read_header

    store = Store(scratch / f"journal-rate-{folder.name}")  # one per kind of archive
    try:
        files = sorted(folder.rglob("*.dcm"))
        for start in range(0, len(files), 256):
            store.register_in_place([ArchiveFile(path, path.stat(), read_header(path))
                                     for path in files[start:start + 256]])
        scores = dict.fromkeys(FINDING_NAMES, 0.5)
        recorded, studies = 0, 0
        started = time.perf_counter()
        while claims := store.claim_ready_studies(0.0, model, "0" * 64, limit=64):
            for claim in claims:
                rows = store.study_instances(claim.study_id)
                store.previous_result(claim)
                store.finish_run(claim, {row.id: scores for row in rows},
                                 scratch / "report.dcm", [], threshold=0.5)
                recorded += len(rows)
                studies += 1
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    return {"outcomes_per_s": recorded / elapsed, "studies_per_s": studies / elapsed,
            "images": recorded}


def peak_memory(measure, tree_rss_mb, pid: int) -> tuple[dict, float]:
    """measure() while the memory of `pid`'s process tree is sampled: (result, peak MB)."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(pid))
            done.wait(0.3)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return measure(), peak[0]
    finally:
        done.set()
        thread.join()


def main(args, folder: Path, scratch: Path, run_backfill, tree_rss_mb, label: str,
         model: str) -> None:
    cores = len(os.sched_getaffinity(0))
    export_graph(args, model)

    def run(name: str, extra: list[str]) -> dict:
        runs = scratch / f"run-{folder.name}-{name}"  # one per kind of archive, beside it
        record_graph(Path(args.weights), runs / "state")
        return run_backfill(args, folder, runs, extra=extra)

    local = run("local", [])
    print(f"{label:<28} {'local':<14} {local['images_per_s']:>9.1f} "
          f"{local['peak_rss_mb']:>12.0f}  xrvd backfill, {cores} cores: classify phase; "
          f"whole command {local['wall_images_per_s']:.1f} images/s")
    baseline, driver_ms = None, []
    for nodes in range(1, args.nodes + 1):
        started = time.perf_counter()
        cluster = Cluster(nodes, cores)
        up = time.perf_counter() - started
        try:
            result, peak = peak_memory(
                lambda: run(f"ray{nodes}", ["--engine", "ray", "--address", cluster.address]),
                tree_rss_mb, os.getpid())
        finally:
            cluster.close()
        baseline = baseline or result["images_per_s"]
        name = f"ray, {nodes} node{'s' if nodes > 1 else ''}"
        # (the peak of this process's tree: the cluster's processes and the driver's)
        print(f"{label:<28} {name:<14} {result['images_per_s']:>9.1f} "
              f"{peak:>12.0f}  {nodes} x {cores} CPUs, {nodes} "
              f"actor{'s' if nodes > 1 else ''}: {result['images_per_s'] / local['images_per_s']:.2f}x "
              f"local, {result['images_per_s'] / baseline:.2f}x one node; whole command "
              f"{result['wall_images_per_s']:.1f} images/s, cluster up in {up:.0f} s; "
              f"driver {result['classify_cpu_ms_per_image']:.1f} ms CPU per image")
        driver_ms.append(result["classify_cpu_ms_per_image"])
    rate = journal_rate(folder, scratch, model)
    cpu_ms = sum(driver_ms) / len(driver_ms)
    print(f"# the driver: {cpu_ms:.1f} ms of its own CPU per image (bound: "
          f"{1000 / max(cpu_ms, 1e-9):.0f} images/s per driver core); its journal alone "
          f"{rate['outcomes_per_s']:.0f} outcomes/s ({rate['studies_per_s']:.0f} one-image "
          f"studies/s, {rate['images']} recorded: claim, list, earlier report, one fsync'd "
          "transaction per study, on this disk)")

"""The worker's stages across a Ray cluster (`xrvd backfill --engine ray`, driven by
commands/backfill_ray.py): the journal and its bookkeeping stay in the driver.

Ray core (tasks and actors), not Ray Data. worker.Worker already is the pipeline a back-fill
promises: claims from the journal, selection verdicts and skip reasons, failed attempts
retried, a report found in the output folder adopted instead of written twice, one report per
study. It already hands its stages to a worker.Submit one round ahead of the model, and asks
its classifier for scores. Ray core fits those two seams without a second pipeline:
- RaySubmit is a worker.Submit: preparing (pipeline/prepare.py: read, select, decode, convert)
  and report writing (report/files.py) run as Ray tasks, a chunk of jobs each. Only what is
  small comes back to the driver (each image's outcome and header); the converted arrays stay
  in the object store of the node that made them, one batch per chunk.
- RemoteScorer stands for the Classifier in the Worker: predict_many hands those batches, by
  reference, to the model actors (ScoreActor: the same Classifier.load, on CPU or GPU, from the
  same ONNX cache), least busy first; each actor fetches them from the node that holds them.
Ray Data's streaming map_batches would move the images past the journal: a study's images
regrouped after scoring is an all-to-all step there, and every outcome the Worker records
(skips, failures, adoption, retries) would have to be rebuilt beside it. Here the rounds are
the backpressure: two rounds prepared or scored and one being written are in flight at most.

Failures: a task whose process or node is lost runs again elsewhere (max_retries), and a batch
lost with its node is made again by its task (Ray's lineage); an actor is restarted
(max_restarts) and its calls retried (max_task_retries). The driver collects each result once
and records it once: nothing is reported twice. A task lost beyond its retries fails its
images' studies for this attempt (retried up to study.max_attempts), as a crash in the local
pool does; with no model actor left the run stops, and the next run resumes.

Ray is imported only when asked for (ray_module): without the extra, the engine says how to
install it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import BackfillConfig, Config
from .errors import XrvdError
from .pipeline import onnxrt
from .pipeline.models import Classifier
from .pipeline.package import package_path
from .pipeline.prepare import Prepared, PrepareJob
from .pipeline.registry import get_spec
from .pipeline.trust import TrustedHashes
from .pipeline.weights import weights_path
from .pool import PREPARE_NICENESS, load_libraries
from .report.files import ReportWritten

INSTALL = "uv sync --extra ray"
TASK_RETRIES = 3  # a task's process or node lost: run again elsewhere, this many times
ACTOR_RESTARTS = 3
ACTOR_START_SECONDS = 600.0  # a cluster scaling up for the actors may take minutes
IN_FLIGHT_PER_ACTOR = 2  # one batch scored while the next one is fetched


class ClusterError(XrvdError):
    reason = "cluster_error"


def ray_module():
    """Ray, imported now. Its `uv run` integration (on by default) would start every worker
    with `uv run` in a copy of the current folder, that is a fresh virtual environment per
    node: the nodes run xrvd as installed there instead. The switch is Ray's documented
    environment variable, read when Ray is imported, and left alone where it is set."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            f"--engine ray needs Ray, which this install does not have ({exc}): install the "
            f"ray extra here and on every node of the cluster (`{INSTALL}`, or "
            "`pip install 'xrvd[ray]'`), or back-fill with --engine local") from None
    return ray


def setup_worker() -> None:
    """Run in each of the run's Ray worker processes before its first task: pydicom's and
    highdicom's warnings quote values from the data (patient names among them) and would land
    in the node's Ray logs; outcomes come back as results (as in pool.py's processes)."""
    warnings.simplefilter("ignore")


@dataclass(frozen=True)
class Cluster:
    ray: Any  # the ray module
    address: str
    nodes: int
    cpus: float
    gpus: float


@contextmanager
def connect(address: str) -> Iterator[Cluster]:
    """The driver connected to the cluster at `address` (see config.BackfillConfig), and
    disconnected afterwards (its tasks and actors end with it). Ray's own SIGTERM handler,
    which ray.init installs, is replaced by the one this process had when it is done."""
    ray = ray_module()
    sigterm = signal.getsignal(signal.SIGTERM)
    options: dict[str, Any] = {
        "log_to_driver": False,  # the nodes' logs stay there: stdout carries our events
        "logging_level": logging.WARNING,
        "runtime_env": {"worker_process_setup_hook": setup_worker},
    }
    if address == "local":
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - Ray says why in many ways; all mean the same
        signal.signal(signal.SIGTERM, sigterm)
        raise ClusterError(
            f"cannot connect to a Ray cluster at {address!r} ({type(exc).__name__}: {exc}). "
            "Start one (`ray start --head` on the head node, `ray start --address HEAD:6379` "
            "on the others) and give its address (--address, backfill.ray_address), or use "
            "--address local for a Ray on this machine alone") from None
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        yield Cluster(ray, address, nodes, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)


# --- tasks: preparing and report writing -------------------------------------------------


def _below_the_model() -> None:
    """As pool.py's processes: below the model's threads, which wait for each other."""
    current = os.nice(0)
    if current < PREPARE_NICENESS:
        os.nice(PREPARE_NICENESS - current)


def _prepare_chunk(function: Callable[[PrepareJob], Prepared], jobs: list[PrepareJob]):
    """Two results: the outcomes without their arrays (with which of them had one) for the
    driver, and the arrays as one batch, left in this node's object store for the actors."""
    _below_the_model()
    results = [function(job) for job in jobs]
    arrays = [result.array for result in results if result.array is not None]
    outcomes = [dataclasses.replace(result, array=None) for result in results]
    has_array = [result.array is not None for result in results]
    return (outcomes, has_array), (np.concatenate(arrays) if arrays else None)


def _run_chunk(function: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    _below_the_model()
    return [function(job) for job in jobs]


def _warm_up() -> int:
    _below_the_model()
    load_libraries()
    return os.getpid()


@dataclass(frozen=True)
class RemoteArray:
    """A converted image left on the node that made it: row `index` of a task's batch."""

    batch: Any  # ray.ObjectRef
    index: int

    def fetch(self, ray) -> np.ndarray:
        return np.asarray(ray.get(self.batch))[self.index:self.index + 1]


class RaySubmit:
    """A worker.Submit that runs a round's jobs as Ray tasks, `chunk` jobs each."""

    def __init__(self, ray, chunk: int):
        self.ray = ray
        self.chunk = max(chunk, 1)
        options = {"num_cpus": 1, "max_retries": TASK_RETRIES}
        self._prepare = ray.remote(num_returns=2, **options)(_prepare_chunk)
        self._run = ray.remote(**options)(_run_chunk)
        self._warm_up = ray.remote(**options)(_warm_up)

    def warm_up(self, tasks: int) -> int:
        """Start about `tasks` task processes and load their libraries (the conversion,
        highdicom's tables) before the first round, as the local pool does before its first:
        a second or two each. Returns how many processes answered."""
        return len(set(self.ray.get([self._warm_up.remote() for _ in range(tasks)])))

    def __call__(self, function: Callable[[Any], Any],
                 jobs: list[Any]) -> Callable[[], list[Any]]:
        chunks = [jobs[start:start + self.chunk] for start in range(0, len(jobs), self.chunk)]
        if jobs and isinstance(jobs[0], PrepareJob):
            refs = [self._prepare.remote(function, chunk) for chunk in chunks]
            return lambda: self._prepared(chunks, refs)
        refs = [self._run.remote(function, chunk) for chunk in chunks]
        return lambda: self._written(chunks, refs)

    def _prepared(self, chunks: list[list[PrepareJob]], refs: list) -> list[Prepared]:
        results: list[Prepared] = []
        for chunk, (outcomes_ref, batch_ref) in zip(chunks, refs, strict=True):
            try:
                outcomes, has_array = self.ray.get(outcomes_ref)
            except self.ray.exceptions.RayError as exc:
                # Lost beyond its retries: as a crash in the local pool, the studies are
                # retried (and fail after study.max_attempts).
                results.extend(Prepared(job.instance_id, error=f"the cluster lost the task "
                                        f"({type(exc).__name__}) while reading {job.path}")
                               for job in chunk)
                continue
            index = 0
            for outcome, has in zip(outcomes, has_array, strict=True):
                if has:
                    outcome = dataclasses.replace(outcome, array=RemoteArray(batch_ref, index))
                    index += 1
                results.append(outcome)
        return results

    def _written(self, chunks: list[list[Any]], refs: list) -> list[ReportWritten]:
        results: list[ReportWritten] = []
        for chunk, ref in zip(chunks, refs, strict=True):
            try:
                results.extend(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:
                results.extend(ReportWritten(error=f"the cluster lost the report's task "
                                             f"({type(exc).__name__})") for _ in chunk)
        return results


# --- the model actors --------------------------------------------------------------------


class RecordedHashes(TrustedHashes):
    """The driver's record of installed weights, as it stood once the driver had loaded the
    model: an actor checks its files against it and never writes to it (the state directory
    is the driver's, and need not be on the actor's node)."""

    def __init__(self, state_dir: Path, entries: dict[str, dict]):
        super().__init__(state_dir)
        self._entries = entries

    def entry(self, file: Path) -> dict | None:
        return self._entries.get(self.key(file))

    def record(self, file: Path, digest: str, source: str, **details: Any) -> None:
        raise OSError(errno.EROFS, "the driver keeps the record of installed weights")


def recorded_entries(config: Config, classifier: Classifier) -> dict[str, dict]:
    """What the driver's record says of the files an actor may load for this model."""
    spec = get_spec(classifier.identity.name)
    folder = config.weights_dir
    trusted = TrustedHashes(config.state_dir)
    files = (weights_path(spec, folder), package_path(spec, folder),
             onnxrt.export_paths(spec, folder, classifier.identity.weights_sha256)[0])
    return {TrustedHashes.key(file): entry for file in files
            if (entry := trusted.entry(file)) is not None}


class ScoreActor:
    """One model in one Ray actor, loaded as the driver loaded it (Classifier.load with the
    config's backend and the ONNX cache in weights_dir), on `device`."""

    def __init__(self, config: Config, device: str, allow_untrained: bool,
                 recorded: dict[str, dict]):
        setup_worker()
        model = config.model
        self.classifier = Classifier.load(
            model.name, config.weights_dir, download_url=model.download_url, device=device,
            threads=model.threads, backend=model.backend, allow_untrained=allow_untrained,
            trusted=RecordedHashes(config.state_dir, recorded))

    def describe(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "backend": self.classifier.backend, "device": self.classifier.device,
                "identity": dataclasses.asdict(self.classifier.identity), "xrvd": __version__}

    def score(self, batch: np.ndarray, indices: list[int]) -> np.ndarray:
        return self.classifier.predict(batch[indices])


def actor_count(cluster: Cluster, settings: BackfillConfig) -> int:
    """backfill.actors, or by default one per node (with GPUs: as many as they hold)."""
    if settings.actors:
        return settings.actors
    nodes = [node.get("Resources", {}) for node in cluster.ray.nodes() if node.get("Alive")]
    if settings.gpus_per_actor > 0:
        count = sum(int(node.get("GPU", 0) // settings.gpus_per_actor) for node in nodes)
        if not count:
            raise ClusterError(f"the cluster at {cluster.address!r} has no GPUs for actors of "
                               f"{settings.gpus_per_actor:g} GPU each (--gpus-per-actor)")
        return count
    return max(1, sum(1 for node in nodes if node.get("CPU", 0) >= settings.cpus_per_actor))


def start_actors(cluster: Cluster, config: Config,
                 classifier: Classifier) -> tuple[list, list[dict]]:
    """The model actors, each with the model loaded, and what each says of itself. The
    driver's `classifier` is the reference: an actor with other weights is refused."""
    ray, settings = cluster.ray, config.backfill
    device = "cuda" if settings.gpus_per_actor > 0 else "cpu"
    if config.model.device == "cuda" and device == "cpu":
        raise ClusterError("model.device is cuda: give each model actor its GPUs with "
                           "--gpus-per-actor (backfill.gpus_per_actor)")
    count = actor_count(cluster, settings)
    remote = ray.remote(ScoreActor).options(
        num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor,
        max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
    # Untrained weights load on an actor exactly when they loaded in the driver (tests).
    actors = [remote.remote(config, device, classifier.identity.untrained,
                            recorded_entries(config, classifier)) for _ in range(count)]
    try:
        described = ray.get([actor.describe.remote() for actor in actors],
                            timeout=ACTOR_START_SECONDS)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"the cluster did not start {count} model actors ({settings.cpus_per_actor:g} CPU "
            f"and {settings.gpus_per_actor:g} GPU each) within {ACTOR_START_SECONDS:.0f} s: "
            "`ray status` shows what it has free; lower --actors") from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"a model actor could not load the model: {exc}") from None
    expected = dataclasses.asdict(classifier.identity)
    for info in described:
        if info["identity"] != expected or info["xrvd"] != __version__:
            raise ClusterError(
                f"node {info['node']} loaded {info['identity']['name']} with weights "
                f"{info['identity']['weights_sha256'][:16]}... under xrvd {info['xrvd']}, the "
                f"driver {expected['weights_sha256'][:16]}... under xrvd {__version__}: every "
                "node needs the same xrvd and the same weights_dir (a shared folder)")
    return actors, described


class RemoteScorer:
    """Stands for the Classifier in worker.Worker: the driver's own load of the model says
    what it is (identity, labels, resolution); predict_many scores on the actors."""

    def __init__(self, ray, classifier: Classifier, actors: list):
        self.ray = ray
        self.identity = classifier.identity
        self.labels = classifier.labels
        self.resolution = classifier.resolution
        self.actors = list(actors)

    def predict_many(self, arrays: list[RemoteArray], batch_size: int = 8) -> np.ndarray:
        """Each task's batch (the rows of it asked for) goes to the least busy actor, as the
        chunks were made: batch_size is the chunk's already."""
        scores = np.zeros((len(arrays), len(self.labels)), dtype=np.float32)
        groups: dict[Any, tuple[list[int], list[int]]] = {}
        for position, array in enumerate(arrays):
            positions, rows = groups.setdefault(array.batch, ([], []))
            positions.append(position)
            rows.append(array.index)
        pending = list(groups.items())
        running: dict[Any, tuple[int, Any, tuple[list[int], list[int]]]] = {}
        load = dict.fromkeys(range(len(self.actors)), 0)
        while pending or running:
            while pending and load:
                actor = min(load, key=load.__getitem__)
                if load[actor] >= IN_FLIGHT_PER_ACTOR:
                    break
                batch, (positions, rows) = pending.pop()
                running[self.actors[actor].score.remote(batch, rows)] = (
                    actor, batch, (positions, rows))
                load[actor] += 1
            if not running:
                raise ClusterError("every model actor is gone (each restarted "
                                   f"{ACTOR_RESTARTS} times): the run stops here")
            [done], _ = self.ray.wait(list(running), num_returns=1)
            actor, batch, (positions, rows) = running.pop(done)
            try:
                scores[positions] = self.ray.get(done)
            except self.ray.exceptions.RayActorError:
                load.pop(actor, None)  # gone beyond its restarts: the others take its work
                pending.append((batch, (positions, rows)))
                continue
            except self.ray.exceptions.RayError as exc:
                raise ClusterError(f"a model actor failed: {exc}") from None
            if actor in load:
                load[actor] -= 1
        return scores

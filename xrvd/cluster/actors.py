"""The model actors, and the classifier that stands for them in the driver's Worker."""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import BackfillConfig, Config
from ..log import get_logger
from ..pipeline import onnxrt
from ..pipeline.models import Classifier
from ..pipeline.package import package_path
from ..pipeline.registry import get_spec
from ..pipeline.trust import TrustedHashes
from ..pipeline.weights import weights_path
from .session import Cluster, ClusterError, setup_worker
from .tasks import RemoteArray

# An actor lost (its node, or its process: out of memory) is started again, elsewhere if need
# be, this many times; its calls wait for it meanwhile.
ACTOR_RESTARTS = 10
ACTOR_START_SECONDS = 600.0  # a cluster scaling up for the actors may take minutes
IN_FLIGHT_PER_ACTOR = 2  # one batch scored while the next one is fetched


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

    def score(self, batch: np.ndarray, indices: list[int], maps: bool = False):
        """Scores of the batch's rows `indices`; with maps, (scores, class activation maps)
        as Classifier.predict_with_maps gives them (output.heatmaps)."""
        if maps:
            return self.classifier.predict_with_maps(batch[indices])
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
    return max(1, len(_cpu_nodes(cluster, settings)))


def _cpu_nodes(cluster: Cluster, settings: BackfillConfig) -> list[str]:
    """The live nodes with a CPU to run a CPU actor on, by node ID."""
    wanted = max(settings.cpus_per_actor, 1.0)
    return sorted(node["NodeID"] for node in cluster.ray.nodes()
                  if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= wanted)


def placements(cluster: Cluster, settings: BackfillConfig, count: int) -> list:
    """Where each actor starts: CPU actors one per node in turn (Ray's SPREAD and soft node
    affinity are preferences, and actors that reserve no CPU were seen sharing a node, to be
    lost with it together); GPU actors where the GPUs are. An actor whose node is lost is
    replaced wherever Ray finds room (RemoteScorer)."""
    if settings.gpus_per_actor > 0:
        return ["SPREAD"] * count
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _cpu_nodes(cluster, settings)
    if not nodes:
        return ["SPREAD"] * count
    return [NodeAffinitySchedulingStrategy(nodes[n % len(nodes)], soft=False)
            for n in range(count)]


def start_actors(cluster: Cluster, config: Config,
                 classifier: Classifier) -> tuple[list, list[dict], Callable[[], Any]]:
    """The model actors, each with the model loaded, what each says of itself, and how to
    start one more (to replace one that is lost). The driver's `classifier` is the reference:
    an actor with other weights is refused."""
    ray, settings = cluster.ray, config.backfill
    device = "cuda" if settings.gpus_per_actor > 0 else "cpu"
    if config.model.device == "cuda" and device == "cpu":
        raise ClusterError("model.device is cuda: give each model actor its GPUs with "
                           "--gpus-per-actor (backfill.gpus_per_actor)")
    count = actor_count(cluster, settings)
    remote = ray.remote(ScoreActor)
    # Untrained weights load on an actor exactly when they loaded in the driver (tests).
    arguments = (config, device, classifier.identity.untrained,
                 recorded_entries(config, classifier))

    def start(placement: Any = "SPREAD"):
        return remote.options(
            num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor,
            max_restarts=ACTOR_RESTARTS, max_task_retries=-1, scheduling_strategy=placement,
        ).remote(*arguments)

    actors = [start(placement) for placement in placements(cluster, settings, count)]
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
    return actors, described, start


class RemoteScorer:
    """Stands for the Classifier in worker.Worker: the driver's own load of the model says
    what it is (identity, labels, resolution); predict_many scores on the actors. An actor
    lost for good (its node gone, its restarts spent) is replaced by `replace()`, up to
    ACTOR_RESTARTS times per actor in all; its batches go to the others meanwhile."""

    def __init__(self, ray, classifier: Classifier, actors: list,
                 replace: Callable[[], Any] | None = None):
        self.ray = ray
        self.identity = classifier.identity
        self.labels = classifier.labels
        self.resolution = classifier.resolution
        self.maps_unavailable = classifier.maps_unavailable
        self.slots: list[Any] = list(actors)  # None: lost, not replaced
        self.replace = replace
        self.replacements_left = ACTOR_RESTARTS * len(actors)
        self.replaced = 0
        self.log = get_logger(component="cluster")

    def predict_many(self, arrays: list[RemoteArray], batch_size: int = 8, *,
                     maps: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As Classifier.predict_many: each task's batch (the rows of it asked for) goes to
        the least busy actor, as the chunks were made (batch_size is the chunk's already);
        with maps, (scores, maps)."""
        scores = np.zeros((len(arrays), len(self.labels)), dtype=np.float32)
        found: np.ndarray | None = None  # the maps, once their grid is known
        groups: dict[Any, tuple[list[int], list[int]]] = {}
        for position, array in enumerate(arrays):
            positions, rows = groups.setdefault(array.batch, ([], []))
            positions.append(position)
            rows.append(array.index)
        pending = [(batch, positions, rows) for batch, (positions, rows) in groups.items()]
        running: dict[Any, tuple[int, Any, tuple]] = {}
        load = [0] * len(self.slots)
        errors = self.ray.exceptions
        while pending or running:
            live = [n for n, handle in enumerate(self.slots) if handle is not None]
            while pending and live:
                slot = min(live, key=load.__getitem__)
                if load[slot] >= IN_FLIGHT_PER_ACTOR:
                    break
                item = pending.pop()
                handle = self.slots[slot]
                running[handle.score.remote(item[0], item[2], maps)] = (slot, handle, item)
                load[slot] += 1
            if not running:
                raise ClusterError("every model actor is lost, and replaced "
                                   f"{self.replaced} times: the run stops here")
            [done], _ = self.ray.wait(list(running), num_returns=1)
            slot, handle, item = running.pop(done)
            current = self.slots[slot] is handle
            if current:
                load[slot] -= 1
            try:
                result = self.ray.get(done)
            except (errors.ActorDiedError, errors.ActorUnschedulableError) as exc:
                pending.append(item)
                if current:
                    self._lost(slot, exc, load)
            except errors.RayActorError:  # unavailable for now: again
                pending.append(item)
            except errors.RayError as exc:
                raise ClusterError(f"a model actor failed: {exc}") from None
            else:
                if maps:
                    result, grid = result
                    if found is None:
                        found = np.zeros((len(arrays), *grid.shape[1:]), dtype=np.float32)
                    found[item[1]] = grid
                scores[item[1]] = result
        if maps:
            return scores, (found if found is not None else
                            np.zeros((0, len(self.labels), 0, 0), dtype=np.float32))
        return scores

    def _lost(self, slot: int, exc: Exception, load: list[int]) -> None:
        replace = self.replace is not None and self.replacements_left > 0
        self.log.warning("actor.lost", actor=slot, error=type(exc).__name__,
                         replaced=replace)
        self.slots[slot] = None
        if replace:
            self.replacements_left -= 1
            self.replaced += 1
            self.slots[slot] = self.replace()
            load[slot] = 0

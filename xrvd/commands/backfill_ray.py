"""`xrvd backfill PATH... --engine ray`: backfill.py's back-fill across a Ray cluster.

The driver (this process) does what the local engine does: it crawls (streamed), journals
every file with its verdict, claims the studies, records every outcome, keeps the progress bar
and prints the same summary; it alone opens the journal. The classify phase's stages run on
the cluster (cluster.py): Ray tasks read, select and convert the files where they lie, model
actors score them, Ray tasks write the reports into output.folder. So the archive's paths,
output.folder and weights_dir must be the same on every node (a shared file system); the state
directory need only be the driver's.

The driver loads the model too, first, and never scores with it: that load checks the weights
against the state directory's record, exports the ONNX graph into the cache once (not once
per actor), and names the model and weights the journal's runs are keyed by. The actors then
load the same files, checked against the same record.

A PACS back-fill (--source) is not run here: its retrieval, pacing and delivery live on one
machine (commands/backfill_source.py), and cli.py refuses --engine ray with it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from ..cluster import Cluster, RaySubmit, RemoteScorer, connect, start_actors
from ..config import Config
from ..events import Listener, WorkEvent, ignore
from ..runtime import Runtime
from ..worker import Worker
from .backfill import Backfill, BackfillRequest, interruptible
from .progress import Progress


class RayBackfill(Backfill):
    """Backfill with its classify phase on `cluster`. `observe` sees every WorkEvent after
    the progress bar has (tests act on the cluster at a given point of a run)."""

    def __init__(self, config: Config, request: BackfillRequest, out: TextIO,
                 cluster: Cluster, observe: Listener = ignore):
        super().__init__(config, request, out)
        self.cluster = cluster
        self.observe = observe
        self.actors: list = []
        self.described: list[dict] = []
        self.scorer: RemoteScorer | None = None

    def runtime(self) -> Runtime:
        # No worker processes here, and the driver's model on the CPU whatever model.device
        # says (the driver may have no GPU): it only checks, exports and names the model.
        model = self.config.model.model_copy(update={"device": "cpu"})
        return Runtime(self.config.model_copy(update={"model": model}), "backfill",
                       processes=0)

    def engine(self, runtime: Runtime, progress: Progress) -> Worker:
        worker = super().engine(runtime, progress)
        self.actors, self.described, replace = start_actors(self.cluster, self.config,
                                                            worker.classifier)
        ray = self.cluster.ray
        worker.classifier = self.scorer = RemoteScorer(ray, worker.classifier, self.actors,
                                                       replace)
        worker.submit = submit = RaySubmit(ray, self.config.model.batch_size)
        # A task process for each CPU the actors leave, started before the classify phase.
        submit.warm_up(max(int(self.cluster.cpus - len(self.actors)
                               * self.config.backfill.cpus_per_actor), 1))
        self.log.info("backfill.cluster", address=self.cluster.address,
                      nodes=self.cluster.nodes, cpus=self.cluster.cpus, gpus=self.cluster.gpus,
                      actors=[{key: info[key] for key in ("node", "backend", "device")}
                              for info in self.described])
        return worker

    def round_size(self) -> int:
        """Studies claimed at a time: a chunk for every CPU of the cluster and two for every
        actor, so that preparing keeps the cluster busy while the actors score the round
        before (a round is claimed, prepared, scored and written one step behind another)."""
        chunks = max(int(self.cluster.cpus), 2 * len(self.actors), 1)
        return self.config.model.batch_size * chunks

    def _on_event(self, progress: Progress) -> Callable[[WorkEvent], None]:
        listen = super()._on_event(progress)

        def both(event: WorkEvent) -> None:
            listen(event)
            self.observe(event)
        return both

    def engine_rows(self) -> list[tuple[str, str]]:
        cluster = self.cluster
        kinds = Counter(f"{info['backend']} on {info['device']}" for info in self.described)
        nodes = len({info["node"] for info in self.described})
        return [
            ("engine", f"ray at {cluster.address}: {cluster.nodes} nodes, "
                       f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs"),
            ("  model actors", f"{len(self.actors)} on {nodes} nodes ("
                               + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ")"),
            *([("  model actors lost and replaced", str(self.scorer.replaced))]
              if self.scorer is not None and self.scorer.replaced else []),
        ]


def run_ray_backfill(config: Config, request: BackfillRequest, out: TextIO = sys.stdout,
                     observe: Listener = ignore) -> int:
    """Connected first (a missing extra or an unreachable cluster is said before anything is
    opened), then the run, which SIGTERM interrupts as Ctrl-C does."""
    with connect(config.backfill.ray_address) as cluster:
        return interruptible(RayBackfill(config, request, out, cluster, observe).run)

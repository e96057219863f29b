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

from .actors import RemoteScorer, ScoreActor, actor_count, start_actors
from .session import INSTALL, Cluster, ClusterError, connect, ray_module
from .tasks import RaySubmit, RemoteArray

__all__ = ["INSTALL", "Cluster", "ClusterError", "RaySubmit", "RemoteArray", "RemoteScorer",
           "ScoreActor", "actor_count", "connect", "ray_module", "start_actors"]

"""The driver's connection to a Ray cluster, and Ray imported only when asked for."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import XrvdError

INSTALL = "uv sync --extra ray"


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


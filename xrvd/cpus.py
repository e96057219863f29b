"""How many threads and processes xrvd may use: the CPUs the kernel really lets it run on."""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cpus(root: Path = Path("/")) -> int:
    """The CPUs this process may really use: its CPU affinity, lowered to the cgroup's CPU
    quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded down, at
    least 1. A quota of 1.5 CPUs gives 1 thread: threads beyond the quota are throttled, and
    one throttled thread stalls the others at every synchronisation point.

    `root` is where /proc and /sys are found (tests give a folder of fake cgroup files)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its ancestors, or None."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    mount = root / "sys/fs/cgroup"
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, cgroup = parts
        if controllers == "":  # cgroup v2 (unified)
            for folder in _ancestors(mount, cgroup):
                quotas.append(_v2_quota(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (mount / controllers, mount / "cpu", mount / "cpu,cpuacct"):
                if base.is_dir():
                    for folder in _ancestors(base, cgroup):
                        quotas.append(_v1_quota(folder))
                    break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _ancestors(mount: Path, cgroup: str) -> list[Path]:
    """The cgroup's folder and every parent up to the mount point. Inside a container the
    path in /proc/self/cgroup may not exist under the mount (its root is the container's own
    cgroup); missing folders are skipped and the mount itself always counts."""
    parts = [p for p in cgroup.strip().split("/") if p and p != ".."]
    folders = [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [f for f in folders if f.is_dir()] + [mount]


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period

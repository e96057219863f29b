"""The CPUs this process may use (cpus.py): CPU affinity, and cgroup v2 and v1 quotas, read
from a fake /proc and /sys."""

from __future__ import annotations

import os

import pytest

from xrvd.cpus import available_cpus


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

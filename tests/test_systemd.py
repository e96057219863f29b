"""The systemd unit (systemd/xrvd.service): it verifies, has the settings the service relies
on (notify, watchdog, restart, sandbox, bounds), and systemd's exposure score stays low. The
daemon's side of sd_notify is tested in tests/commands/test_serve_service.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO, require_tool


def test_systemd_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    unit = (REPO / "systemd" / "xrvd.service").read_text()
    xrvd = Path(sys.executable).with_name("xrvd")
    assert xrvd.exists()
    local = tmp_path / "xrvd.service"
    local.write_text(unit.replace("/opt/xrvd/.venv/bin/xrvd", str(xrvd)))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "xrvd.service" not in done.stderr  # no warnings about our unit
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "StateDirectory=xrvd", "ExecReload=",
                   "SystemCallFilter=@system-service", "RestrictAddressFamilies=",
                   "ReadOnlyPaths=-/var/lib/xrvd/models",
                   "MemoryHigh=", "MemoryMax=", "TasksMax=", "PrivateUsers=yes",
                   "ProtectProc=invisible", "RemoveIPC=yes"):
        assert needed in unit
    # In this order (an allow list, then taken from it, then given back). What is given back is
    # what strace showed xrvd serve calling (see the unit's comment); more needs the same evidence.
    filters = [line for line in unit.splitlines() if line.startswith("SystemCallFilter=")]
    assert filters == ["SystemCallFilter=@system-service",
                       "SystemCallFilter=~@privileged @resources",
                       "SystemCallFilter=sched_setaffinity mbind setpriority"]
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    size = {"K": 2**10, "M": 2**20, "G": 2**30}
    high, top = (int(settings[k][:-1]) * size[settings[k][-1]] for k in ("MemoryHigh", "MemoryMax"))
    assert 2**30 < high < top  # throttled before it is killed, above the measured footprint
    assert 100 <= int(settings["TasksMax"]) <= 4096


def test_systemd_unit_exposure(tmp_path):
    """systemd's own score of the unit's sandbox stays at or below 1.9, its score before
    PrivateUsers, ProtectProc, RemoveIPC and the @privileged/@resources filter (1.4 with them);
    0 is a unit with every setting, 10 one with none. Printed, to see it move."""
    analyze = require_tool("systemd-analyze", "systemd")
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True, timeout=60)
    if int(version.stdout.split()[1]) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250: {version.stdout}")
    unit = (REPO / "systemd" / "xrvd.service").read_text()
    local = tmp_path / "xrvd.service"
    local.write_text(unit.replace("/opt/xrvd/.venv/bin/xrvd",
                                  str(Path(sys.executable).with_name("xrvd"))))
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(local)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    overall = [line for line in done.stdout.splitlines()
               if "Overall exposure level for xrvd.service:" in line]
    assert len(overall) == 1, done.stdout + done.stderr
    score = float(overall[0].split("xrvd.service:")[1].split()[0])
    print(f"systemd-analyze security --offline=true systemd/xrvd.service: exposure {score}")
    assert score <= 1.9, done.stdout

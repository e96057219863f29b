"""Receive benchmark: 50 large CR instances (~10 MB each) sent by DCMTK storescu to xrvd
(durable: fsync'd spool + journal before each 0x0000) and to DCMTK storescp (+B, 128 kB PDU,
no fsync) on the same machine, in the same run.

Run by hand:  uv run python benchmarks/receive.py [--count 50]

TCP_NODELAY=1 is set for the DCMTK tools: DCMTK 3.6.7 leaves Nagle's algorithm on by default,
which cuts its rate about eightfold. xrvd runs with untrained weights and a long settle time,
so classification does not compete with receiving during the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
CR = ROOT.parent / "shared" / "data" / "cxr" / "wg04_cr_chest_mono1_15bit.dcm"
ENV = dict(os.environ, TCP_NODELAY="1")
# DCMTK's tools from the system: pynetdicom puts its own `storescu` in the virtual environment.
ENV["PATH"] = os.pathsep.join(p for p in ENV.get("PATH", "").split(os.pathsep)
                              if os.path.realpath(p) != os.path.realpath(
                                  os.path.dirname(sys.executable)))


def dcmtk(name: str) -> str | None:
    return shutil.which(name, path=ENV["PATH"])


def make_instances(folder: Path, count: int) -> list[Path]:
    """~10 MB CRs: the WG04 chest CR padded to 2500x2048 (16 bit), new UIDs each."""
    source = pydicom.dcmread(CR)
    pixels = np.zeros((2500, 2048), dtype=np.uint16)
    pixels[: source.Rows, : source.Columns] = source.pixel_array
    study = generate_uid()
    paths = []
    for i in range(count):
        ds = source.copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cr{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def send(port: int, files: list[Path], aet: str = "BENCH") -> float:
    started = time.perf_counter()
    done = subprocess.run([dcmtk("storescu"), "-R", "-aet", aet, "-aec", "XRVD",
                           "--max-pdu", "131072", "127.0.0.1", str(port), *map(str, files)],
                          env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"storescu failed: {done.stderr}")
    return elapsed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen([dcmtk("storescp"), "+B", "--max-pdu", "131072", "-od",
                            str(out), str(port)], env=ENV)
    try:
        for _ in range(100):  # wait until it listens
            if subprocess.run([dcmtk("echoscu"), "-aec", "ANY", "127.0.0.1", str(port)],
                              capture_output=True, env=ENV).returncode == 0:
                break
            time.sleep(0.05)
        return send(port, files)
    finally:
        scp.send_signal(signal.SIGTERM)
        scp.wait(timeout=30)


def start_serve(config: Path, env: dict, python: str = sys.executable
                ) -> tuple[subprocess.Popen, int]:
    """`xrvd serve` as a subprocess (of the install `python` belongs to), once it is ready;
    its events stay readable on stdout."""
    daemon = subprocess.Popen([python, "-m", "xrvd", "serve", "-c", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env)
    port = None
    for line in daemon.stdout:
        event = json.loads(line)
        if event["event"] == "scp.listening":
            port = event["port"]
        if event["event"] == "daemon.ready":
            break
    return daemon, port


def bench_xrvd(files: list[Path], work: Path) -> float:
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV, write_untrained_weights

    weights = work / "weights"
    write_untrained_weights("densenet121-res224-all", weights)
    config = work / "xrvd.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(work / "xrvd-state"),
        "model": {"weights_dir": str(weights)},
        "scp": {"port": 0, "allowed_calling_aets": ["BENCH"], "max_pdu": 131072},
        "study": {"settle_seconds": 3600},
    }))
    env = dict(ENV, **{ALLOW_UNTRAINED_ENV: "yes-these-scores-are-meaningless"})
    daemon, port = start_serve(config, env)
    try:
        elapsed = send(port, files)
    finally:
        daemon.send_signal(signal.SIGTERM)
        handler = [json.loads(line).get("duration_s") for line in daemon.stdout
                   if '"instance.stored"' in line]
        daemon.wait(timeout=60)
    print(f"  xrvd C-STORE handler (store + journal), median: "
          f"{1000 * float(np.median(handler)):.1f} ms")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=50)
    args = parser.parse_args()
    if not dcmtk("storescu"):
        raise SystemExit("needs DCMTK: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(dir=ROOT.parent if os.access(ROOT.parent, os.W_OK)
                                     else None) as tmp:
        work = Path(tmp)
        files = make_instances(work, args.count)
        size_mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        os.sync()
        xrvd_s = bench_xrvd(files, work)
        os.sync()  # storescp leaves its files unsynced; keep that writeback out of xrvd's run
        storescp_s = bench_storescp(files, work)
    print(f"{args.count} instances of {size_mb:.1f} MB, storescu -> loopback, 128 kB PDU")
    print(f"  DCMTK storescp (+B, no fsync): {args.count / storescp_s:6.1f} images/s")
    print(f"  xrvd (durable)               : {args.count / xrvd_s:6.1f} images/s")
    print(f"  xrvd rate / storescp rate    : {storescp_s / xrvd_s:6.2f}")


if __name__ == "__main__":
    main()

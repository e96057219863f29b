"""End to end, per inference backend: `xrvd serve` fed by DCMTK storescu until the last report
is written, and `xrvd backfill` over the same files.

Run by hand:  uv run python benchmarks/endtoend.py [--images 200] [--per-association 10]
              [--service-python /tmp/xrvd-service/bin/python]

The images are ~10 MB CRs (2500x2048, 16 bit; the WG04 CR resampled), one study each
(--per-study N: N images per study and report), sent --per-association files per association
(one storescu run each, one after the other, as modalities send). The serve rate is images /
(first byte sent -> the study.classified event, after its report was written, that completes
the count); its memory is the daemon process's peak resident size, whether libtorch was ever
mapped into it, and the proportional set size of the daemon and its worker processes together
at the end. With --service-python, serve and backfill run again from a service install (no
PyTorch) on the model package alone, and both installs' sizes on disk are printed.
The back-fill rate is the back-fill's own classification rate (and the whole command's).
Untrained weights of the right format: speed does not depend on the weights' values.
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
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import ALLOW, MODEL, generate, run_backfill  # noqa: E402
from receive import ENV, dcmtk, start_serve  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def torch_mapped(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def service_pss_mb(pid: int) -> float:
    """The proportional set size of the daemon and all its processes (worker processes, their
    fork server) together: memory they share is counted once, not once per process as summed
    RSS would."""
    total = 0
    for process in _process_tree(pid):
        for line in Path(f"/proc/{process}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def _process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in _process_tree(int(child)))]


def install_size_mb(python: str) -> float:
    """The size on disk of the virtual environment `python` runs in."""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], check=True,
                            capture_output=True, text=True).stdout.strip()
    total = 0
    for root, _dirs, names in os.walk(prefix):
        for name in names:
            total += os.lstat(os.path.join(root, name)).st_size
    return total / 2**20


def serve(files: list[Path], work: Path, weights: str, backend: str,
          per_association: int, worker_processes: int | str,
          python: str = sys.executable) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"),
        "model": {"name": MODEL, "weights_dir": weights, "backend": backend},
        "scp": {"port": 0, "allowed_calling_aets": ["BENCH"], "max_pdu": 131072},
        "study": {"settle_seconds": 0.5},
        "output": {"folder": str(work / "out")},
        "service": {"worker_processes": worker_processes},
    }))
    daemon, port = start_serve(config, dict(ENV, **ALLOW), python)
    written, last = 0, [0.0]
    done = threading.Event()

    def follow() -> None:
        nonlocal written
        for line in daemon.stdout:
            if '"study.classified"' in line:
                written += json.loads(line)["classified"]
                last[0] = time.perf_counter()
                if written == len(files):
                    done.set()
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    started = time.perf_counter()
    for start in range(0, len(files), per_association):
        chunk = files[start:start + per_association]
        sent = subprocess.run([dcmtk("storescu"), "-aet", "BENCH", "-aec", "XRVD",
                               "--max-pdu", "131072", "127.0.0.1", str(port),
                               *map(str, chunk)], env=ENV, capture_output=True, text=True)
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr}")
    received = time.perf_counter() - started
    done.wait(timeout=1800)
    result = {"images_per_s": written / (last[0] - started), "received_s": received,
              "total_s": last[0] - started, "written": written,
              "peak_rss_mb": peak_rss_mb(daemon.pid), "torch": torch_mapped(daemon.pid),
              "service_pss_mb": service_pss_mb(daemon.pid)}
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--per-association", type=int, default=10)
    parser.add_argument("--per-study", type=int, default=1,
                        help="images per study (each study gets one report)")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--worker-processes", default="0,auto",
                        help="service.worker_processes values to run serve with")
    parser.add_argument("--service-python", metavar="PYTHON",
                        help="also run serve and backfill with this interpreter of a service "
                        "install (no PyTorch; `UV_PROJECT_ENVIRONMENT=DIR uv sync --locked "
                        "--no-default-groups`, then DIR/bin/python), from the model package "
                        "alone (needs onnxruntime in --backends)")
    args = parser.parse_args()
    if not dcmtk("storescu"):
        raise SystemExit("DCMTK's storescu is needed (apt install dcmtk)")
    with tempfile.TemporaryDirectory(prefix="xrvd-e2e-") as scratch_name:
        scratch = Path(scratch_name)
        from xrvd.pipeline.untrained import write_untrained_weights

        weights = scratch / "weights"
        write_untrained_weights(MODEL, weights)
        folder = scratch / "images"
        generate("16bit", folder, args.images, args.per_study)
        files = sorted(folder.rglob("*.dcm"))
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        print(f"cores available: {len(os.sched_getaffinity(0))}; {len(files)} CRs 2500x2048 "
              f"16-bit, {size_mb / len(files):.1f} MB each; model {MODEL}")
        print(f"{'backend':<12} {'path':<10} {'images/s':>9} {'peak RSS MB':>12}  notes")
        for backend in args.backends.split(","):
            if backend == "onnxruntime":  # the graph is built before the timed runs, as
                # `xrvd models export` does on a server
                subprocess.run([sys.executable, "-m", "xrvd", "models", "export", MODEL, "-c",
                                str(_models_config(scratch, weights))], env=dict(ENV, **ALLOW),
                               capture_output=True, check=True)
            report(backend, files, folder, scratch, args, str(weights), backend)
        if args.service_python:
            # The package `xrvd models export` wrote above, alone, as a site carries it in.
            service_weights = scratch / "service-weights"
            service_weights.mkdir()
            shutil.copy(weights / f"{MODEL}.xrvdmodel", service_weights)
            report("service", files, folder, scratch, args, str(service_weights), "auto",
                   args.service_python)
            for name, python in (("full", sys.executable), ("service", args.service_python)):
                print(f"install size, {name}: {install_size_mb(python):.0f} MB")


def report(label: str, files: list[Path], folder: Path, scratch: Path, args, weights: str,
           backend: str, python: str = sys.executable) -> None:
    """serve with each worker process count, then backfill: a line each."""
    for processes in (value if value == "auto" else int(value)
                      for value in args.worker_processes.split(",")):
        run = serve(files, scratch / f"serve-{label}-{processes}", weights, backend,
                    args.per_association, processes, python)
        print(f"{label:<12} {f'serve/{processes}':<10} {run['images_per_s']:>9.1f} "
              f"{run['peak_rss_mb']:>12.0f}  {processes} worker processes, storescu "
              f"{args.per_association}/association, received in "
              f"{run['received_s']:.1f} s, last report at {run['total_s']:.1f} s, "
              f"torch in the daemon: {'yes' if run['torch'] else 'no'}, daemon and "
              f"worker processes together: {run['service_pss_mb']:.0f} MB (PSS)")
    fill = run_backfill(argparse.Namespace(weights=weights, batch_size=4, backend=backend,
                                           workers=None),
                        folder, scratch / f"backfill-{label}", python)
    print(f"{label:<12} {'backfill':<10} {fill['images_per_s']:>9.1f} "
          f"{fill['peak_rss_mb']:>12.0f}  whole command {fill['wall_images_per_s']:.1f}"
          f" images/s; RSS summed over its processes")


def _models_config(scratch: Path, weights: Path) -> Path:
    path = scratch / "models.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(scratch / "models-state"),
                                    "model": {"name": MODEL, "weights_dir": str(weights)}}))
    return path


if __name__ == "__main__":
    main()

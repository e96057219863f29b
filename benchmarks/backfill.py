"""Back-fill throughput against the bare model and TorchXRayVision's reference path.

Run by hand:  uv run python benchmarks/backfill.py [--images 500] [--kind both]
              [--workers N] [--batch-size 4] [--backend torch|onnxruntime|auto]
              [--engine local|ray] [--nodes 3]

For each kind of archive it generates --images files from the shared fixtures, each with new
UIDs (one study each):
  8bit:  1024x1024 8-bit DX (the NIH Secondary Capture), about 1 MB each;
  16bit: 2500x2048 16-bit CR (the WG04 CR resampled), about 10 MB each.
Then, one after the other on the same machine, each in its own process:
  bare:      the model alone on pre-converted arrays at the same batch size (the ceiling);
  reference: TorchXRayVision's per-image path, read_xray_dcm + XRayCenterCrop + XRayResizer +
             model, batch 1, on a sample of the files;
  backfill:  `xrvd backfill` on the whole folder, from a fresh journal.
It prints images/s and peak resident memory (the sum over the back-fill's process tree).
Untrained weights of the right format are used: speed does not depend on the weights' values.

With --engine ray (the ray extra), instead of bare and reference: the local engine against
the Ray engine on a one-node Ray cluster of the same cores, a table of 1 to --nodes simulated
nodes on this box, and the driver's journal rate (benchmarks/backfill_cluster.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
CXR = ROOT.parent / "shared" / "data" / "cxr"
ALLOW = {"XRVD_TESTING_ALLOW_UNTRAINED_WEIGHTS": "yes-these-scores-are-meaningless"}
MODEL = "densenet121-res224-all"


# --- the archives ------------------------------------------------------------------------

def template(kind: str) -> pydicom.Dataset:
    if kind == "8bit":
        return pydicom.dcmread(CXR / "nih_dx_sc_mono2_8bit.dcm")
    ds = pydicom.dcmread(CXR / "wg04_cr_chest_mono1_15bit.dcm")
    from PIL import Image

    pixels = ds.pixel_array.astype(np.float32)
    resized = np.asarray(Image.fromarray(pixels).resize((2048, 2500), Image.BILINEAR))
    pixels = np.clip(resized * (65535 / max(float(resized.max()), 1.0)), 0, 65535)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = 2500, 2048
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def generate(kind: str, folder: Path, count: int, per_study: int = 1) -> None:
    ds = template(kind)
    for number in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        if number % per_study == 0:
            ds.StudyInstanceUID = generate_uid()
        target = folder / f"{number // 100:03d}" / f"{number:05d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    # Written out now, so that the disk is not still busy with them while a run is timed
    # (gigabytes of them would slow every fsync the daemon makes).
    os.sync()


# --- the measurements, each in a child process (run with --child) ------------------------

def child_bare(args) -> dict:
    from xrvd.pipeline.convert import prepare_file
    from xrvd.pipeline.models import Classifier

    classifier = Classifier.load(MODEL, Path(args.weights), threads=0, allow_untrained=True,
                                 backend=args.backend)
    files = sorted(Path(args.folder).rglob("*.dcm"))
    array = prepare_file(files[0], classifier.resolution).array
    batch = np.repeat(array, args.batch_size, axis=0)
    classifier.predict(batch)  # warm up
    images, started = 0, time.perf_counter()
    while images < args.images:
        classifier.predict(batch)
        images += args.batch_size
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed, "peak_rss_mb": _own_peak_mb(),
            "backend": classifier.backend}


def child_reference(args) -> dict:
    import torch
    import torchxrayvision as xrv

    from xrvd.pipeline.models import Classifier

    classifier = Classifier.load(MODEL, Path(args.weights), allow_untrained=True,
                                 backend="torch")
    model = classifier.network
    transform = [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)]
    files = sorted(Path(args.folder).rglob("*.dcm"))[:args.sample]

    def one(path: Path) -> None:
        image = xrv.utils.read_xray_dcm(str(path))[None]
        for step in transform:
            image = step(image)
        with torch.inference_mode():
            model(torch.from_numpy(image)[None])

    one(files[0])
    started = time.perf_counter()
    for path in files:
        one(path)
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(files) / elapsed, "peak_rss_mb": _own_peak_mb()}


def _own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the back-fill, as a user runs it ---------------------------------------------------

def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        todo.extend(int(child) for child in children)
    return total / 1024


def run_backfill(args, folder: Path, scratch: Path, python: str = sys.executable,
                 extra: list[str] | tuple[str, ...] = ()) -> dict:
    config = {
        "state_dir": str(scratch / "state"),
        "model": {"name": MODEL, "weights_dir": args.weights, "batch_size": args.batch_size,
                  "backend": args.backend},
        "output": {"folder": str(scratch / "out")},
        "log": {"level": "info"},
    }
    scratch.mkdir(parents=True, exist_ok=True)
    config_path = scratch / "xrvd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [python, "-m", "xrvd", "backfill", "-c", str(config_path), "-r",
               str(folder)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    command += list(extra)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **ALLOW), text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    finished = {}
    classify_cpu = None  # the command's own CPU seconds when its classify phase began
    for line in proc.stdout:
        if classify_cpu is None and '"phase": "classify"' in line:
            classify_cpu = own_cpu_s(proc.pid)
        if '"backfill.finished"' in line:
            finished = json.loads(line)
            if classify_cpu is not None:
                classify_cpu = own_cpu_s(proc.pid) - classify_cpu
    code = proc.wait()
    sampler.join()
    wall = time.perf_counter() - started
    if code != 0 or not finished:
        raise SystemExit(f"xrvd backfill exited {code}")
    return {"images_per_s": finished["rate_per_s"], "wall_s": wall,
            "wall_images_per_s": finished["classified"] / wall,
            "classified": finished["classified"], "peak_rss_mb": peak[0],
            "classify_cpu_ms_per_image": 1000 * (classify_cpu or 0.0) / max(
                finished["classified"], 1)}


def own_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used itself, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_child(what: str, args, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", what, "--folder", str(folder),
               "--weights", args.weights, "--batch-size", str(args.batch_size),
               "--images", str(args.images), "--sample", str(args.sample),
               "--backend", args.backend]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **ALLOW))
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--kind", choices=("8bit", "16bit", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None,
                        help="xrvd backfill --workers (default: its own default)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--sample", type=int, default=40,
                        help="files timed on the reference path")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: the Ray engine against the local one (the ray extra)")
    parser.add_argument("--nodes", type=int, default=3,
                        help="with --engine ray: simulated nodes, 1 to this many")
    parser.add_argument("--child", choices=("bare", "reference"))
    parser.add_argument("--folder")
    parser.add_argument("--weights")
    args = parser.parse_args()
    if args.child:
        result = (child_bare if args.child == "bare" else child_reference)(args)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="xrvd-bench-") as scratch_name:
        scratch = Path(scratch_name)
        from xrvd.pipeline.untrained import write_untrained_weights

        args.weights = str(scratch / "weights")
        write_untrained_weights(MODEL, Path(args.weights))
        print(f"cores available: {len(os.sched_getaffinity(0))}, model {MODEL}, "
              f"batch size {args.batch_size}, backend {args.backend}, {args.images} images")
        print(f"{'archive':<28} {'path':<12} {'images/s':>9} {'peak RSS MB':>12}  notes")
        for kind in ("8bit", "16bit") if args.kind == "both" else (args.kind,):
            folder = scratch / kind
            started = time.perf_counter()
            generate(kind, folder, args.images)
            label = {"8bit": "1024x1024 8-bit DX", "16bit": "2500x2048 16-bit CR"}[kind]
            size_mb = sum(p.stat().st_size for p in folder.rglob("*.dcm")) / 2**20
            print(f"# {label}: {args.images} files, {size_mb:.0f} MB, generated in "
                  f"{time.perf_counter() - started:.0f} s")
            if args.engine == "ray":
                import backfill_cluster

                backfill_cluster.main(args, folder, scratch, run_backfill, tree_rss_mb, label,
                                      MODEL)
                for path in folder.rglob("*.dcm"):
                    path.unlink()
                continue
            bare = in_child("bare", args, folder)
            print(f"{label:<28} {'bare model':<12} {bare['images_per_s']:>9.1f} "
                  f"{bare['peak_rss_mb']:>12.0f}  {bare['backend']}, pre-converted arrays")
            reference = in_child("reference", args, folder)
            print(f"{label:<28} {'reference':<12} {reference['images_per_s']:>9.1f} "
                  f"{reference['peak_rss_mb']:>12.0f}  xrv read_xray_dcm + XRayResizer, "
                  f"{args.sample} files")
            run = run_backfill(args, folder, scratch / f"run-{kind}")
            print(f"{label:<28} {'backfill':<12} {run['images_per_s']:>9.1f} "
                  f"{run['peak_rss_mb']:>12.0f}  classify phase; whole command "
                  f"{run['wall_images_per_s']:.1f} images/s ({run['wall_s']:.0f} s wall, "
                  f"{run['classified']} classified)")
            print(f"{label:<28} {'ratios':<12} backfill/bare "
                  f"{run['images_per_s'] / bare['images_per_s']:.0%}, backfill/reference "
                  f"{run['images_per_s'] / reference['images_per_s']:.1f}x")
            for path in folder.rglob("*.dcm"):
                path.unlink()  # 5 GB for the 16-bit archive: free it before the next


if __name__ == "__main__":
    main()

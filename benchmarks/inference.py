"""Inference speed and memory: PyTorch eager against ONNX Runtime, on the same machine.

Run by hand:  uv run python benchmarks/inference.py [--seconds 8] [--threads 0]

Writes UNTRAINED random weights (the scores are meaningless; only speed and memory count here)
for DenseNet-121 (densenet121-res224-all) and ResNet-50 (resnet50-res512-all) into a temporary
folder, exports their ONNX graphs once, converts the shared fixture images to model inputs,
then measures each configuration (model x backend x batch size 1, 4, 16) in a fresh process:
images/s over about --seconds of back-to-back batches after one warm-up batch, the resident
memory once the model is loaded, and the peak (ru_maxrss). The ONNX Runtime processes load the
pre-built graph and never import torch (the "torch" column shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr"
MODELS = ("densenet121-res224-all", "resnet50-res512-all")
BATCHES = (1, 4, 16)
BACKENDS = ("torch", "onnxruntime")
ALLOW = {"XRVD_TESTING_ALLOW_UNTRAINED_WEIGHTS": "yes-these-scores-are-meaningless"}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    """One configuration, in its own process: print one JSON line."""
    import numpy as np

    from xrvd.pipeline.models import Classifier

    started = time.perf_counter()
    classifier = Classifier.load(args.model, Path(args.weights), backend=args.backend,
                                 threads=args.threads)
    load_s = time.perf_counter() - started
    assert classifier.backend == args.backend, classifier.backend
    loaded_rss = rss_mb()
    images = np.load(args.inputs)
    batch = np.concatenate([images] * (args.batch // len(images) + 1))[: args.batch]
    classifier.predict(batch)  # warm-up: allocations, lazy initialisation
    count, started = 0, time.perf_counter()
    while True:
        classifier.predict(batch)
        count += args.batch
        elapsed = time.perf_counter() - started
        if elapsed >= args.seconds and count >= 2 * args.batch:
            break
    print(json.dumps({
        "images_per_s": count / elapsed,
        "loaded_rss_mb": loaded_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_s,
        "torch_imported": "torch" in sys.modules,
    }))


def prepare(folder: Path) -> dict[str, Path]:
    """Weights, exported graphs and converted inputs; model -> inputs file."""
    import numpy as np

    from xrvd.log import configure
    from xrvd.pipeline.convert import prepare_file
    from xrvd.pipeline.models import Classifier
    from xrvd.pipeline.registry import get_spec
    from xrvd.pipeline.untrained import write_untrained_weights

    configure("warning", "console", stream="stderr")
    inputs = {}
    for name in MODELS:
        write_untrained_weights(name, folder)
        Classifier.load(name, folder, backend="onnxruntime")  # exports and checks the graph
        resolution = get_spec(name).resolution
        arrays = [prepare_file(p, resolution).array for p in sorted(CXR.iterdir())
                  if p.suffix in (".dcm", ".png") and "tiny" not in p.name]
        inputs[name] = folder / f"inputs-{resolution}.npy"
        np.save(inputs[name], np.concatenate(arrays))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="measuring time per configuration (default 8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (default 0: the CPUs available)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BACKEND", "BATCH"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--prepare", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(ALLOW)
    if args.child:
        args.model, args.backend, batch = args.child
        args.batch = int(batch)
        return child(args)
    if args.prepare:
        print(json.dumps({k: str(v) for k, v in prepare(Path(args.prepare)).items()}))
        return None

    # This process stays small (no torch, no numpy): a child's ru_maxrss starts at its
    # parent's resident size, so everything heavy runs in children.
    from importlib.metadata import version

    from xrvd.cpus import available_cpus

    begun = time.perf_counter()
    print(f"CPUs available: {available_cpus()} (threads: {args.threads or 'auto'}); "
          f"torch {version('torch')}, onnxruntime {version('onnxruntime')}; "
          f"{args.seconds:g} s per configuration; UNTRAINED random weights")
    with tempfile.TemporaryDirectory(prefix="xrvd-bench-") as tmp:
        folder = Path(tmp)
        done = subprocess.run([sys.executable, __file__, "--prepare", str(folder)],
                              capture_output=True, text=True, cwd=REPO, check=True)
        inputs = json.loads(done.stdout.splitlines()[-1])
        print(f"{'model':<24} {'backend':<12} {'batch':>5} {'images/s':>9} {'vs torch':>8} "
              f"{'load s':>7} {'RSS loaded':>10} {'peak RSS':>9} {'torch':>6}")
        for name in MODELS:
            for batch in BATCHES:
                eager = None
                for backend in BACKENDS:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", name, backend, str(batch),
                         "--weights", str(folder), "--inputs", str(inputs[name]),
                         "--seconds", str(args.seconds), "--threads", str(args.threads)],
                        capture_output=True, text=True, cwd=REPO)
                    if done.returncode != 0:
                        print(f"{name} {backend} {batch}: failed\n{done.stderr[-2000:]}")
                        continue
                    row = json.loads(done.stdout.splitlines()[-1])
                    speed = row["images_per_s"]
                    eager = speed if backend == "torch" else eager
                    ratio = f"{speed / eager:.2f}x" if eager else "-"
                    torch_imported = "yes" if row["torch_imported"] else "no"
                    print(f"{name:<24} {backend:<12} {batch:>5} {speed:>9.1f} {ratio:>8} "
                          f"{row['load_s']:>7.2f} {row['loaded_rss_mb']:>7.0f} MB "
                          f"{row['peak_rss_mb']:>6.0f} MB {torch_imported:>6}", flush=True)
    print(f"total {time.perf_counter() - begun:.0f} s")


if __name__ == "__main__":
    main()

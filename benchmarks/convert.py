"""Conversion fidelity and speed: xrvd's conversion against TorchXRayVision's reference path.

Run by hand:  uv run python benchmarks/convert.py [--repeat N]

For every classifiable shared fixture it prints the largest absolute difference between
xrvd's array and TorchXRayVision's (`read_xray_dcm` / `normalize`, `XRayCenterCrop`, then the
models' own `fix_resolution` resize), at 224 and 512 px. Then the per-image time to turn the
1955x1841 15-bit CR into a 224 px model input: xrvd, and the reference path with
`XRayResizer` (scikit-image, what TorchXRayVision's examples use).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchxrayvision as xrv

from xrvd.pipeline.convert import prepare_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import reference as reference_array  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
CR = DATA / "wg04_cr_chest_mono1_15bit.dcm"


def reference_with_skimage_resizer(path: Path) -> np.ndarray:
    image = xrv.utils.read_xray_dcm(str(path))[None]
    image = xrv.datasets.XRayCenterCrop()(image)
    return xrv.datasets.XRayResizer(224)(image)


def timed(function, repeat: int) -> list[float]:
    function()  # warm up caches and lazy imports
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch threads: {torch.get_num_threads()}")
    print("\nFidelity: max |xrvd - TorchXRayVision| per fixture")
    print(f"{'fixture':<36} {'224 px':>10} {'512 px':>10}")
    fixtures = sorted(p for p in DATA.iterdir() if p.suffix in (".dcm", ".png"))
    for path in fixtures:
        cells = []
        for resolution in (224, 512):
            try:
                ours = prepare_file(path, resolution).array
            except Exception as exc:  # the tiny fixture has no pixel data
                cells.append(type(exc).__name__)
                continue
            cells.append(f"{np.abs(ours - reference_array(path, resolution)).max():.2e}")
        print(f"{path.name:<36} {cells[0]:>10} {cells[1]:>10}")

    print(f"\nPer-image conversion time, {CR.name} (1955x1841, 15 bit) -> 224 px, "
          f"median of {args.repeat}")
    rows = [
        ("xrvd prepare_file", timed(lambda: prepare_file(CR, 224), args.repeat)),
        ("reference + fix_resolution (torch)",
         timed(lambda: reference_array(CR, 224), args.repeat)),
        ("reference + XRayResizer (skimage)",
         timed(lambda: reference_with_skimage_resizer(CR), args.repeat)),
    ]
    for name, times in rows:
        print(f"  {name:<36} {statistics.median(times) * 1000:8.1f} ms")
    import pydicom

    from xrvd.pipeline.convert import dataset_to_normalized, fit_square, resize

    ds = pydicom.dcmread(CR)
    read = timed(lambda: pydicom.dcmread(CR).pixel_array, args.repeat)
    normalized = dataset_to_normalized(ds)
    scale = timed(lambda: dataset_to_normalized(ds), args.repeat)
    crop_resize = timed(lambda: resize(fit_square(normalized), 224), args.repeat)
    print("  of which (xrvd):")
    print(f"    read + decode            {statistics.median(read) * 1000:8.1f} ms")
    print(f"    normalise (from decoded) {statistics.median(scale) * 1000:8.1f} ms")
    print(f"    crop + resize            {statistics.median(crop_resize) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()

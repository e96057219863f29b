"""Speed and fidelity of xrvd's numpy antialiased resize (xrvd/pipeline/resize.py) against
torch's CPU kernel on one thread, which it reproduces bit for bit.

Run by hand:  uv run python benchmarks/resize.py [--repeat N] [--parts]

For each case it prints the median ms per image for torch (`interpolate(..., mode="bilinear",
antialias=True)`, torch.set_num_threads(1)) and for numpy, their ratio, and the largest
absolute difference between the two (it must be 0). With --parts, numpy's horizontal
(`across`) and vertical (`down`) passes are timed apart too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from xrvd.pipeline.resize import resizer

CASES = [  # (in_rows, in_cols, out_rows, out_cols)
    (2048, 2048, 224, 224),
    (3000, 2500, 512, 512),
    (2500, 2500, 512, 512),  # 3000x2500 after the center crop
    (1024, 1024, 224, 224),
    # Exact scales and upscaling: short binary weights, 3 fused taps per output (the slow
    # part in numpy), and float64 sums often exactly halfway between two float32.
    (2048, 2048, 512, 512),
    (1024, 1024, 512, 512),
    (224, 224, 512, 512),
]


def timed(function, repeat: int) -> tuple[float, float]:
    """Median and best ms per call (this kind of machine is noisy: both are worth seeing)."""
    # Warm up: caches, the weights, lazy imports, and malloc's thresholds (large buffers come
    # from fresh pages, page faults and all, until glibc adapts; torch needs several calls).
    for _ in range(max(5, repeat // 4)):
        function()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--parts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, 1 thread; numpy {np.__version__}; "
          f"ms per image, median (best) of {args.repeat}")
    print(f"{'case':<24} {'torch':>15} {'numpy':>15} {'ratio':>11} {'max |diff|':>10}")
    for case in CASES:
        image = rng.uniform(-1024, 1024, case[:2]).astype(np.float32)
        run_case(case, image, args.repeat, args.parts)


def run_case(case: tuple[int, int, int, int], image: np.ndarray, repeat: int,
             parts: bool) -> None:
    in_rows, in_cols, out_rows, out_cols = case
    tensor = torch.from_numpy(image)[None, None]
    resize = resizer(*case)

    def with_torch():
        return torch.nn.functional.interpolate(
            tensor, size=(out_rows, out_cols), mode="bilinear", antialias=True)[0, 0]

    torch_ms = timed(with_torch, repeat)
    numpy_ms = timed(lambda: resize(image), repeat)
    diff = float(np.abs(resize(image) - with_torch().numpy()).max())
    name = f"{in_rows}x{in_cols}->{out_rows}x{out_cols}"
    print(f"{name:<24} {_ms(torch_ms):>15} {_ms(numpy_ms):>15} "
          f"{numpy_ms[0] / torch_ms[0]:5.2f} ({numpy_ms[1] / torch_ms[1]:.2f}) {diff:10.3g}")
    if parts:
        across = resize.across(image)
        print(f"{'  numpy across, down':<24} {'':>15} "
              f"{_ms(timed(lambda: resize.across(image), repeat)):>15} "
              f"{_ms(timed(lambda: resize.down(across), repeat)):>15}")


def _ms(times: tuple[float, float]) -> str:
    return f"{times[0]:.2f} ({times[1]:.2f})"


if __name__ == "__main__":
    main()

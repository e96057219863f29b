"""The numpy antialiased resize (pipeline/resize.py) against torch's CPU kernel, bit for bit:
random shapes down and up, square and not, the shared radiographs at 224 and 512 px, the
horizontal pass alone on bands of rows, axes that keep their size, torch's single-column
quirk, signed zeros, and the float64 emulation of the kernel's fused multiply-adds against
exact arithmetic. Tests that need torch skip without it (a torch-less install runs the rest)."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from xrvd.pipeline import resize as resize_module
from xrvd.pipeline.convert import center_crop, dataset_to_normalized, normalize
from xrvd.pipeline.read import read_bitmap, read_dicom
from xrvd.pipeline.resize import Resizer, resizer

from ..harness import NIH_SC, PNGS, RSNA_JPEG, WG04_CR

# The shared radiographs with pixel data (tiny_cr_chest_mono1_32px.dcm has none; upscaling
# from a few pixels is among the random shapes).
RADIOGRAPHS = [WG04_CR, NIH_SC, RSNA_JPEG, *PNGS]


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        pytest.skip(f"the resize reproduces torch's AVX2/AVX512 kernels, not {capability}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker processes already use every CPU
    yield torch
    torch.set_num_threads(threads)


def torch_resize(torch, image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(rows, cols), mode="bilinear",
                                           antialias=True, align_corners=False)[0, 0].numpy()


def assert_bit_exact(ours: np.ndarray, expected: np.ndarray, what: object) -> None:
    assert ours.dtype == np.float32, what
    assert ours.shape == expected.shape, what
    if not np.array_equal(ours, expected):
        differ = ours != expected
        pytest.fail(f"{what}: {int(differ.sum())} values differ, max |diff| "
                    f"{float(np.abs(ours - expected).max()):.3g}, first at "
                    f"{tuple(int(i) for i in np.argwhere(differ)[0])}")
    assert np.array_equal(np.signbit(ours), np.signbit(expected)), f"{what}: signed zeros"


def random_image(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.uniform(-1024, 1024, (rows, cols)).astype(np.float32)


def _random_shapes() -> list[tuple[int, int, int, int]]:
    """40 (in_rows, in_cols, out_rows, out_cols), sides 96..4096 (log-uniform): squares down
    and up, then each axis down or up on its own. Large images are kept few (at most 4.2M
    values in or out) so that the module runs in seconds."""
    rng = np.random.default_rng(20240607)

    def side() -> int:
        return int(np.exp(rng.uniform(np.log(96), np.log(4096))))

    shapes: list[tuple[int, int, int, int]] = []
    while len(shapes) < 40:
        kind = len(shapes) % 4
        if kind < 2:  # squares: down, then up
            small, large = sorted((side(), side()))
            shape = (large, large, small, small) if kind == 0 else (small, small, large, large)
        else:
            shape = (side(), side(), side(), side())
        if shape[0] == shape[2] or shape[1] == shape[3] or \
                shape[0] * shape[1] > 4_200_000 or shape[2] * shape[3] > 4_200_000:
            continue
        shapes.append(shape)
    return shapes


@pytest.mark.parametrize("shape", _random_shapes(), ids=lambda s: "{}x{}-{}x{}".format(*s))
def test_random_shapes_match_torch_bit_for_bit(torch, shape):
    in_rows, in_cols, out_rows, out_cols = shape
    image = random_image(np.random.default_rng(list(shape)), in_rows, in_cols)
    ours = resizer(*shape)(image)
    assert_bit_exact(ours, torch_resize(torch, image, out_rows, out_cols), shape)


@pytest.mark.parametrize("shape", [(2048, 2048, 224, 224), (2500, 2500, 512, 512),
                                   (1024, 1024, 512, 512), (224, 224, 512, 512),
                                   (32, 32, 224, 224), (5, 3, 1, 1), (1, 1, 7, 9)],
                         ids=lambda s: "{}x{}-{}x{}".format(*s))
def test_sizes_that_matter_match_torch_bit_for_bit(torch, shape):
    """The model resolutions from common detector sizes (exact scales included, whose
    weights are short binary fractions), upscaling, and degenerate sizes."""
    image = random_image(np.random.default_rng(list(shape)), *shape[:2])
    assert_bit_exact(resizer(*shape)(image), torch_resize(torch, image, *shape[2:]), shape)


def _normalized_square(path) -> np.ndarray:
    if path.suffix == ".png":
        pixels = read_bitmap(path)
        image = normalize(pixels, 255 if pixels.dtype == np.uint8 else 65535)
    else:
        image = dataset_to_normalized(read_dicom(path), path=path)
    return np.ascontiguousarray(center_crop(image))


@pytest.mark.parametrize("resolution", [224, 512])
@pytest.mark.parametrize("path", RADIOGRAPHS, ids=lambda p: p.name)
def test_radiographs_match_torch_bit_for_bit(torch, path, resolution):
    square = _normalized_square(path)
    size = square.shape[0]
    ours = resizer(size, size, resolution, resolution)(square)
    assert_bit_exact(ours, torch_resize(torch, square, resolution, resolution),
                     (path.name, resolution))


@pytest.mark.parametrize("in_cols, out_cols", [(2048, 224), (1841, 512), (300, 37), (37, 300),
                                               (97, 96)])
def test_across_on_bands_of_rows_is_torch_on_the_band_alone(torch, in_cols, out_cols):
    """The horizontal pass on any band of rows: what torch gives for that band resized to
    (its rows, out_cols), where it resizes across only."""
    rng = np.random.default_rng(in_cols * 10_000 + out_cols)
    image = random_image(rng, 200, in_cols)
    resize = resizer(200, in_cols, 224, out_cols)
    for start, rows in [(0, 1), (7, 2), (50, 3), (0, 5), (11, 31), (100, 33), (0, 64),
                        (120, 65), (0, 200)]:
        band = image[start:start + rows]
        assert_bit_exact(resize.across(band), torch_resize(torch, band, rows, out_cols),
                         (start, rows))


def test_whole_image_is_down_after_across(torch):
    image = random_image(np.random.default_rng(3), 700, 650)
    resize = resizer(700, 650, 224, 200)
    across = resize.across(image)
    assert_bit_exact(across, torch_resize(torch, image, 700, 200), "across")
    assert_bit_exact(resize.down(across), torch_resize(torch, across, 224, 200), "down")
    assert_bit_exact(resize(image), resize.down(across), "whole")


@pytest.mark.parametrize("shape", [(300, 500, 300, 224), (500, 300, 224, 300),
                                   (300, 500, 300, 700), (224, 300, 512, 300),
                                   (64, 48, 64, 48)], ids=lambda s: "{}x{}-{}x{}".format(*s))
def test_an_axis_that_keeps_its_size_is_left_as_it_is(torch, shape):
    """torch skips the pass of an axis whose size does not change (no weights of one)."""
    image = random_image(np.random.default_rng(list(shape)), *shape[:2])
    ours = resizer(*shape)(image)
    assert_bit_exact(ours, torch_resize(torch, image, *shape[2:]), shape)
    if shape[:2] == shape[2:]:
        assert_bit_exact(ours, image, "identity")


@pytest.mark.parametrize("shape", [(50, 1, 7, 1), (7, 9, 100, 1), (40, 30, 13, 1),
                                   (1, 50, 1, 7), (9, 7, 1, 100), (1, 9, 1, 1),
                                   (1, 4096, 4096, 1), (3000, 2000, 1, 1), (1, 300, 1, 37),
                                   (300, 1, 37, 1)],
                         ids=lambda s: "{}x{}-{}x{}".format(*s))
def test_a_single_row_or_column_matches_torch(torch, shape):
    """With one output column torch's vertical pass repeats its first row (the loop reads
    the first output's taps only); the numpy resize does the same. And a lone value to sum
    (one row and one output, or an edge output alone in its group) is still summed in order
    (numpy would sum a lone contiguous run pairwise)."""
    image = random_image(np.random.default_rng(list(shape)), *shape[:2])
    assert_bit_exact(resizer(*shape)(image), torch_resize(torch, image, *shape[2:]), shape)


def test_signed_zeros_are_torch_s(torch):
    image = np.full((64, 80), -0.0, np.float32)
    image[10:20, 30:40] = 0.0
    image[40:50] = random_image(np.random.default_rng(5), 10, 80)
    for shape in [(64, 80, 17, 23), (64, 80, 200, 150)]:
        assert_bit_exact(resizer(*shape)(image), torch_resize(torch, image, *shape[2:]), shape)


def _float32(value: Fraction) -> np.float32:
    """value correctly rounded to float32 (to nearest, ties to even)."""
    guess = np.float32(float(value))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)),
                  np.nextafter(guess, np.float32(-np.inf))]

    def key(candidate):
        return (abs(Fraction(float(candidate)) - value),
                int(np.array(candidate).view(np.uint32)) & 1)

    return min(candidates, key=key)


def _fma(values, weights, before) -> np.ndarray:
    out = np.array(before, np.float32).reshape(1, -1, 1)
    scratch = resize_module._Scratch(out.size)
    scratch.multiply_add(out, slice(None), np.array(values, np.float32).reshape(1, -1, 1),
                         np.array(weights, np.float32).astype(np.float64).reshape(1, -1, 1))
    return out.reshape(-1)


def test_fused_multiply_add_rounds_once_even_halfway():
    """The kernel's fused taps round a + x * w once. In float64 the sum can land exactly
    halfway between two float32 and round the wrong way; those sums are put right."""
    one = np.float32(1)
    ulp = np.float32(2.0**-23)
    cases = [
        # a + x * w = 1 + 2**-24 + 2**-60: just above halfway, rounds up (float64 says tie).
        (2.0**-24 * (1 + 2.0**-12), 1 - 2.0**-12 + 2.0**-24, one),
        # a + x * w = 1 + 3 * 2**-24 - 2**-60: just below halfway, rounds down (float64 says
        # tie, and even would be up).
        (2.0**-24 * (1 + 2.0**-18), 1 - 2.0**-18, one + ulp),
        # Exactly halfway: ties to even, both ways.
        (2.0**-24, 1.0, one),
        (2.0**-24, 1.0, one + ulp),
    ]
    cases += [(-x, w, -a) for x, w, a in cases]
    values, weights, before = (np.array(column, np.float32) for column in zip(*cases))
    # The crafted values are float32 exactly.
    assert [float(v) for v in values] == [x for x, _, _ in cases]
    expected = [_float32(Fraction(float(a)) + Fraction(float(x)) * Fraction(float(w)))
                for x, w, a in zip(values, weights, before)]
    assert _fma(values, weights, before).tolist() == [float(e) for e in expected]
    assert float(expected[0]) == 1 + 2.0**-23 and float(expected[1]) == 1 + 2.0**-23


def test_fused_multiply_add_matches_exact_arithmetic():
    rng = np.random.default_rng(11)
    values = random_image(rng, 1, 3000).reshape(-1)
    weights = rng.random(3000).astype(np.float32) * np.float32(0.2)
    before = random_image(rng, 1, 3000).reshape(-1)
    # Simple weights (exact sums, often halfway) and tiny sums against large products.
    weights[:1000] = np.float32(3 / 32)
    before[2000:2500] *= np.float32(2.0**-40)
    expected = [float(_float32(Fraction(float(a)) + Fraction(float(x)) * Fraction(float(w))))
                for x, w, a in zip(values, weights, before)]
    assert _fma(values, weights, before).tolist() == expected


def test_resizer_is_cached_and_checks_shapes():
    assert resizer(300, 200, 100, 50) is resizer(300, 200, 100, 50)
    resize = resizer(300, 200, 100, 50)
    with pytest.raises(ValueError):
        resize(np.zeros((200, 300), np.float32))
    with pytest.raises(ValueError):
        resize.across(np.zeros((5, 199), np.float32))
    with pytest.raises(ValueError):
        resize.down(np.zeros((299, 50), np.float32))
    with pytest.raises(ValueError):
        Resizer(0, 10, 10, 10)
    assert resize.across(np.zeros((0, 200), np.float32)).shape == (0, 50)


def test_module_does_not_import_torch():
    code = ("import sys; import xrvd.pipeline.resize as r; import numpy as np; "
            "r.resizer(64, 48, 17, 23)(np.ones((64, 48), np.float32)); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

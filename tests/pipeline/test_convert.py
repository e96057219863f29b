"""Conversion fidelity against TorchXRayVision's own path (arrays and scores), MONOCHROME1,
bits above Bits Stored, normalisation and the banded resize bit for bit, padding, the LUT
options. Reading and decoding, and the inputs refused there, are in test_read.py."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from xrvd.pipeline.convert import (
    ConvertOptions,
    normalize,
    normalize_resized,
    prepare_dataset,
    prepare_file,
    resize,
)
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.read import pixel_rows, read_dicom

from ..harness import NIH_SC, PNGS, RSNA_JPEG, TINY_CR, WG04_CR
from ..reference import reference

CLASSIFIABLE = [WG04_CR, NIH_SC, RSNA_JPEG, *PNGS]


@pytest.fixture(scope="module")
def tiny_with_pixels(tmp_path_factory) -> Path:
    """The tiny CR fixture has a full header but no Pixel Data: give it 12-bit pixels."""
    ds = pydicom.dcmread(TINY_CR)
    rng = np.random.default_rng(7)
    ds.PixelData = rng.integers(0, 4096, (32, 32), dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    path = tmp_path_factory.mktemp("tiny") / "tiny_with_pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("resolution", [224, 512])
@pytest.mark.parametrize("path", CLASSIFIABLE, ids=lambda p: p.name)
def test_same_array_as_torchxrayvision(path, resolution):
    ours = prepare_file(path, resolution).array
    expected = reference(path, resolution)
    assert ours.shape == expected.shape == (1, 1, resolution, resolution)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-3
    # The antialiased resize may overshoot by a rounding error, in both implementations.
    assert -1024.01 <= ours.min() and ours.max() <= 1024.01


def test_same_array_for_12_bit_monochrome1_upscaled(tiny_with_pixels):
    ours = prepare_file(tiny_with_pixels, 224).array
    assert np.abs(ours - reference(tiny_with_pixels, 224)).max() < 1e-3


@pytest.mark.parametrize("model", ["densenet121-res224-all", "resnet50-res512-all",
                                   "jfhealthcare-densenet121-res512"])
def test_same_scores_as_torchxrayvision(model, exported_weights):
    classifier = Classifier.load(model, exported_weights(model)[0], allow_untrained=True)
    ours = classifier.predict(np.concatenate(
        [prepare_file(p, classifier.resolution).array for p in CLASSIFIABLE]))
    # The reference hands the model whatever it has; the model's own forward resizes it.
    indices = [label.index for label in classifier.spec.labels]
    with torch.inference_mode():
        expected = np.concatenate([
            classifier.network(torch.from_numpy(reference(p, classifier.resolution)))
            .numpy()[:, indices] for p in CLASSIFIABLE])
    assert np.abs(ours - expected).max() < 1e-5
    assert ours.std() > 1e-4  # the images are told apart, so the comparison means something


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(WG04_CR)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    inverted = prepare_dataset(ds, 224).array
    ds.PhotometricInterpretation = "MONOCHROME2"
    plain = prepare_dataset(ds, 224).array
    assert np.allclose(inverted, -plain, atol=0.05)


def test_bits_above_bits_stored_are_masked():
    ds = pydicom.dcmread(WG04_CR)
    clean = prepare_dataset(ds, 224).array
    pixels = ds.pixel_array | np.uint16(1 << 15)  # an overlay in the unused high bit
    ds.PixelData = pixels.tobytes()
    assert np.array_equal(prepare_dataset(ds, 224).array, clean)


def test_bits_above_bits_stored_are_masked_when_read_a_band_at_a_time(tmp_path):
    ds = pydicom.dcmread(WG04_CR)
    ds.PixelData = (ds.pixel_array | np.uint16(1 << 15)).tobytes()
    path = tmp_path / "overlay.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pixel_rows(read_dicom(path, defer_pixel_data=True), path) is not None
    assert np.array_equal(prepare_file(path, 224).array, prepare_file(WG04_CR, 224).array)


def _torchxrayvision_normalize(pixels: np.ndarray, maxval: int, invert: bool) -> np.ndarray:
    import torchxrayvision as xrv

    if pixels.dtype.kind == "u":
        pixels = pixels & maxval
    return xrv.utils.normalize(maxval - pixels if invert else pixels, maxval)


@pytest.mark.parametrize("invert", [False, True], ids=["plain", "inverted"])
@pytest.mark.parametrize("dtype,maxval", [
    (np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535), (np.int64, 4095),
    (np.float64, 4095), (np.uint32, 2**32 - 1), (np.uint32, 2**20 - 1)])
def test_normalize_is_torchxrayvision_bit_for_bit(dtype, maxval, invert):
    rng = np.random.default_rng(3)
    # More rows than one band, a width that does not divide it, and every value's end points.
    shape = (_BAND_ROWS_PLUS_SOME, 517)
    if np.dtype(dtype).kind == "f":
        pixels = rng.uniform(0, maxval, shape)
    else:
        top = np.iinfo(dtype).max  # unsigned values above maxval are masked, as for DICOM
        pixels = rng.integers(0, (top if np.dtype(dtype).kind == "u" else maxval) + 1, shape,
                              dtype=dtype, endpoint=False)
    pixels.flat[:2] = [0, maxval]
    expected = _torchxrayvision_normalize(pixels, maxval, invert)
    assert np.array_equal(normalize(pixels, maxval, invert=invert), expected)
    assert np.array_equal(normalize(pixels[0], maxval, invert=invert), expected[0])


_BAND_ROWS_PLUS_SOME = 300


@pytest.mark.parametrize("resolution", [224, 512])
@pytest.mark.parametrize("size", [96, 224, 1000, 2048], ids=lambda n: f"{n}px")
def test_banded_resize_is_the_whole_image_resize_bit_for_bit(size, resolution):
    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16)
    for invert in (False, True):
        whole = resize(normalize(pixels, 4095, invert=invert), resolution)
        banded = normalize_resized(pixels, 4095, invert, resolution)
        assert banded.shape == (1, 1, resolution, resolution)
        assert np.array_equal(banded, whole)


def test_pad_keeps_the_whole_field_of_view():
    padded = prepare_file(WG04_CR, 224, ConvertOptions(fit="pad")).array[0, 0]
    cropped = prepare_file(WG04_CR, 224).array[0, 0]
    assert padded.shape == cropped.shape == (224, 224)
    # 1955 rows x 1841 columns: padding adds black columns at the left and right edges.
    assert np.allclose(padded[:, 0], -1024, atol=0.01)
    assert np.allclose(padded[:, -1], -1024, atol=0.01)
    assert not np.array_equal(padded, cropped)


def test_voi_and_modality_lut_are_explicit_options():
    plain = prepare_file(WG04_CR, 224).array
    windowed = prepare_file(WG04_CR, 224, ConvertOptions(voi_lut=True)).array
    assert not np.allclose(plain, windowed)
    assert -1024.01 <= windowed.min() and windowed.max() <= 1024.01
    # This CR's rescale is the identity, so the modality LUT changes nothing.
    rescaled = prepare_file(WG04_CR, 224, ConvertOptions(modality_lut=True)).array
    assert np.allclose(plain, rescaled, atol=1e-3)


def test_copy_keeps_file_untouched(tmp_path):
    """Conversion reads in place and never writes to the input."""
    path = tmp_path / WG04_CR.name
    shutil.copy(WG04_CR, path)
    before = path.read_bytes()
    prepare_file(path, 224)
    assert path.read_bytes() == before

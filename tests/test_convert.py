"""Conversion fidelity against TorchXRayVision's own path, transfer syntaxes, and every way an
input can be unusable."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from xrvd import errors
from xrvd.pipeline.convert import (
    ConvertOptions,
    center_crop,
    normalize,
    normalize_resized,
    prepare_dataset,
    prepare_file,
    resize,
)
from xrvd.pipeline.models import Classifier
from xrvd.pipeline.read import pixel_rows, read_dicom

from .conftest import NIH_SC, PNGS, REJECT, RSNA_JPEG, TINY_CR, WG04_CR
from .reference import reference

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


def test_tiny_fixture_without_pixel_data_is_refused_with_a_reason():
    with pytest.raises(errors.NoPixelDataError, match="no Pixel Data element"):
        prepare_file(TINY_CR, 224)


@pytest.mark.parametrize("model", ["densenet121-res224-all", "resnet50-res512-all",
                                   "jfhealthcare-densenet121-res512"])
def test_same_scores_as_torchxrayvision(model, untrained_weights):
    classifier = Classifier.load(model, untrained_weights(model), allow_untrained=True)
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


@pytest.mark.parametrize("path", [WG04_CR, NIH_SC], ids=lambda p: p.name)
def test_pixel_rows_are_what_pydicom_decodes(path):
    ds = read_dicom(path, defer_pixel_data=True)
    rows = pixel_rows(ds, path)
    expected = read_dicom(path).pixel_array
    assert rows is not None and rows.shape == expected.shape
    assert np.array_equal(rows[0:rows.shape[0]], expected)
    crop = center_crop(rows)
    assert np.array_equal(crop[3:40], center_crop(expected)[3:40])
    assert np.array_equal(prepare_dataset(ds, 224, path=path).array,
                          prepare_dataset(read_dicom(path), 224).array)


def test_pixel_data_cut_short_is_truncated_when_deferred(tmp_path):
    path = tmp_path / "short.dcm"
    path.write_bytes(WG04_CR.read_bytes()[:-1000])
    with pytest.raises(errors.TruncatedFileError, match="truncated"):
        read_dicom(path, defer_pixel_data=True)


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


def _recode(source: Path, syntax, tmp_path: Path, **kwargs) -> Path:
    ds = pydicom.dcmread(source)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, **kwargs)
    path = tmp_path / f"{source.stem}-{syntax.name.replace(' ', '_')[:20]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    return path


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless,
                                    DeflatedExplicitVRLittleEndian], ids=lambda s: s.name)
@pytest.mark.parametrize("source", [NIH_SC, WG04_CR], ids=lambda p: p.name)
def test_lossless_transfer_syntaxes_decode_to_the_same_array(source, syntax, tmp_path):
    recoded = _recode(source, syntax, tmp_path)
    assert np.array_equal(prepare_file(recoded, 224).array, prepare_file(source, 224).array)


def test_jpeg_baseline_decodes_through_the_plugin():
    ds = pydicom.dcmread(RSNA_JPEG)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert prepare_file(RSNA_JPEG, 224).array.std() > 100


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


# --- inputs that must be refused, each with its own typed error --------------------------


@pytest.mark.parametrize("name, error", [
    ("SC_rgb.dcm", errors.NotGreyscaleError),
    ("US_ybr_j2k.dcm", errors.NotGreyscaleError),
    ("highdicom_sr_document.dcm", errors.NoPixelDataError),
])
def test_reject_fixtures(name, error):
    with pytest.raises(error) as info:
        prepare_file(REJECT / name, 224)
    assert info.value.reason == error.reason
    assert str(REJECT / name) in str(info.value)


def test_structured_report_says_what_it_is():
    with pytest.raises(errors.NoPixelDataError, match="Structured Report"):
        read_dicom(REJECT / "highdicom_sr_document.dcm")


def test_multi_frame(tmp_path):
    ds = pydicom.dcmread(NIH_SC)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    path = tmp_path / "two-frames.dcm"
    ds.save_as(path)
    with pytest.raises(errors.MultiFrameError, match="2 frames"):
        prepare_file(path, 224)


def test_undecodable_pixel_data(tmp_path):
    ds = pydicom.dcmread(RSNA_JPEG)
    fragments = list(pydicom.encaps.generate_fragments(ds.PixelData))
    garbage = b"\xff\xd8" + bytes(range(256)) * 40 + b"\xff\xd9"
    assert fragments
    ds.PixelData = pydicom.encaps.encapsulate([garbage])
    path = tmp_path / "garbled-jpeg.dcm"
    ds.save_as(path)
    with pytest.raises(errors.UndecodablePixelDataError, match="JPEG Baseline"):
        prepare_file(path, 224)


@pytest.mark.parametrize("content", [b"hello, this is a text file\n" * 20,
                                     bytes(range(256)) * 4])
def test_not_dicom(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(errors.NotAnImageError, match="not a DICOM file"):
        prepare_file(path, 224)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.touch()
    with pytest.raises(errors.EmptyFileError, match="empty"):
        prepare_file(path, 224)


@pytest.mark.parametrize("source", [NIH_SC, RSNA_JPEG, PNGS[0]], ids=lambda p: p.name)
def test_truncated_files(source, tmp_path):
    path = tmp_path / source.name
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.TruncatedFileError):
        prepare_file(path, 224)


def test_raw_dataset_without_preamble_is_read(tmp_path):
    """Some archives hold datasets without the 128-byte preamble and 'DICM'."""
    ds = pydicom.dcmread(NIH_SC)
    path = tmp_path / "raw.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True,
                     little_endian=True)
    path.write_bytes(path.read_bytes()[132:] if path.read_bytes()[128:132] == b"DICM"
                     else path.read_bytes())
    assert np.array_equal(prepare_file(path, 224).array, prepare_file(NIH_SC, 224).array)


def test_rgb_png_uses_the_first_channel(tmp_path):
    from PIL import Image

    grey = np.asarray(Image.open(PNGS[0]))
    rgb = np.stack([grey, grey // 2, grey // 3], axis=-1)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    jpeg = tmp_path / "grey.jpg"
    Image.fromarray(grey).save(jpeg, quality=95)
    assert np.array_equal(prepare_file(path, 224).array, prepare_file(PNGS[0], 224).array)
    assert np.abs(prepare_file(jpeg, 224).array - prepare_file(PNGS[0], 224).array).max() < 40


def test_copy_keeps_file_untouched(tmp_path):
    """Conversion reads in place and never writes to the input."""
    path = tmp_path / WG04_CR.name
    shutil.copy(WG04_CR, path)
    before = path.read_bytes()
    prepare_file(path, 224)
    assert path.read_bytes() == before

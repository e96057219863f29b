"""Reading an input (pipeline/read.py): pixel rows read a band at a time are what pydicom
decodes, every transfer syntax decodes through pydicom's plugins, bitmaps use their first
channel, and every way an input can be unusable is refused with its own typed error."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from xrvd import errors
from xrvd.pipeline.convert import center_crop, prepare_dataset, prepare_file
from xrvd.pipeline.read import pixel_rows, read_dicom

from ..harness import NIH_SC, PNGS, REJECT, RSNA_JPEG, TINY_CR, WG04_CR


def test_tiny_fixture_without_pixel_data_is_refused_with_a_reason():
    with pytest.raises(errors.NoPixelDataError, match="no Pixel Data element"):
        prepare_file(TINY_CR, 224)


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

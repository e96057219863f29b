"""Heatmap key images (report/heatmap.py): the map goes back onto the source image where the
model saw it (crop and pad, wide and tall images), the source is windowed as a viewer would,
and the Secondary Capture is valid (dciodvfy), labelled, linked to its source, never
classified by xrvd again, and accepted by a PACS (Orthanc, by C-STORE)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from xrvd.pipeline.convert import fit_square, resize
from xrvd.pipeline.select import select
from xrvd.report.heatmap import (
    LABEL,
    display_pixels,
    heatmap_image,
    map_to_image,
    shown_shape,
    square_of,
)

from ..harness import (
    NIH_SC,
    RSNA_JPEG,
    WG04_CR,
    Orthanc,
    dciodvfy_errors,
    report_identity,
    storescu,
)

MODEL = "densenet121-res224-all"
SHAPES = [(300, 500), (500, 300), (301, 500), (300, 501), (7, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_the_square_is_the_one_convert_makes(shape, fit):
    image = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    square = fit_square(image, fit)
    top, left, size = square_of(*shape, fit)
    assert square.shape == (size, size)
    if fit == "crop":
        assert np.array_equal(square, image[top:top + size, left:left + size])
    else:
        assert np.array_equal(square[-top:-top + shape[0], -left:-left + shape[1]], image)


def test_on_a_square_image_the_map_is_upsampled_as_torch_does():
    import torch

    rng = np.random.default_rng(3)
    grid = rng.normal(size=(7, 7))
    values, inside = map_to_image(grid, (224, 224), "crop", (224, 224))
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None],
                                               size=(224, 224), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    assert inside.all()
    np.testing.assert_allclose(values, expected, atol=1e-12)


def smooth(shape: tuple[int, int]) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    return (600 * np.sin(2 * np.pi * x / shape[1]) * np.cos(np.pi * y / shape[0])
            + 300 * y / shape[0]).astype(np.float32)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_the_map_goes_back_where_the_model_saw_it(shape, fit):
    """A map that is the model's input itself (the image made square and resized, as
    convert.py does) lands back on the image it came from."""
    image = smooth(shape)
    model_input = resize(fit_square(image, fit), 64)[0, 0]
    values, inside = map_to_image(model_input.astype(np.float64), shape, fit, shape)
    top, left, size = square_of(*shape, fit)
    expected_inside = np.zeros(shape, bool)
    expected_inside[max(top, 0):top + size, max(left, 0):left + size] = True
    assert np.array_equal(inside, expected_inside)
    # Away from the square's edges (where pad's black border blurs in), the same image.
    margin = 2 * size // 64 + 1
    region = np.zeros(shape, bool)
    region[max(top, 0) + margin:min(shape[0], top + size) - margin,
           max(left, 0) + margin:min(shape[1], left + size) - margin] = True
    error = np.abs(values - image)[region]
    assert error.max() < 0.03 * np.ptp(image)
    # ...and not merely close: the same map put back mirrored or shifted is far off.
    assert np.abs(values[:, ::-1] - image)[region].max() > 0.3 * np.ptp(image)


def test_the_picture_is_never_larger_than_1024_and_keeps_its_aspect():
    assert shown_shape((1955, 1841)) == (1024, 964)
    assert shown_shape((600, 800)) == (600, 800)
    assert shown_shape((4000, 1000)) == (1024, 256)


def greyscale(pixels: np.ndarray, photometric: str, **attributes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def test_the_source_is_shown_as_a_viewer_shows_it():
    from pydicom.pixels import apply_voi_lut

    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    windowed = greyscale(ramp, "MONOCHROME2", WindowCenter=2000, WindowWidth=1000)
    # pydicom's own LINEAR window gives the same grey levels (its output spans 12 bits).
    expected = np.round(apply_voi_lut(ramp, windowed) / 4095 * 255).astype(np.uint8)
    assert np.abs(display_pixels(windowed).astype(int) - expected).max() <= 1
    inverted = greyscale(ramp, "MONOCHROME1", WindowCenter=2000, WindowWidth=1000)
    np.testing.assert_array_equal(display_pixels(inverted), 255 - display_pixels(windowed))
    # No window: the full range of the values.
    plain = display_pixels(greyscale(ramp, "MONOCHROME2"))
    assert (plain[0, 0], plain[0, -1]) == (0, 255) and (np.diff(plain[0].astype(int)) >= 0).all()


def hot_map() -> np.ndarray:
    """A map with one hot cell, at row 2, column 1 of 7 (the patient's right upper zone)."""
    grid = np.linspace(-1.0, 0.0, 49).reshape(7, 7)
    grid[2, 1] = 4.0
    return grid


def heatmap_of(source, tmp_path, *, untrained=False, name="heatmap.dcm"):
    ds = pydicom.dcmread(source)
    uids = dict(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    sc = heatmap_image(ds, hot_map(), finding="Cardiomegaly", score=0.873,
                       identity=report_identity(MODEL, untrained=untrained),
                       series_number=9902, instance_number=3, **uids)
    path = tmp_path / name
    sc.save_as(path, enforce_file_format=True)
    return ds, pydicom.dcmread(path), uids, path


@pytest.mark.parametrize("source", [WG04_CR, NIH_SC, RSNA_JPEG], ids=lambda p: p.stem)
def test_the_heatmap_is_a_valid_labelled_secondary_capture(source, tmp_path):
    ds, sc, uids, path = heatmap_of(source, tmp_path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert (sc.SOPInstanceUID, sc.SeriesInstanceUID) == (uids["sop_instance_uid"],
                                                         uids["series_instance_uid"])
    assert (sc.SeriesNumber, sc.InstanceNumber) == (9902, 3)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert (sc.get(keyword) or "") == (ds.get(keyword) or ""), keyword  # Type 2
    [reference] = sc.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        ds.SOPClassUID, ds.SOPInstanceUID)
    assert sc.SeriesDescription == LABEL
    assert LABEL in sc.ImageComments and LABEL in sc.DerivationDescription
    assert "Cardiomegaly 87.3 %" in sc.ImageComments
    assert sc.BurnedInAnnotation == "YES"
    assert (sc.Manufacturer, sc.ManufacturerModelName) == ("xrvd", MODEL)
    assert sc.SpecificCharacterSet == "ISO_IR 192"
    assert sc.LossyImageCompression == ("01" if source == RSNA_JPEG else "00")
    assert not select(sc).classify and select(sc).reason == "own_output"

    pixels = sc.pixel_array
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    assert pixels.shape == (*shown_shape((ds.Rows, ds.Columns)), 3)
    coloured = np.ptp(pixels.astype(int), axis=-1) > 8
    # The hot cell is tinted; most of the image is not (only above the map's median).
    top, left, size = square_of(*pixels.shape[:2], "crop")
    assert coloured[top + int(2.5 * size / 7), left + int(1.5 * size / 7)]
    assert coloured.mean() < 0.5
    # The burned-in band: white text on black, where nothing else is.
    band = pixels[:pixels.shape[0] // 30, :pixels.shape[1] // 4]
    assert (band == 0).all(axis=-1).mean() > 0.5 and (band == 255).all(axis=-1).any()
    assert dciodvfy_errors(path) == []


def test_untrained_weights_are_named_on_the_heatmap(tmp_path):
    _, sc, _, path = heatmap_of(NIH_SC, tmp_path, untrained=True)
    assert sc.SeriesDescription.startswith("UNTRAINED TEST - ")
    _, trained, _, _ = heatmap_of(NIH_SC, tmp_path, name="trained.dcm")
    # One more line burned in at the top, and nothing else different in the picture.
    differ = np.nonzero((sc.pixel_array != trained.pixel_array).any(axis=(1, 2)))[0]
    assert differ.size and differ.max() < sc.Rows // 8
    assert dciodvfy_errors(path) == []


def test_orthanc_accepts_the_heatmap_by_c_store(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.configure()
    _, sc, _, path = heatmap_of(WG04_CR, tmp_path)
    orthanc.start()
    try:
        done = storescu(orthanc.dicom_port, [path])
        assert done.returncode == 0, done.stdout + done.stderr
        [found] = orthanc.rest("POST", "/tools/find", {
            "Level": "Instance", "Expand": True,
            "Query": {"SOPInstanceUID": str(sc.SOPInstanceUID)}})
        tags = orthanc.rest("GET", f"/instances/{found['ID']}/simplified-tags")
        assert tags["SOPClassUID"] == SecondaryCaptureImageStorage
        assert tags["SeriesDescription"] == LABEL and tags["Modality"] == "OT"
    finally:
        orthanc.stop()


def test_crop_leaves_the_strips_the_model_never_saw_untinted_and_pad_does_not(tmp_path):
    """The WG04 CR is taller than wide: cropped, its top and bottom 57 rows (28 shown) are
    outside the model's square; padded, all of it is inside. A map hottest at its top row."""
    ds = pydicom.dcmread(WG04_CR)
    grid = np.repeat(np.linspace(3.0, -3.0, 7)[:, None], 7, axis=1)
    tinted = {}
    for fit in ("crop", "pad"):
        sc = heatmap_image(ds, grid, finding="Effusion", score=0.6,
                           identity=report_identity(MODEL), series_instance_uid=generate_uid(),
                           sop_instance_uid=generate_uid(), series_number=1,
                           instance_number=1, fit=fit)
        pixels = sc.pixel_array.astype(int)
        right = pixels[:, pixels.shape[1] // 2:]  # clear of the burned-in text
        tinted[fit] = np.ptp(right, axis=-1).max(axis=1) > 8  # per row
    top = round(57 * 1024 / 1955)
    assert not tinted["crop"][:top - 1].any() and tinted["crop"][top + 1:top + 100].all()
    assert tinted["pad"][:100].all()
    assert not tinted["crop"][-top + 1:].any()

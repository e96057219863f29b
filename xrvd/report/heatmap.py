"""Heatmap key images: one finding's class activation map (pipeline/cam.py) blended over the
radiograph it was computed from, as a DICOM Secondary Capture (highdicom's SCImage) that says
on its pixels and in its header that it is an AI result and not for diagnosis.

Pure: (source dataset with pixel data, one map, finding, score, model identity, UIDs) ->
pydicom Dataset. No torch, no matplotlib: it runs on the service install.

What the picture shows:
- the source image as a viewer shows it: Modality LUT, then the first VOI window (or the VOI
  LUT, or, with neither, the full range of values), MONOCHROME1 inverted; scaled down so that
  its long side is at most 1024 px (never up), RGB;
- the map, in the source's own geometry: convert.py makes the model's input from the centre
  square of the image (`fit: crop`, TorchXRayVision's XRayCenterCrop) or from the image padded
  to a square (`fit: pad`), and the map's h x w cells tile that square. Each pixel of the
  picture samples the map bilinearly at its centre (cell centres at (i + 0.5) * square / h,
  edges held, as torch's `interpolate(..., align_corners=False)` upsamples it), so the map is
  upsampled onto the square and the square put back where it was cut from, in one step. With
  `crop`, the strips the model never saw are left untinted;
- tinted only where the map is high for this image: above its median over the visible
  region, with a jet colour and an opacity that both rise from nothing at the median to the
  most (ALPHA) at its maximum. The map is in logit space and its level says little that the
  score does not (a positive finding's logits may all be negative at a low operating point),
  so the tint is relative: where in the image the evidence for the finding is strongest, not
  how strong it is. A flat map tints nothing;
- burned in at the top left on a black band: "AI RESULT - heatmap - not for diagnosis", the
  finding and its score in % (as the SR's Certainty of Finding), the model, and for untrained
  test weights a line that says so (BurnedInAnnotation YES).

The caller chooses the series. Modality (OT here, SR for the report) and SeriesDescription
are series-level attributes, so heatmaps belong in a series of their own beside the report's,
in the same study; xrvd's own selection skips them (Modality OT, RGB), so they never loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from ..pipeline.models import ModelIdentity
from ..pipeline.read import decode_pixels
from .build import CHARACTER_SET, MANUFACTURER

LABEL = "AI RESULT - heatmap - not for diagnosis"
MAX_SIDE = 1024
ALPHA = 0.6
# Matplotlib's jet at its anchor points: (position, red, green, blue).
_JET = np.array([(0.0, 0.0, 0.0, 0.5), (0.11, 0.0, 0.0, 1.0), (0.125, 0.0, 0.0, 1.0),
                 (0.34, 0.0, 0.86, 1.0), (0.35, 0.0, 0.9, 0.97), (0.375, 0.0, 1.0, 0.9),
                 (0.64, 1.0, 1.0, 0.0), (0.65, 1.0, 0.96, 0.0), (0.66, 1.0, 0.92, 0.0),
                 (0.89, 1.0, 0.0, 0.0), (0.91, 0.9, 0.0, 0.0), (1.0, 0.5, 0.0, 0.0)])
# CID 7202: what the source image is to this one.
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
_VALID = {"PatientBirthDate": r"\d{8}", "StudyDate": r"\d{8}",
          "StudyTime": r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", "PatientSex": r"[MFO]",
          "PatientAge": r"\d{3}[DWMY]"}
_COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
           "PatientAge", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
           "AccessionNumber", "StudyDescription")


@dataclass(frozen=True)
class Background:
    """The source image as the heatmaps show it: decoded, windowed and scaled down once for
    all of an image's findings."""
    source_shape: tuple[int, int]  # (rows, columns) of the source image
    shown: np.ndarray  # uint8 (rows, columns), at most MAX_SIDE on the long side


def background_of(source: Dataset) -> Background:
    grey = display_pixels(source)
    rows, columns = shown_shape(grey.shape)
    small = np.asarray(Image.fromarray(grey).resize((columns, rows), Image.Resampling.LANCZOS)
                       if (rows, columns) != grey.shape else grey)
    return Background(grey.shape, small)


def heatmap_image(source: Dataset, logit_map: np.ndarray, *, finding: str, score: float,
                  identity: ModelIdentity, series_instance_uid: str, sop_instance_uid: str,
                  series_number: int, instance_number: int,
                  fit: Literal["crop", "pad"] = "crop",
                  series_description: str = LABEL,
                  background: Background | None = None) -> Dataset:
    """The Secondary Capture of one finding's heatmap over one classified image.

    source: the classified image, with its pixel data (as read for classification; a
      dataset read with defer_pixel_data reads them here). Patient and study attributes are
      copied from it (invalid dates, times, sex or age are left empty: strict on output), it
      is referenced in SourceImageSequence, and its pixels are decoded here.
    logit_map: (h, w), that image's map for this finding, from
      Classifier.predict_with_maps: `maps[i, classifier.labels.index(finding)]`.
    finding: the label as the model names it; score: its score in [0, 1] (as predict gives).
    identity: the model (ManufacturerModelName, the burned-in text; untrained weights are
      labelled as such, as in the SR).
    series_instance_uid, sop_instance_uid, series_number, instance_number: chosen by the
      caller (a series of its own in the source's study: see the module's docstring).
    fit: the conversion's `fit` that the map was computed with ("crop" or "pad").
    series_description: SeriesDescription (LO, cut at 64 characters).
    background: background_of(source), made once for several findings of the same image.
    """
    logit_map = np.asarray(logit_map, dtype=np.float64)
    if logit_map.ndim != 2 or not np.isfinite(logit_map).all():
        raise ValueError(f"a heatmap needs one finite 2-D map, got shape {logit_map.shape}")
    background = background or background_of(source)
    small = background.shown
    values, inside = map_to_image(logit_map, background.source_shape, fit, small.shape)
    text = [LABEL, f"{finding}: {100.0 * float(score):.1f} %", f"model {identity.name}"]
    if identity.untrained:
        text.append("UNTRAINED TEST WEIGHTS: meaningless")
    pixels = burn_in(blend(small, values, inside), text)
    description = (f"UNTRAINED TEST - {series_description}" if identity.untrained
                   else series_description)[:64]
    return _dataset(source, pixels, finding, score, identity, description, fit,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid, series_number=series_number,
                    instance_number=instance_number)


# --- the picture -----------------------------------------------------------------------------


def display_pixels(source: Dataset) -> np.ndarray:
    """The source image as a viewer shows it by default, as uint8 (rows, columns)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = decode_pixels(source)
    values = np.asarray(apply_modality_lut(stored, source), dtype=np.float64)
    shown = _window(values, source)
    if shown is None and "VOILUTSequence" in source:
        lut = source.VOILUTSequence[0]
        shown = np.asarray(apply_voi_lut(values, source, index=0, prefer_lut=True),
                           dtype=np.float64)
        data = np.asarray(lut.LUTData, dtype=np.float64)
        shown = _scaled(shown, data.min(initial=0.0), data.max(initial=0.0))
    if shown is None:
        shown = _scaled(values, values.min(initial=0.0), values.max(initial=0.0))
    if str(source.PhotometricInterpretation).strip() == "MONOCHROME1":
        shown = 1.0 - shown
    return np.round(shown * 255.0).astype(np.uint8)


def _window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first VOI window (PS3.3 C.11.2.1.2) as [0, 1]; None where there is none usable."""
    try:
        center = float(_first(ds.get("WindowCenter")))
        width = float(_first(ds.get("WindowWidth")))
    except (TypeError, ValueError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0 or \
            (function == "LINEAR" and width < 1):
        return None
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -50, 50)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value):
    if value is None or isinstance(value, (str, bytes)):
        return value
    try:
        return value[0]
    except TypeError:
        return value
    except IndexError:
        return None


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def shown_shape(shape: tuple[int, int], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(rows, columns) with the long side at most max_side, the aspect kept (never larger)."""
    scale = min(1.0, max_side / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def square_of(rows: int, columns: int, fit: Literal["crop", "pad"]) -> tuple[int, int, int]:
    """(top, left, size) of the square convert.fit_square makes, in the image's pixel
    coordinates: it covers rows top..top+size-1 and columns left..left+size-1 (negative top
    or left: padding). The offsets are convert.py's (TorchXRayVision's XRayCenterCrop)."""
    if fit == "crop":
        size = min(rows, columns)
        return rows // 2 - size // 2, columns // 2 - size // 2, size
    if fit == "pad":
        size = max(rows, columns)
        return -((size - rows) // 2), -((size - columns) // 2), size
    raise ValueError(f"fit must be crop or pad, not {fit!r}")


def map_to_image(logit_map: np.ndarray, source_shape: tuple[int, int],
                 fit: Literal["crop", "pad"],
                 out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(values, inside), both out_shape: the map sampled at the centre of each pixel of the
    source image scaled to out_shape, and whether that centre lies in the model's square."""
    rows, columns = source_shape
    top, left, size = square_of(rows, columns, fit)
    height, width = logit_map.shape
    ys = (np.arange(out_shape[0]) + 0.5) * rows / out_shape[0] - top
    xs = (np.arange(out_shape[1]) + 0.5) * columns / out_shape[1] - left
    across = _linear(logit_map, ys * height / size - 0.5, axis=0)
    values = _linear(across, xs * width / size - 0.5, axis=1)
    inside = ((ys >= 0) & (ys < size))[:, None] & ((xs >= 0) & (xs < size))[None, :]
    return values, inside


def _linear(grid: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of grid along axis at fractional indices, the ends held."""
    n = grid.shape[axis]
    if n == 1:
        return np.repeat(grid, len(positions), axis=axis)
    held = np.clip(positions, 0.0, n - 1.0)
    low = np.minimum(np.floor(held).astype(int), n - 2)
    weight = held - low
    a, b = np.take(grid, low, axis=axis), np.take(grid, low + 1, axis=axis)
    weight = weight[:, None] if axis == 0 else weight[None, :]
    return a * (1.0 - weight) + b * weight


def colormap(t: np.ndarray) -> np.ndarray:
    """Jet: t in [0, 1] -> float RGB in [0, 1], shape t.shape + (3,)."""
    t = np.clip(t, 0.0, 1.0)
    return np.stack([np.interp(t, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1)


def blend(grey: np.ndarray, values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """uint8 RGB: grey with the map's upper half tinted (see the module's docstring)."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    shown = values[inside]
    if not shown.size:
        return rgb
    median, top = float(np.median(shown)), float(shown.max())
    if top - median <= 1e-6 * max(1.0, abs(top)):
        return rgb
    hot = inside & (values > median)  # only these change: half the work of the whole image
    t = np.minimum((values[hot] - median) / (top - median), 1.0)
    alpha = (ALPHA * t)[:, None]
    rgb[hot] = np.round(rgb[hot] * (1.0 - alpha) + colormap(t) * (255.0 * alpha))
    return rgb


def burn_in(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The lines written white on a black band at the top left, sized to the image."""
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    size = max(11, round(max(rgb.shape[:2]) / 48))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    margin, gap = max(2, size // 3), max(1, size // 4)
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    height = sum(box[3] - box[1] for box in boxes) + gap * (len(lines) - 1)
    width = max(box[2] - box[0] for box in boxes)
    draw.rectangle((0, 0, width + 2 * margin, height + 2 * margin), fill=(0, 0, 0))
    y = margin
    for line, box in zip(lines, boxes, strict=True):
        draw.text((margin - box[0], y - box[1]), line, font=font, fill=(255, 255, 255))
        y += box[3] - box[1] + gap
    return np.asarray(image)


# --- the dataset -----------------------------------------------------------------------------


def _dataset(source: Dataset, pixels: np.ndarray, finding: str, score: float,
             identity: ModelIdentity, description: str, fit: str, **uids) -> Dataset:
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        # The orientation is the source's (copied below); highdicom asks for one to start.
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        study_instance_uid=str(source.StudyInstanceUID), manufacturer=MANUFACTURER,
        manufacturer_model_name=identity.name, software_versions=__version__,
        series_description=description, transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=CHARACTER_SET, **uids)
    orientation = source.get("PatientOrientation")
    sc.PatientOrientation = orientation if orientation and len(orientation) == 2 else ""
    # Laterality is required unless the body part is known to be unpaired: xrvd classifies
    # chests only, so a source that names no body part is one.
    part = str(source.get("BodyPartExamined", "") or "").strip()
    sc.BodyPartExamined = part[:16] if part else "CHEST"
    laterality = str(source.get("Laterality", "") or "").strip()
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    for keyword in _COPIED:
        value = source.get(keyword)
        pattern = _VALID.get(keyword)
        if value not in (None, "") and (pattern is None or re.fullmatch(pattern, str(value))):
            setattr(sc, keyword, value)  # else as highdicom left it: Type 2 empty, or absent
    sc.ConversionType = "SYN"  # synthetic image: made by software, not captured
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = identity.name
    sc.SecondaryCaptureDeviceSoftwareVersions = __version__
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "01" if _lossy(source) else "00"
    summary = f"{finding} {100.0 * float(score):.1f} %, model {identity.name}"
    sc.ImageComments = f"{LABEL}: {summary}"[:10240]
    sc.DerivationDescription = (
        f"{LABEL}. Class activation map of {summary} (weights sha256 "
        f"{identity.weights_sha256[:16]}), over the source image as windowed for display; "
        f"tinted above the map's median; fit {fit}; xrvd {__version__}")[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) = _SOURCE_PURPOSE
    reference.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [reference]
    return sc


def _lossy(source: Dataset) -> bool:
    """Whether the source was ever lossy compressed (once set, DICOM never resets it)."""
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        return True
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(syntax) and syntax.is_compressed and syntax not in _LOSSLESS


_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
             "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.201",
             "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.1.99"}

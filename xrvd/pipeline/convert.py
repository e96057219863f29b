"""Turn a radiograph into the array TorchXRayVision models expect: float32, 1x1xRxR, values in
[-1024, 1024], at the model's resolution.

The default reproduces TorchXRayVision's own path exactly: `read_xray_dcm` (MONOCHROME1
inverted, scaled by 2**BitsStored - 1) or `normalize(img, 255)` for 8-bit bitmaps, then
`XRayCenterCrop`, then the resize the models apply themselves in `fix_resolution` (bilinear with
antialias). Doing that resize here, once per image, means the model sees an input already at
its native size and does no work of its own. VOI LUT, modality LUT and padding are explicit
opt-ins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from .read import decode_pixels, image_kind, pixel_rows, read_bitmap, read_dicom
from .resize import resizer

XRV_RANGE = 1024.0


@dataclass(frozen=True)
class ConvertOptions:
    voi_lut: bool = False
    modality_lut: bool = False
    fit: Literal["crop", "pad"] = "crop"


@dataclass(frozen=True)
class ModelInput:
    array: np.ndarray  # float32, shape (1, 1, resolution, resolution)
    source_shape: tuple[int, int]  # rows, columns as stored
    photometric: str  # MONOCHROME1, MONOCHROME2, or the bitmap mode
    bits_stored: int


def normalize(pixels: np.ndarray, maxval: int, *, invert: bool = False) -> np.ndarray:
    """TorchXRayVision's `normalize`, bit for bit: [0, maxval] -> [-1024, 1024] (of
    `maxval - pixels` with invert, as for MONOCHROME1), a band of rows at a time: each band
    stays in the CPU's cache through every step, which halves the time on a 2048x2048 image.
    Stored values above maxval (bits above BitsStored) are masked off on the way."""
    out = np.empty(pixels.shape, dtype=np.float32)
    if pixels.ndim != 2:
        return _normalize_into(out, pixels, maxval, invert)
    rows = max(1, _BAND_VALUES // max(1, pixels.shape[1]))
    for start in range(0, pixels.shape[0], rows):
        _normalize_into(out[start:start + rows], pixels[start:start + rows], maxval, invert)
    return out


_BAND_VALUES = 1 << 16  # 256 KiB of float32 per band
_EXACT_IN_FLOAT32 = 1 << 24


def _normalize_into(out: np.ndarray, pixels: np.ndarray, maxval: int,
                    invert: bool) -> np.ndarray:
    """TorchXRayVision computes `(2 * (x / maxval) - 1) * 1024` in float32. Multiplying by a
    power of two is exact and commutes with rounding, so `x / (maxval / 2048) - 1024` gives
    the very same floats in two steps instead of four (maxval / 2048 is exact too)."""
    integers = pixels.dtype.kind in "ui"
    if pixels.dtype.kind == "u" and maxval < np.iinfo(pixels.dtype).max and \
            pixels.max(initial=0) > maxval:
        pixels = pixels & maxval
    if invert and not (integers and maxval < _EXACT_IN_FLOAT32):
        pixels = maxval - pixels  # as TorchXRayVision's callers do, before the cast
        invert = False
    np.copyto(out, pixels, casting="unsafe")
    if invert:  # integers below 2**24 are exact in float32, and so is their difference
        np.subtract(np.float32(maxval), out, out=out)
    np.divide(out, np.float32(maxval) / np.float32(2048), out=out)
    np.subtract(out, np.float32(XRV_RANGE), out=out)
    return out


def dataset_to_normalized(ds: Dataset, options: ConvertOptions = ConvertOptions(),
                          path: object = "<dataset>") -> np.ndarray:
    """A checked greyscale dataset (see read.check_dataset) -> 2-D float32 in [-1024, 1024]."""
    return stored_to_normalized(decode_pixels(ds, path), ds, options)


def stored_to_normalized(pixels: np.ndarray, ds: Dataset,
                         options: ConvertOptions = ConvertOptions()) -> np.ndarray:
    """Stored pixel values (all of them, or a crop) -> float32 in [-1024, 1024]. Every step
    is per pixel, so cropping first gives the same values for less work."""
    values, maxval, invert = _normalizable(pixels, ds, options)
    return normalize(values, maxval, invert=invert)


def _normalizable(pixels: np.ndarray, ds: Dataset,
                  options: ConvertOptions) -> tuple[np.ndarray, int, bool]:
    """Stored pixel values -> what `normalize` takes: values in [0, maxval] (or unsigned
    ones with high bits to mask off), maxval, and whether to invert (MONOCHROME1)."""
    bits_stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    maxval = 2**bits_stored - 1
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        # Signed storage: shift into [0, maxval] so that black stays black.
        pixels = pixels.astype(np.int64) + 2 ** (bits_stored - 1)
    elif pixels.dtype.kind in "ui" and (options.modality_lut or options.voi_lut) and \
            int(pixels.max(initial=0)) > maxval:
        # Bits above BitsStored are not pixel data (overlays, garbage): mask them off
        # before the LUTs (normalize does it on the way for the default path).
        pixels = pixels & maxval
    values: np.ndarray = pixels
    if options.modality_lut:
        values = _modality_to_stored_range(values, ds, maxval)
    if options.voi_lut:
        from pydicom.pixels import apply_voi_lut

        values = np.clip(apply_voi_lut(values, ds, index=0), 0, maxval)
    return values, maxval, str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"


def _modality_to_stored_range(values: np.ndarray, ds: Dataset, maxval: int) -> np.ndarray:
    """Apply the Modality LUT / rescale, then map its output range back onto [0, maxval] so
    that the usual scaling to [-1024, 1024] still applies."""
    from pydicom.pixels import apply_modality_lut

    out = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    ends = np.asarray(apply_modality_lut(np.array([0, maxval]), ds), dtype=np.float64)
    low, high = float(ends.min()), float(ends.max())
    if high <= low:
        return np.zeros_like(out)
    return np.clip((out - low) / (high - low) * maxval, 0, maxval)


def _bitmap_maxval(pixels: np.ndarray) -> int:
    """8-bit bitmaps are TorchXRayVision's `normalize(img, 255)`; 16-bit ones by 65535."""
    return 255 if pixels.dtype == np.uint8 or int(pixels.max(initial=0)) <= 255 else 65535


def center_crop(image: np.ndarray) -> np.ndarray:
    """TorchXRayVision's `XRayCenterCrop` on a 2-D array (same offsets), as a view."""
    rows, cols = image.shape
    size = min(rows, cols)
    top = rows // 2 - size // 2
    left = cols // 2 - size // 2
    return image[top:top + size, left:left + size]


def fit_square(image: np.ndarray, fit: Literal["crop", "pad"] = "crop") -> np.ndarray:
    """Make a 2-D image square: TorchXRayVision's `XRayCenterCrop` (same offsets), or pad the
    short side with black (-1024) to keep the whole field of view."""
    rows, cols = image.shape
    if rows == cols:
        return image
    if fit == "crop":
        return center_crop(image)
    size = max(rows, cols)
    out = np.full((size, size), -XRV_RANGE, dtype=np.float32)
    top, left = (size - rows) // 2, (size - cols) // 2
    out[top:top + rows, left:left + cols] = image
    return out


def resize(square: np.ndarray, resolution: int) -> np.ndarray:
    """(N, N) -> (1, 1, R, R) exactly as TorchXRayVision's `fix_resolution` resizes (torch's
    antialiased bilinear, reproduced bit for bit in numpy by resize.py: no torch here)."""
    image = np.ascontiguousarray(square, dtype=np.float32)
    if image.shape != (resolution, resolution):
        image = resizer(*image.shape, resolution, resolution)(image)
    return image[None, None]


# 2 MiB of float32 per band: the numpy pass costs per call (its gathers amortise over rows);
# normalize_resized 2048->224 took 10.9 ms in bands of 256 rows, 13.1 ms in bands of 64.
_RESIZE_BAND_VALUES = 1 << 19


def normalize_resized(values: np.ndarray, maxval: int, invert: bool,
                      resolution: int) -> np.ndarray:
    """`resize(normalize(values, maxval, invert=invert), resolution)` for a square of
    values, bit for bit, without the full-size float32 image (16 MB at 2048x2048). The
    antialiased resize is separable, across first and then down; each band of rows is
    normalized and resized across while it is in the CPU's cache, then the narrow result is
    resized down."""
    size = values.shape[0]
    if values.ndim != 2 or values.shape[1] != size or size <= resolution:
        return resize(normalize(values, maxval, invert=invert), resolution)
    rows = max(1, _RESIZE_BAND_VALUES // size)
    band = np.empty((rows, size), dtype=np.float32)
    resized = resizer(size, size, resolution, resolution)
    across = np.empty((size, resolution), dtype=np.float32)
    for start in range(0, size, rows):
        stop = min(size, start + rows)
        normalized = _normalize_into(band[:stop - start], values[start:stop], maxval, invert)
        across[start:stop] = resized.across(normalized)
    return resized.down(across)[None, None]


def prepare_dataset(ds: Dataset, resolution: int, options: ConvertOptions = ConvertOptions(),
                    path: object = "<dataset>") -> ModelInput:
    """A checked dataset -> the model's input. Read with defer_pixel_data, uncompressed
    pixel data is read a band at a time as it is converted (PixelRows)."""
    if options.fit == "crop":
        rows = pixel_rows(ds, path) if options == ConvertOptions() and \
            isinstance(path, (str, os.PathLike)) else None
        pixels = center_crop(rows if rows is not None else decode_pixels(ds, path))
        array = normalize_resized(*_normalizable(pixels, ds, options), resolution)
    else:
        array = resize(fit_square(stored_to_normalized(decode_pixels(ds, path), ds, options),
                                  "pad"), resolution)
    return ModelInput(
        array=array,
        source_shape=(int(ds.Rows), int(ds.Columns)),
        photometric=str(ds.PhotometricInterpretation).strip(),
        bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
    )


def prepare_file(path: str | os.PathLike, resolution: int,
                 options: ConvertOptions = ConvertOptions()) -> ModelInput:
    """Any supported file -> model input; raises a typed ImageError when it cannot."""
    if image_kind(path) == "bitmap":
        pixels = read_bitmap(path)
        maxval = _bitmap_maxval(pixels)
        if options.fit == "crop":
            array = normalize_resized(center_crop(pixels), maxval, False, resolution)
        else:
            array = resize(fit_square(normalize(pixels, maxval), "pad"), resolution)
        return ModelInput(
            array=array,
            source_shape=(int(pixels.shape[0]), int(pixels.shape[1])),
            photometric="MONOCHROME2",
            bits_stored=8 if pixels.dtype == np.uint8 else 16,
        )
    return prepare_dataset(read_dicom(path, defer_pixel_data=True), resolution, options, path)

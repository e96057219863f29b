"""Read an input file: DICOM (any transfer syntax pydicom's plugins decode), PNG or JPEG.

Each way a file can be unusable raises its own typed error (see errors.py) with a message a
person can act on. Reading is lenient (real modalities write imperfect headers); only what
conversion truly needs is checked.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ..errors import (
    EmptyFileError,
    ImageError,
    InvalidHeaderError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    NotGreyscaleError,
    TruncatedFileError,
    UndecodablePixelDataError,
    malformed_header_detail,
)
from .select import pixel_problem

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated")


def sniff(path: str | os.PathLike) -> str:
    """'dicom', 'png', 'jpeg' or 'unknown', from the first bytes; raises for an empty file."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise EmptyFileError(path, "the file is empty (0 bytes); was the copy interrupted?")
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def read_dicom(path: str | os.PathLike, *, defer_pixel_data: bool = False) -> Dataset:
    """Read a DICOM file and check it holds one greyscale frame we can decode later. With
    defer_pixel_data, large values (the pixel data) stay in the file until they are used:
    `pixel_rows` reads uncompressed ones a band at a time, pydicom reads the others."""
    kind = sniff(path)
    ds = _read_checked(path, kind, _DEFER_BYTES if defer_pixel_data else None)
    if defer_pixel_data and _syntax(ds) == DeflatedExplicitVRLittleEndian:
        # pydicom would read a deferred value at its offset in the inflated data set, from
        # the deflated file: read it whole instead.
        ds = _read_checked(path, kind, None)
    return ds


_DEFER_BYTES = 1 << 16


def _read_checked(path: str | os.PathLike, kind: str, defer_size: int | None) -> Dataset:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=kind != "dicom", defer_size=defer_size)
        except InvalidDicomError as exc:
            raise NotAnImageError(path, _not_an_image_detail()) from exc
        except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            if kind == "dicom":
                raise TruncatedFileError(
                    path, f"the DICOM header cannot be read ({exc}); the file looks truncated "
                    "or corrupt, send it again"
                ) from exc
            raise NotAnImageError(path, _not_an_image_detail()) from exc
        except MemoryError:
            raise
        except Exception as exc:  # RecursionError (deep nesting), OverflowError, ...
            raise InvalidHeaderError(path, malformed_header_detail(exc)) from exc
    # Values are converted when first used: a crafted one raises here, not in dcmread.
    with header_errors(path):
        if kind != "dicom" and "SOPClassUID" not in ds and "PixelData" not in ds:
            # force=True parses almost anything; without these it was not DICOM at all.
            raise NotAnImageError(path, _not_an_image_detail())
        if any("End of file" in str(w.message) for w in caught) or \
                _deferred_past_end(ds, path):
            raise TruncatedFileError(
                path, "the file ends in the middle of an element (truncated); send it again"
            )
        check_dataset(ds, path)
    return ds


@contextmanager
def header_errors(path: object) -> Iterator[None]:
    """Whatever pydicom raises while a header is read or its values used is the file's fault
    (a crafted or corrupt header), and becomes InvalidHeaderError for this one file; the
    environment's failures (OSError, MemoryError) pass through, to be retried."""
    try:
        yield
    except (ImageError, OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a crafted header makes pydicom raise
        raise InvalidHeaderError(path, malformed_header_detail(exc)) from exc


def _deferred(ds: Dataset):
    """The pixel data element if its value was left in the file, else None (also for a
    deflated file, where offsets are into the inflated data: read_dicom reads it again)."""
    if PIXEL_DATA not in ds or _syntax(ds) == DeflatedExplicitVRLittleEndian:
        return None
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if element.value is not None or element.length == UNDEFINED_LENGTH:
        return None
    return element


def _syntax(ds: Dataset):
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _deferred_past_end(ds: Dataset, path: str | os.PathLike) -> bool:
    """pydicom seeks over a deferred value without noticing that the file ends first."""
    element = _deferred(ds)
    return element is not None and os.stat(path).st_size < element.value_tell + element.length


def _not_an_image_detail() -> str:
    return ("not a DICOM file (no 'DICM' marker at byte 128) and not a PNG or JPEG image; "
            "xrvd reads DICOM, PNG and JPEG")


def check_dataset(ds: Dataset, path: object = "<dataset>") -> None:
    """Raise the typed error that explains why this dataset is not one greyscale image."""
    if "PixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        if all(attr in ds for attr in _IMAGE_ATTRIBUTES):
            raise NoPixelDataError(
                path, f"{sop}: the header describes a {ds.Rows}x{ds.Columns} image but there is "
                "no Pixel Data element (the file was cut short or sent without its pixels); "
                "send the complete image"
            )
        what = "a Structured Report" if "SR" in str(ds.get("Modality", "")) else "not an image"
        raise NoPixelDataError(path, f"{what} ({sop}): it has no Pixel Data to classify")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # Files without a meta header (raw datasets) are implicit VR little endian by rule.
        ds.file_meta = meta if meta is not None else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    problem = pixel_problem(ds)
    if problem is not None:
        error = MultiFrameError if problem.reason == "multi_frame" else NotGreyscaleError
        raise error(path, problem.detail)


def decode_pixels(ds: Dataset, path: object = "<dataset>") -> np.ndarray:
    """The stored pixel values as a 2-D array (pydicom's plugins do the decoding)."""
    syntax = ds.file_meta.TransferSyntaxUID
    check_pixel_description(ds, path)
    # A read-only view of uncompressed pixel data instead of a copy: conversion never
    # writes into it.
    ds.pixel_array_options(view_only=True)
    try:
        pixels = ds.pixel_array
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise TruncatedFileError(
                path, f"the pixel data is shorter than the header says ({exc}); send it again"
            ) from exc
        raise UndecodablePixelDataError(path, _undecodable(syntax, exc)) from exc
    except Exception as exc:  # plugins raise RuntimeError, NotImplementedError and others
        raise UndecodablePixelDataError(path, _undecodable(syntax, exc)) from exc
    if pixels.ndim != 2:
        raise MultiFrameError(path, f"decoded pixel array has shape {pixels.shape}, not 2-D")
    return pixels


class PixelRows:
    """Uncompressed pixel data left in its file, read a band of rows when asked for:
    `rows[a:b]` is an array of those rows, `rows[a:b, c:d]` a smaller PixelRows, still
    unread (what center_crop makes). Converting a band as soon as it is read, while it is in
    the CPU's cache, costs a fifth less than reading the whole image (10 MB for a CR) first."""

    ndim = 2

    def __init__(self, path: str | os.PathLike, offset: int, row_bytes: int,
                 dtype: np.dtype, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)):
        self.path, self.offset, self.row_bytes, self.dtype = path, offset, row_bytes, dtype
        self.shape, self.origin = shape, origin

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, columns = (range(self.shape[0])[key[0]], range(self.shape[1])[key[1]])
            if rows.step != 1 or columns.step != 1:
                raise IndexError("PixelRows takes contiguous slices only")
            return PixelRows(self.path, self.offset, self.row_bytes, self.dtype,
                             (len(rows), len(columns)),
                             (self.origin[0] + rows.start, self.origin[1] + columns.start))
        rows = range(self.shape[0])[key]
        if rows.step != 1:
            raise IndexError("PixelRows takes contiguous slices only")
        band = np.empty((len(rows), self.row_bytes // self.dtype.itemsize), dtype=self.dtype)
        start = self.offset + (self.origin[0] + rows.start) * self.row_bytes
        with open(self.path, "rb", buffering=0) as f:
            f.seek(start)
            count = f.readinto(band)
        if count < band.nbytes:
            raise TruncatedFileError(self.path, "the file became shorter while it was read; "
                                     "send it again")
        return band[:, self.origin[1]:self.origin[1] + self.shape[1]]


def pixel_rows(ds: Dataset, path: str | os.PathLike) -> PixelRows | None:
    """The stored values of a checked dataset read with defer_pixel_data, as PixelRows, where
    they are plain little-endian unsigned 8- or 16-bit samples (what pydicom would give
    unchanged); None where pydicom must decode them (decode_pixels)."""
    element = _deferred(ds)
    if element is None or _syntax(ds) not in _NATIVE_LITTLE_ENDIAN:
        return None
    # pydicom decodes nothing here, so its checks would not run: a header that contradicts
    # itself (Bits Stored 40 of 16 allocated) would be converted, and classified.
    check_pixel_description(ds, path)
    bits = int(ds.get("BitsAllocated") or 0)
    if bits not in (8, 16) or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(np.uint8 if bits == 8 else "<u2")
    return PixelRows(path, element.value_tell, columns * dtype.itemsize, dtype, (rows, columns))


def check_pixel_description(ds: Dataset, path: object = "<dataset>") -> None:
    """Refuse what pydicom would refuse to decode, by pydicom's own checks (those `pixel_array`
    runs before decoding: Bits Allocated, Bits Stored, Rows, Columns, Pixel Representation,
    Samples per Pixel, Photometric Interpretation, Number of Frames, and the pixel data's
    length against them), without reading deferred pixel data. Pixel data long enough for more
    frames than the header says decodes to several frames there: MultiFrameError, as in
    decode_pixels."""
    try:
        runner = DecodeRunner(ds.file_meta.TransferSyntaxUID)
    except ValueError:
        return  # not a transfer syntax pydicom knows: decode_pixels says it cannot decode it
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    try:
        runner.set_options(**as_pixel_options(ds), pixel_keyword="PixelData",
                           pixel_vr=element.VR)
        # Validation reads only the length of native pixel data: a deferred value is
        # represented by a zero-copy stand-in of its length, not read (10 MB for a CR).
        runner.set_source(element.value if element.value is not None
                          else np.broadcast_to(np.uint8(0), element.length))
        runner.validate()
        frames = runner.number_of_frames
    except Exception as exc:  # noqa: BLE001 - pydicom raises ValueError, AttributeError, ...
        raise InvalidHeaderError(
            path, f"the header's pixel description is inconsistent ({exc}); the file was not "
            "classified. Have the device or archive that wrote it send a corrected copy"
        ) from exc
    if frames != 1:
        raise MultiFrameError(
            path, f"the pixel data holds {frames} frames though the header says 1: xrvd "
            "classifies single-frame radiographs only"
        )


_NATIVE_LITTLE_ENDIAN = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF


def _undecodable(syntax: pydicom.uid.UID, exc: Exception) -> str:
    return (f"cannot decode the pixel data ({syntax.name}): {exc}. If the transfer syntax is "
            "compressed, check that pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg are "
            "installed; otherwise the pixel data is corrupt")


def read_bitmap(path: str | os.PathLike) -> np.ndarray:
    """PNG or JPEG pixels as a 2-D array, the way TorchXRayVision's `load_image` reads them:
    the first channel of a colour image, values as stored (8 or 16 bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            elif image.mode == "CMYK" or image.mode.startswith("YCbCr"):
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except UnidentifiedImageError as exc:
        raise NotAnImageError(path, _not_an_image_detail()) from exc
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise TruncatedFileError(path, f"the image file is truncated ({exc})") from exc
        raise UndecodablePixelDataError(path, f"cannot decode the image: {exc}") from exc
    except SyntaxError as exc:  # PIL's PNG reader reports broken chunks this way
        raise TruncatedFileError(path, f"the image file is corrupt or truncated ({exc})") from exc
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0]
    if pixels.ndim != 2:
        raise ImageError(path, f"unexpected image shape {pixels.shape}")
    return pixels


def image_kind(path: str | os.PathLike) -> str:
    """The reader for a path: 'dicom' or 'bitmap' (raises for empty and unknown files)."""
    kind = sniff(path)
    if kind in ("png", "jpeg"):
        return "bitmap"
    if kind == "unknown" and Path(path).suffix.lower() in (".png", ".jpg", ".jpeg"):
        return "bitmap"
    return "dicom"

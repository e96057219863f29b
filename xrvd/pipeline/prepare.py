"""One instance from its file to a model input: header, selection, decoding, conversion.

The daemon's worker runs this in its own thread; `xrvd backfill` runs the very same function
in a pool of worker processes. It never raises: every outcome, including an unexpected error,
comes back as a `Prepared` that pickles cheaply (the header without pixel data, and the small
model input).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from ..errors import ConversionFailedError, ImageError
from ..fsutil import drop_cached_pages
from .convert import ConvertOptions, prepare_dataset
from .read import header_errors, read_dicom
from .select import SelectRules, select

PIXEL_DATA = Tag(0x7FE0, 0x0010)


@dataclass(frozen=True)
class PrepareJob:
    instance_id: int
    path: str
    # Selection is decided where an instance is journaled, from the header read there; only
    # a row journaled by an older xrvd (or a caller with no verdict) asks for it here.
    select: bool = True


@dataclass(frozen=True)
class Prepared:
    instance_id: int
    header: Dataset | None = None  # without pixel data: what the report needs
    array: np.ndarray | None = None
    skip_reason: str | None = None
    skip_detail: str = ""
    error: str | None = None  # not the image's fault: the study is retried


def prepare_instance(job: PrepareJob, rules: SelectRules, options: ConvertOptions,
                     resolution: int) -> Prepared:
    """The file is parsed once, with its pixel data left in the file until conversion reads
    it; the same parse gives the header the report needs."""
    try:
        with header_errors(job.path):
            ds = read_dicom(job.path, defer_pixel_data=True)
            choice = select(ds, rules) if job.select else None
        if choice is not None and not choice.classify:
            return Prepared(job.instance_id, skip_reason=choice.reason or "not_selected",
                            skip_detail=choice.detail)
        with conversion_errors(job.path):
            array = prepare_dataset(ds, resolution, options, job.path).array
    except ImageError as exc:
        return Prepared(job.instance_id, skip_reason=exc.reason, skip_detail=exc.detail)
    except FileNotFoundError as exc:
        return Prepared(job.instance_id, skip_reason="file_missing",
                        skip_detail=f"the file is gone ({exc.strerror}); it was journaled "
                        "but removed before it could be classified")
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which retries the study
        # Only the machine's failures get here (OSError, MemoryError): whatever the file makes
        # the readers raise is an ImageError by now, so one crafted file skips itself only.
        return Prepared(job.instance_id, error=f"{type(exc).__name__}: {exc}")
    # Its pixels are not read again. Freed now, its pages hold the next instances to arrive;
    # left cached, every instance takes fresh memory (on VMs whose host reclaims free memory,
    # first touching a page costs more than copying into it) and gigabytes of spool and
    # archive files push other programs' data out of the page cache.
    header = without_pixel_data(ds)
    drop_cached_pages(job.path)
    return Prepared(job.instance_id, header=header, array=array)


def without_pixel_data(ds: Dataset) -> Dataset:
    """The header as a read with stop_before_pixels gives it (the report's source): small to
    pickle back from a worker process, and no file offsets into a file that may be purged."""
    header = Dataset()
    for tag in ds.keys():  # tags, not elements: iterating the dataset would read the pixels
        if tag >= PIXEL_DATA:
            break
        header.add(ds[tag])
    header.file_meta = ds.file_meta
    header.preamble = getattr(ds, "preamble", None)
    header.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian,
                                 ds.original_character_set)
    return header


@contextmanager
def conversion_errors(path: object) -> Iterator[None]:
    """A failure past the header checks is still this one file's (values nothing checks, such
    as LUTs or 64-bit samples, that the arithmetic cannot take): ConversionFailedError, so that
    the study's other images are classified. The machine's failures (OSError, MemoryError)
    pass through, to be retried."""
    try:
        yield
    except (ImageError, OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one file must never fail the others
        raise ConversionFailedError(
            path, f"its pixels could not be converted ({type(exc).__name__}: {exc}); the "
            "file was not classified. Check it with a DICOM validator (e.g. dciodvfy); if it "
            "is valid, report it to xrvd's maintainers with the file"
        ) from exc

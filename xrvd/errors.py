"""Typed errors. Every error carries a stable `reason` code (journaled and logged by the
daemon) and a message that tells a person what to do next."""

from __future__ import annotations

# Exit statuses of the commands: done; done, but some inputs failed; could not run (bad
# config, missing weights); interrupted (128 + SIGINT, as shells report it).
EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class XrvdError(Exception):
    """Base of every error xrvd raises on purpose."""

    reason = "error"


class ConfigError(XrvdError):
    """The configuration file is missing, unreadable or invalid."""

    reason = "config_invalid"

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: invalid configuration:\n{lines}")


# --- models and weights -------------------------------------------------------------


class UnknownModelError(XrvdError):
    reason = "unknown_model"


class WeightsError(XrvdError):
    """A model's weights cannot be used."""

    reason = "weights_error"


class WeightsMissingError(WeightsError):
    reason = "weights_missing"


class WeightsCorruptError(WeightsError):
    reason = "weights_corrupt"


class UntrainedWeightsError(WeightsError):
    """Untrained (random) weights were found where real ones are required."""

    reason = "weights_untrained"


class DownloadError(WeightsError):
    reason = "download_failed"


class WeightsUnsafeError(WeightsError):
    """The file names something a TorchXRayVision weights file never contains (a function
    to call, a class outside the model's own): it was refused before anything in it ran."""

    reason = "weights_unsafe"


class WeightsChangedError(WeightsError):
    """The file is not the one `xrvd models import|fetch` installed (its sha256 differs from
    the record in the state directory)."""

    reason = "weights_changed"


class TrustRecordError(WeightsError):
    """The record of installed weights in the state directory cannot be read or written."""

    reason = "weights_record_failed"


# --- reading and converting images --------------------------------------------------


class ImageError(XrvdError):
    """An input cannot be turned into a model input. Subclasses name why."""

    reason = "image_error"

    def __init__(self, path: object, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class EmptyFileError(ImageError):
    reason = "empty_file"


class TruncatedFileError(ImageError):
    reason = "truncated"


class NotAnImageError(ImageError):
    """Neither DICOM nor an image format we read (PNG, JPEG)."""

    reason = "not_dicom"


class NoPixelDataError(ImageError):
    """A DICOM object without an image, e.g. a Structured Report."""

    reason = "no_pixel_data"


class NotGreyscaleError(ImageError):
    reason = "not_greyscale"


class MultiFrameError(ImageError):
    reason = "multi_frame"


class UndecodablePixelDataError(ImageError):
    reason = "undecodable"


class UnreadableFileError(ImageError):
    """The file cannot be opened or read (missing, no permission)."""

    reason = "unreadable"


class InvalidHeaderError(ImageError):
    """A malformed DICOM header: pydicom cannot parse it (sequences nested thousands deep,
    impossible lengths), or its pixel description contradicts itself or the pixel data (Bits
    Stored above Bits Allocated, more Rows x Columns than there are pixels). Never classified:
    values that do not describe the pixels would give a finding about noise."""

    reason = "invalid_header"


class ConversionFailedError(ImageError):
    """Converting pixels that pydicom accepted failed all the same (values no check covers,
    such as LUTs): the image is not classified, and the others are."""

    reason = "conversion_failed"


def malformed_header_detail(exc: BaseException) -> str:
    """What a person reads about a header pydicom cannot parse, and what to do about it."""
    what = ("its sequences are nested too deeply to read" if isinstance(exc, RecursionError)
            else f"{type(exc).__name__}: {exc}")
    return (f"the DICOM header is malformed ({what}); the file was not classified. Check it "
            "with a DICOM validator (e.g. dciodvfy) and have the device or archive that "
            "wrote it send a corrected copy")


class NonFiniteScoresError(ImageError):
    """The model produced NaN or infinite scores for this image: never report those."""

    reason = "non_finite_scores"


class StateDirBusyError(XrvdError):
    """Another xrvd process (serve or backfill) is using the same state directory."""


class CrawlError(XrvdError):
    """A path given to `xrvd backfill` cannot be crawled."""

"""Which instances are classifiable chest radiographs, and why not.

Works on a header read without pixel data, once per instance: the store decides each
instance's verdict as it journals it, from the header it read to journal it, and a "no" never
reopens a finished study (a late lateral, CT or report of ours cannot change its result; a
PACS that forwards everything back would otherwise make xrvd report forever). Every "no" has
a stable reason code that is journaled and logged. SOP class alone is never enough: real chest X-rays arrive as Secondary
Capture with Modality DX, without BodyPartExamined, without ViewPosition.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from ..errors import malformed_header_detail

# Objects that never hold an image to classify, whatever their Modality says.
_NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN"}
_LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"}
XRVD_MARKER = "xrvd"  # our SRs carry it in Manufacturer / Software Versions (never loop)


@dataclass(frozen=True)
class SelectRules:
    modalities: tuple[str, ...] = ("CR", "DX")
    views: tuple[str, ...] = ("PA", "AP")
    classify_missing_view: bool = True
    body_parts: tuple[str, ...] = ("CHEST",)
    classify_missing_body_part: bool = True
    min_size: int = 256

    @classmethod
    def from_config(cls, chosen) -> SelectRules:
        """From config's `select` section (config.SelectConfig)."""
        return cls(
            modalities=tuple(m.upper() for m in chosen.modalities),
            views=tuple(v.upper() for v in chosen.views),
            classify_missing_view=chosen.classify_missing_view,
            body_parts=tuple(b.upper() for b in chosen.body_parts),
            classify_missing_body_part=chosen.classify_missing_body_part,
            min_size=chosen.min_size,
        )


@dataclass(frozen=True)
class Selection:
    classify: bool
    reason: str | None = None  # reason code when not classified
    detail: str = ""
    view: str = ""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip().upper()


def is_own_output(ds: Dataset) -> bool:
    return XRVD_MARKER.upper() in _text(ds, "Manufacturer") or \
        _text(ds, "ManufacturerModelName").startswith(XRVD_MARKER.upper())


def view_of(ds: Dataset) -> str:
    view = _text(ds, "ViewPosition")
    if view:
        return view
    for item in ds.get("ViewCodeSequence", []) or []:
        meaning = str(item.get("CodeMeaning", "")).lower()
        if "lateral" in meaning:
            return "LATERAL"
        for candidate in ("postero-anterior", "antero-posterior"):
            if candidate in meaning:
                return "PA" if candidate.startswith("postero") else "AP"
    return ""


def select(ds: Dataset, rules: SelectRules = SelectRules()) -> Selection:
    """The verdict on one instance from its header (read without pixel data). Never raises:
    it runs where an instance is journaled, and a crafted value (a NumberOfFrames of "x", a
    ViewCodeSequence that is not one) is that file's problem, as reason invalid_header."""
    try:
        return _select(ds, rules)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a crafted value makes pydicom raise
        return Selection(False, "invalid_header", malformed_header_detail(exc))


def _select(ds: Dataset, rules: SelectRules) -> Selection:
    modality = _text(ds, "Modality")
    if is_own_output(ds):
        return Selection(False, "own_output", "produced by xrvd; never classified again")
    if modality in _NON_IMAGE_MODALITIES or "PixelData" not in ds and "Rows" not in ds:
        return Selection(False, "not_an_image", f"Modality {modality or '(none)'}, no image")
    if modality not in rules.modalities:
        return Selection(False, "modality", f"Modality {modality or '(none)'} is not one of "
                         f"{', '.join(rules.modalities)}")
    view = view_of(ds)
    if view in _LATERAL_VIEWS:
        return Selection(False, "lateral_view", f"ViewPosition {view}", view)
    if view and view not in rules.views:
        return Selection(False, "view", f"ViewPosition {view} is not one of "
                         f"{', '.join(rules.views)}", view)
    if not view and not rules.classify_missing_view:
        return Selection(False, "view_missing", "no ViewPosition, and config requires one")
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in rules.body_parts:
        return Selection(False, "body_part", f"BodyPartExamined {body_part} is not one of "
                         f"{', '.join(rules.body_parts)}", view)
    if not body_part and not rules.classify_missing_body_part:
        return Selection(False, "body_part_missing", "no BodyPartExamined, and config "
                         "requires one", view)
    problem = pixel_problem(ds)
    if problem is not None:
        return Selection(False, problem.reason, problem.detail, view)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < rules.min_size:
        return Selection(False, "too_small", f"{rows}x{cols} is below the minimum "
                         f"{rules.min_size} px", view)
    return Selection(True, view=view or "unknown")


def pixel_problem(ds: Dataset) -> Selection | None:
    """Why the pixels are not one greyscale frame, or None. Also what read.check_dataset
    raises for a file classified directly (`xrvd classify`), so both say the same."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return Selection(False, "multi_frame",
                         f"{frames} frames: xrvd classifies single-frame radiographs only")
    photometric = _text(ds, "PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        return Selection(False, "not_greyscale",
                         f"photometric interpretation {photometric or '(missing)'} with "
                         f"{samples} sample(s) per pixel: chest X-ray models need a greyscale "
                         "(MONOCHROME1/2) image")
    return None

"""Fast measurement groups for the report: highdicom builds each kind of TID 1501 group once,
pydicom encodes it once, and every later group of that kind is the same bytes with its own
values put in (srdocument.py does the same for the document around them).

Why: a report holds one group per image and label (18 for most models). Building and writing
them through highdicom and pydicom costs about 15 ms per group, 0.3 s for a one-image study,
which would make the report, not the model, the slowest stage of the daemon and of a
back-fill. The groups of one model differ only in a handful of values (the image's UIDs, the
tracking UID and text, the score, Present or Absent), so a group encoded once with
placeholders for those values is a template: filling it is a few byte replacements.

Every sequence and item in a template has undefined length (delimited), so a value that
changes length changes only its own element's length field. A template whose placeholders do
not each appear exactly as often as expected is refused and the caller builds the slow way;
tests check that both ways give the same report.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.valuerep import DS

# Placeholders: valid values that never occur in real data.
TRACKING_UID = "2.25.111111111111111111111111111111111111"
SOP_CLASS_UID = "2.25.222222222222222222222222222222222222"
SOP_INSTANCE_UID = "2.25.333333333333333333333333333333333333"
IDENTIFIER = "xrvd placeholder tracking identifier"
VALUE = 12.3457  # a score in %, rounded to 4 decimals as real ones are

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class Fill:
    tracking_uid: str
    identifier: str
    sop_class_uid: str
    sop_instance_uid: str
    value: float


def _element(vr: str, value: bytes) -> bytes:
    """Explicit VR little endian: VR and length, then the value padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if vr in _LONG_VRS:
        return vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return vr.encode() + struct.pack("<H", len(value)) + value


def _undefined_lengths(item: Dataset) -> None:
    item.is_undefined_length_sequence_item = True
    for element in item:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for child in element.value:
                _undefined_lengths(child)


def encode_item(item: Dataset, encodings: list[str]) -> bytes:
    """One sequence item, as pydicom writes it in Explicit VR Little Endian, every sequence
    and item delimited."""
    _undefined_lengths(item)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_sequence_item(buffer, item, encodings)
    return buffer.getvalue()


def _ds(value: float) -> bytes:
    return str(DS(value, auto_format=True)).encode()


class GroupTemplate:
    """One kind of group (label, Present or Absent) as bytes with placeholders."""

    def __init__(self, encoded: bytes):
        self.parts: list[tuple[bytes, str]] = []  # split around the placeholders
        self._split(encoded)

    _PLACEHOLDERS: tuple[tuple[str, bytes, str, int], ...] = (
        # field, encoded placeholder, VR, occurrences in a group
        ("tracking_uid", _element("UI", TRACKING_UID.encode()), "UI", 1),
        ("identifier", _element("UT", IDENTIFIER.encode()), "UT", 1),
        ("sop_class_uid", _element("UI", SOP_CLASS_UID.encode()), "UI", 2),
        ("sop_instance_uid", _element("UI", SOP_INSTANCE_UID.encode()), "UI", 2),
        ("value_ds", _element("DS", _ds(VALUE)), "DS", 1),
        ("value_fd", _element("FD", struct.pack("<d", VALUE)), "FD", 1),
    )

    def _split(self, encoded: bytes) -> None:
        marks = []
        for field, placeholder, _vr, expected in self._PLACEHOLDERS:
            found = encoded.count(placeholder)
            if found != expected:
                raise ValueError(f"template: {field} found {found} times, expected {expected}")
            start = 0
            while (at := encoded.find(placeholder, start)) >= 0:
                marks.append((at, len(placeholder), field))
                start = at + len(placeholder)
        marks.sort()
        position = 0
        for at, length, field in marks:
            self.parts.append((encoded[position:at], field))
            position = at + length
        self.tail = encoded[position:]

    def fill(self, values: Fill) -> bytes:
        encoded = {
            "tracking_uid": _element("UI", values.tracking_uid.encode()),
            "identifier": _element("UT", values.identifier.encode("utf-8")),
            "sop_class_uid": _element("UI", values.sop_class_uid.encode()),
            "sop_instance_uid": _element("UI", values.sop_instance_uid.encode()),
            "value_ds": _element("DS", _ds(values.value)),
            "value_fd": _element("FD", struct.pack("<d", values.value)),
        }
        return b"".join(chunk + encoded[field] for chunk, field in self.parts) + self.tail


class GroupTemplates:
    """Templates made on first use by `build(label, present, placeholders) -> item`."""

    def __init__(self, build: Callable[[str, bool, Fill], Dataset], encodings: list[str]):
        self._build = build
        self._encodings = encodings
        self._templates: dict[tuple[str, bool], GroupTemplate] = {}

    def group(self, label: str, present: bool, values: Fill) -> bytes:
        key = (label, present)
        if key not in self._templates:
            placeholders = Fill(TRACKING_UID, IDENTIFIER, SOP_CLASS_UID, SOP_INSTANCE_UID,
                                VALUE)
            item = self._build(label, present, placeholders)
            self._templates[key] = GroupTemplate(encode_item(item, self._encodings))
        return self._templates[key].fill(values)

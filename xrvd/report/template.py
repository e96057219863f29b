"""Reports from templates, checked against highdicom: report/build.py checks each template
when it is made and builds the slow way when one does not fill in exactly as highdicom builds.

Measurement groups: highdicom builds each kind of TID 1501 group once, pydicom encodes it
once, and every later group of that kind is the same bytes with its own values put in.

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

The document around the groups: highdicom builds one report per model and settings, and
every later report reuses its elements with the study's own put in.

Why: building the document through highdicom (copying the patient and study, collecting the
evidence, checking every attribute against the standard's tables) costs about 20 ms, more
than classifying an image on ONNX Runtime. Filling a template in costs about 1 ms.

What belongs to a study is listed in PER_STUDY; the template leaves those elements out and
`fill` puts them in the way highdicom does. The report module checks each template once,
when it is made: filled in for a second, different image it must give what highdicom builds
for that image, else reports are built the slow way.
"""

from __future__ import annotations

import datetime
import functools
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr.utils import collect_evidence
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence_item
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.valuerep import DA, DS, TM

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


# --- the document around the groups ---------------------------------------------------

CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
TIMESTAMPS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")
# The Type 2 patient and study attributes the SR copies from its evidence (report/build.py
# gives a source that lacks one an empty one).
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
         "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# The root elements of one study's report: the template leaves them out and `fill` puts the
# study's own in (the patient and study attributes as highdicom copies them from the first
# image).
PER_STUDY = {Tag(keyword) for keyword in (
    "SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "StudyInstanceUID", *TIMESTAMPS,
    "CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence",
    "ContributingEquipmentSequence", *TYPE2)}


class DocumentTemplate:
    """A report made by highdicom, less its PER_STUDY elements, with its content tree encoded
    around its measurement groups (`groups`, encoded as GroupTemplates gives them,
    must occur in it exactly once)."""

    def __init__(self, document: Dataset, groups: bytes, encodings: list[str]):
        self.cls = type(document)
        content = b"".join(encode_item(item, encodings) for item in document.ContentSequence)
        if content.count(groups) != 1:
            raise ValueError("document template: the groups are not where expected")
        self.before, self.after = content.split(groups)
        self.root = {tag: element for tag, element in document.items()
                     if tag not in PER_STUDY and tag != CONTENT_SEQUENCE}
        self.file_meta = document.file_meta
        # highdicom's own Contributing Equipment item ends the sequence: the same for all.
        self.highdicom_equipment = document.ContributingEquipmentSequence[-1]

    def fill(self, sources: list[Dataset], groups: bytes, *, sop_instance_uid: str,
             series_instance_uid: str, instance_number: int, equipment: Dataset,
             evidence: list[Dataset] = ()) -> Dataset:
        """The report of `sources` holding the encoded `groups`. The template's elements are
        shared between reports, so elements are only ever replaced here, never changed.
        evidence: other instances the groups cite (the heatmaps), listed with the sources."""
        document = self.cls.__new__(self.cls)
        Dataset.__init__(document, dict(self.root))
        document[CONTENT_SEQUENCE] = RawDataElement(
            CONTENT_SEQUENCE, "SQ", 0xFFFFFFFF, self.before + groups + self.after, 0, False,
            True)
        # Declared as encoded the way it will be written, so pydicom writes the raw content
        # as it is instead of decoding it first.
        document.set_original_encoding(False, True, document._character_set)
        document.file_meta = FileMetaDataset(dict(self.file_meta))
        document.file_meta.add_new("MediaStorageSOPInstanceUID", "UI", sop_instance_uid)
        document.add_new("SOPInstanceUID", "UI", sop_instance_uid)
        document.add_new("SeriesInstanceUID", "UI", series_instance_uid)
        document.add_new("InstanceNumber", "IS", instance_number)
        now = datetime.datetime.now()
        for keyword in TIMESTAMPS:
            if keyword.endswith("Date"):
                document.add_new(keyword, "DA", DA(now.date()))
            else:
                document.add_new(keyword, "TM", TM(now.time()))
        document.copy_patient_and_study_information(sources[0])
        no_content = Dataset()  # what the content cites is in the sources by construction
        no_content.ContentSequence = []
        same_study, other_studies = collect_evidence(
            [*sources, *evidence], no_content, study_instance_uid=str(sources[0].StudyInstanceUID))
        if same_study:
            document.add_new("CurrentRequestedProcedureEvidenceSequence", "SQ", same_study)
        if other_studies:
            document.add_new("PertinentOtherEvidenceSequence", "SQ", other_studies)
        document.add_new("ContributingEquipmentSequence", "SQ",
                         [*_acquisition_equipment(sources[0]), equipment,
                          self.highdicom_equipment])
        return document


def _acquisition_equipment(source: Dataset) -> list[Dataset]:
    """The item highdicom's ContributingEquipment.for_image_acquisition makes (none where it
    raises), without its look-up of the SOP class in the standard's tables for every report
    (a third of the time left); the template's check covers it."""
    manufacturer = source.get("Manufacturer")
    if not manufacturer or not is_image_class(str(source.get("SOPClassUID", ""))):
        return []
    when = source.get("AcquisitionDateTime")
    if when is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            when = datetime.datetime.combine(date, time)
    try:
        return [hd.ContributingEquipment(
            manufacturer=manufacturer, purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=source.get("ManufacturerModelName"),
            software_versions=source.get("SoftwareVersions"),
            device_serial_number=source.get("DeviceSerialNumber"),
            institution_name=source.get("InstitutionName"),
            institutional_department_name=source.get("InstitutionalDepartmentName"),
            institution_address=source.get("InstitutionAddress"),
            station_name=source.get("StationName"), contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)")]
    except Exception:  # noqa: BLE001 - as highdicom: no acquisition item for such a source
        return []


@functools.lru_cache(maxsize=64)
def is_image_class(sop_class_uid: str) -> bool:
    """highdicom's own test, once per SOP class."""
    probe = Dataset()
    probe.SOPClassUID = sop_class_uid
    probe.Manufacturer = "probe"
    try:
        hd.ContributingEquipment.for_image_acquisition(probe)
    except Exception:  # noqa: BLE001 - not an image, or a SOP class highdicom does not know
        return False
    return True


def placeholder_image(number: int) -> Dataset:
    """A chest CR header to make and check templates with; the second one has more of what a
    study carries (patient, study, acquisition equipment)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = f"2.25.{number}1"
    ds.StudyInstanceUID = f"2.25.{number}2"
    ds.SeriesInstanceUID = f"2.25.{number}3"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 64
    for keyword in TYPE2:
        setattr(ds, keyword, "")
    if number > 1:
        ds.PatientName = "Placeholder^Patient"
        ds.PatientID = "P2"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.PatientAge = "055Y"
        ds.StudyDate = "20200101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "A2"
        ds.StudyDescription = "CHEST"
        ds.Manufacturer = "Placeholder"
        ds.ManufacturerModelName = "Model2"
        ds.StationName = "STATION2"
        ds.InstitutionName = "Institution2"
        ds.AcquisitionDate = "20200101"
        ds.AcquisitionTime = "115900"
    return ds


def comparable(document: Dataset) -> Dataset:
    """A report as written and read back, less the moments it was made: two reports of the
    same study and run compare equal."""
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    for keyword in TIMESTAMPS:
        back.pop(keyword, None)
    for item in back.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    return back

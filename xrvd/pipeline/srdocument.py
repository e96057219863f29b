"""The report document around its measurement groups, as a template: highdicom builds one
report per model and settings, and every later report reuses its elements with the study's
own put in.

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

import highdicom as hd
import pydicom
from highdicom.sr.utils import collect_evidence
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

from .srencode import encode_item

CONTENT_SEQUENCE = Tag(0x0040, 0xA730)
TIMESTAMPS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")
# The root elements of one study's report: the template leaves them out and `fill` puts the
# study's own in (the patient and study attributes as highdicom copies them from the first
# image).
PER_STUDY = {Tag(keyword) for keyword in (
    "SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber", "StudyInstanceUID", *TIMESTAMPS,
    "CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence",
    "ContributingEquipmentSequence", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber")}


class DocumentTemplate:
    """A report made by highdicom, less its PER_STUDY elements, with its content tree encoded
    around its measurement groups (`groups`, encoded as srencode.GroupTemplates gives them,
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
             series_instance_uid: str, instance_number: int, equipment: Dataset) -> Dataset:
        """The report of `sources` holding the encoded `groups`. The template's elements are
        shared between reports, so elements are only ever replaced here, never changed."""
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
            sources, no_content, study_instance_uid=str(sources[0].StudyInstanceUID))
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


def placeholder_image(number: int, type2: tuple[str, ...]) -> Dataset:
    """A chest CR header to make and check templates with; the second one has more of what a
    study carries (patient, study, acquisition equipment)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = f"2.25.{number}1"
    ds.StudyInstanceUID = f"2.25.{number}2"
    ds.SeriesInstanceUID = f"2.25.{number}3"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 64
    for keyword in type2:
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

"""Write synthetic studies in the DICOM layouts of RSNA Pneumonia and SIIM-ACR Pneumothorax (DATASETS.md §3, §4).

Both Kaggle sets come from the same anonymiser (dcmtk UID root `1.2.276.0.7230010.3`), as 8-bit
MONOCHROME2 secondary captures. A few files per copy are MONOCHROME1 or 12-bit with a rescale and a window,
so the harness's reader is exercised on the variants other DICOM sources (VinDr, hospital exports) bring.
Every header value derives from the seed, never from the clock, so a seed gives byte-identical files.
"""
from __future__ import annotations

import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy import ndimage

from bench.data.finding_masks import write_sidecar
from bench.data.rle import rle_encode
from bench.data.synth.drawing import draw_frontal
from bench.data.synth.findings import Finding, Patient, sample_patient
from bench.data.synth.writers import _rng, _write_csv, hashed_split, intended_split

SIZE = 128  # both sets are square (1024 px); small here so a benchmark generates in seconds
UID_ROOT = "1.2.276.0.7230010.3.1"  # the anonymiser's root: .2 study, .3 series, .4 instance
STUDY_DATE = "19010101"  # an anonymised placeholder, never the clock
RSNA_OPACITIES = ("Pneumonia", "Consolidation", "COVID-19")  # what RSNA's readers boxed as "Lung Opacity"
SIIM_POSITIVE_SHARE = 0.28  # above the population's prevalence, as in SIIM (about 22% positive)
EIGHT_CONNECTED = np.ones((3, 3), bool)


def _monochrome1(i: int) -> bool:
    return i % 10 == 1


def _twelve_bit(i: int) -> bool:
    return i % 7 == 2


def write_dicom(path: Path, pixels: np.ndarray, *, patient_id: str, sop_uid: str, study_uid: str,
                series_uid: str, monochrome1: bool = False, bits_stored: int = 8, sex: str = "",
                age: int | None = None) -> None:
    """One uint8 drawing (bright = dense) as a single-frame grayscale DICOM.

    `monochrome1` stores inverted values (bright = air), as some detectors do. `bits_stored` above 8 stores
    uint16 values spread over that depth but clear of its ends, with a rescale to signed modality values and
    a window that maps exactly the drawn range to full contrast, as CR/DX exports do.
    """
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = STUDY_DATE
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.PatientSex = sex[:1]
    ds.PatientAge = "" if age is None else f"{age:03d}Y"
    if bits_stored == 8:
        stored = 255 - pixels if monochrome1 else pixels
        ds.set_pixel_data(stored.astype(np.uint8), "MONOCHROME1" if monochrome1 else "MONOCHROME2", 8,
                          generate_instance_uid=False)
    else:
        top = 2**bits_stored - 1
        offset, step = top // 8, (top - 2 * (top // 8)) // 255
        values = offset + pixels.astype(np.int64) * step
        stored = (top - values) if monochrome1 else values
        ds.set_pixel_data(stored.astype(np.uint16), "MONOCHROME1" if monochrome1 else "MONOCHROME2",
                          bits_stored, generate_instance_uid=False)
        intercept = -1024
        low = intercept + (top - offset - 255 * step if monochrome1 else offset)  # lowest modality value
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        # DICOM's linear window: full black at c - 0.5 - (w - 1) / 2, full white at c - 0.5 + (w - 1) / 2
        ds.WindowWidth = 255 * step + 1
        ds.WindowCenter = low + 255 * step / 2 + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class Case:
    """One synthetic radiograph with what its labels are cut from."""
    patient: Patient
    pixels: np.ndarray
    mask: np.ndarray  # RSNA: airspace opacity; SIIM: pneumothorax
    findings: dict  # finding name -> where it was drawn (the ground-truth sidecar)
    patient_id: str
    uids: tuple[str, str, str]  # study, series, instance


def _uids(rng: np.random.Generator, i: int) -> tuple[str, str, str]:
    """The anonymiser's pattern: <root>.<kind>.8323329.<counter>.<unix time>.<n>, with n one apart."""
    counter, when, n = 1000 + 7 * i + int(rng.integers(0, 7)), 1517874000 + int(rng.integers(0, 4000)), \
        int(rng.integers(100000, 999990))
    return tuple(f"{UID_ROOT}.{kind}.8323329.{counter}.{when}.{n + k}" for kind, k in ((2, 1), (3, 0), (4, 2)))


def _patient_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _draw(patient: Patient, rng: np.random.Generator, key: str, difficulty: str) -> tuple[np.ndarray, np.ndarray, dict]:
    annotations: dict = {}
    pixels = draw_frontal(patient, rng, SIZE, SIZE, annotations, difficulty)
    return pixels, annotations[key], annotations["findings"]


def rsna_case(seed: int, i: int, difficulty: str = "standard") -> Case:
    """The i-th RSNA patient: Target 1 exactly when an airspace opacity shows in the drawn pixels."""
    rng = _rng(seed, "rsna", i)
    patient_id = _patient_uuid(rng)
    while hashed_split("rsna", patient_id) != intended_split(i):
        patient_id = _patient_uuid(rng)
    uids = _uids(rng, i)
    patient = sample_patient(rng)
    pixels, mask, drawn = _draw(patient, rng, "opacity", difficulty)
    if not mask.any() and any(name in patient.findings for name in RSNA_OPACITIES):
        # too faint to show: redraw without it, so the label follows the pixels
        for name in RSNA_OPACITIES:
            patient.findings.pop(name, None)
        pixels, mask, drawn = _draw(patient, rng, "opacity", difficulty)
    return Case(patient, pixels, mask, drawn, patient_id, uids)


def boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of each 8-connected component, top-left origin, in label order."""
    labelled, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return [(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
            for s in ndimage.find_objects(labelled)]


def _rsna_item(args: tuple[Path, int, int, str]) -> list[list]:
    root, seed, i, difficulty = args
    case = rsna_case(seed, i, difficulty)
    study, series, sop = case.uids
    path = root / "stage_2_train_images" / f"{case.patient_id}.dcm"
    write_sidecar(path, case.findings)
    write_dicom(path, case.pixels, patient_id=case.patient_id,
                sop_uid=sop, study_uid=study, series_uid=series, monochrome1=_monochrome1(i),
                bits_stored=12 if _twelve_bit(i) else 8, sex=case.patient.sex, age=case.patient.age)
    found = boxes(case.mask)
    if not found:
        cls = "No Lung Opacity / Not Normal" if case.patient.findings else "Normal"
        return [[case.patient_id, "", "", "", "", 0, cls]]
    return [[case.patient_id, *(f"{v:.1f}" for v in box), 1, "Lung Opacity"] for box in found]


def write_rsna(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard") -> None:
    """stage_2_train_labels.csv (a row per box; blank boxes for Target 0), the row-aligned
    stage_2_detailed_class_info.csv and stage_2_train_images/<patientId>.dcm."""
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for item in pool.map(_rsna_item, [(root, seed, i, difficulty) for i in range(n)], chunksize=8)
                for row in item]
    _write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
               [row[:6] for row in rows])
    _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], [[row[0], row[6]] for row in rows])


def siim_case(seed: int, i: int, difficulty: str = "standard") -> Case:
    """The i-th SIIM image: positive exactly when a pneumothorax shows in the drawn pixels."""
    rng = _rng(seed, "siim", i)
    patient_id = _patient_uuid(rng)
    uids = _uids(rng, i)
    while hashed_split("siim", uids[2]) != intended_split(i):  # SIIM's split hashes the ImageId
        uids = _uids(rng, i)
    patient = sample_patient(rng)
    patient.findings.pop("Pneumothorax", None)
    if rng.random() < SIIM_POSITIVE_SHARE:
        side = str(rng.choice(["right", "left", "bilateral"], p=[0.45, 0.45, 0.1]))
        patient.findings["Pneumothorax"] = Finding("Pneumothorax", side, "upper", int(rng.integers(1, 4)))
    pixels, mask, drawn = _draw(patient, rng, "pneumothorax", difficulty)
    if "Pneumothorax" in patient.findings and not mask.any():
        del patient.findings["Pneumothorax"]
        pixels, mask, drawn = _draw(patient, rng, "pneumothorax", difficulty)
    return Case(patient, pixels, mask, drawn, patient_id, uids)


def _siim_item(args: tuple[Path, int, int, str]) -> list[list[str]]:
    root, seed, i, difficulty = args
    case = siim_case(seed, i, difficulty)
    study, series, sop = case.uids
    path = root / "dicom-images-train" / study / series / f"{sop}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sidecar(path, case.findings)
    write_dicom(path, case.pixels, patient_id=case.patient_id,
                sop_uid=sop, study_uid=study, series_uid=series, monochrome1=_monochrome1(i),
                bits_stored=12 if _twelve_bit(i) else 8, sex=case.patient.sex, age=case.patient.age)
    labelled, count = ndimage.label(case.mask, structure=EIGHT_CONNECTED)
    if not count:
        return [[sop, " -1"]]
    # the CSV's ", " separator leaves a space in front of every value, which readers must tolerate
    return [[sop, " " + rle_encode(labelled == k)] for k in range(1, count + 1)]


def write_siim(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard") -> None:
    """train-rle.csv (`ImageId, EncodedPixels`, a row per mask component, ` -1` for negatives) and
    dicom-images-train/<StudyUID>/<SeriesUID>/<ImageId>.dcm."""
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for item in pool.map(_siim_item, [(root, seed, i, difficulty) for i in range(n)], chunksize=8)
                for row in item]
    _write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)  # the space is in the real header

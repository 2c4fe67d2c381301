"""Write synthetic studies in the real on-disk layouts of MIMIC-CXR-JPG and CheXpert (DATASETS.md §1, §2)."""
from __future__ import annotations

import csv
import gzip
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.finding_masks import write_sidecar
from bench.data.synth.drawing import draw_frontal, draw_lateral
from bench.data.synth.findings import CHEXPERT_LABELS, Patient, sample_patient
from bench.data.synth.reports import mimic_report_file, write_report

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 116  # not square, so readers must resize and pad; above the models' 96
LATERAL_SHARE = 0.1
MIMIC_LABELS = sorted(CHEXPERT_LABELS)  # MIMIC's label CSVs list the observations alphabetically


def _rng(seed: int, tag: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, tag)) * 7919, index])


# The synthetic copies hold more test than training images: a test image costs encoding time only, and a large
# test split is what narrows every confidence interval (a 95% CI of about +-0.03 AUC needs a thousand or so).
TEST_SHARE, VAL_SHARE = 0.6, 0.1


def intended_split(index: int) -> str:
    """The split item `index` of a copy is written for: TEST_SHARE test, VAL_SHARE val, the rest train."""
    u = (index * 0.6180339887) % 1.0  # the golden-ratio sequence: every prefix of items keeps the shares
    return "test" if u < TEST_SHARE else "val" if u < TEST_SHARE + VAL_SHARE else "train"


def hashed_split(dataset: str, patient_id: str) -> str:
    """The split dataset `dataset`'s adapter puts `patient_id` in by its patient hash and default fractions
    (for copies whose real dataset has no official split: the writer draws ids until this agrees with
    `intended_split`, so the copy's standard split has the intended sizes)."""
    from bench.core.registry import DATASETS
    from bench.data.adapter import patient_fold

    defaults = DATASETS.get(dataset).defaults
    u = float(patient_fold([patient_id], dataset)[0])
    test, val = defaults["test_fraction"], defaults["val_fraction"]
    return "test" if u < test else "val" if u < test + val else "train"


def _fmt(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.1f}"


def _save_jpg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{rng.integers(0, 2**32):08x}" for _ in range(5))


def draw_with_truth(patient: Patient, rng: np.random.Generator, height: int, width: int, difficulty: str
                    ) -> tuple[np.ndarray, dict]:
    """A frontal view and its annotations (`findings`: what the ground-truth sidecar holds)."""
    annotations: dict = {}
    return draw_frontal(patient, rng, height, width, annotations, difficulty), annotations


def _mimic_study(args: tuple[Path, int, int, str]) -> dict:
    root, seed, i, difficulty = args
    rng = _rng(seed, "mimic", i)
    patient = sample_patient(rng)
    subject_id, study_id = 10000000 + 37 * i + int(rng.integers(0, 37)), 50000000 + 53 * i + int(rng.integers(0, 53))
    view = str(rng.choice(["PA", "AP"]))
    findings, impression = write_report(patient, rng)
    folder = root / "files" / f"p{str(subject_id)[:2]}" / f"p{subject_id}"
    pixels, drawn = draw_with_truth(patient, rng, IMAGE_HEIGHT, IMAGE_WIDTH, difficulty)
    images = [(_dicom_id(rng), view, pixels)]
    if rng.random() < LATERAL_SHARE:
        images.append((_dicom_id(rng), "LATERAL", draw_lateral(rng, IMAGE_HEIGHT, IMAGE_WIDTH)))
    for dicom_id, _, pixels in images:
        _save_jpg(folder / f"s{study_id}" / f"{dicom_id}.jpg", pixels)
    write_sidecar(folder / f"s{study_id}" / f"{images[0][0]}.jpg", drawn["findings"])
    (folder / f"s{study_id}.txt").write_text(mimic_report_file(findings, impression, rng, view))
    return {"subject_id": subject_id, "study_id": study_id, "images": [(d, v) for d, v, _ in images],
            "labels": patient.labels(), "date": f"21{rng.integers(10, 90):02d}{rng.integers(1, 13):02d}"
            f"{rng.integers(1, 29):02d}"}


def write_mimic_cxr_jpg(root: Path, n_studies: int, seed: int, workers: int, difficulty: str = "standard") -> None:
    """files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg, sSTUDY.txt reports, and the four CSVs (two gzipped)."""
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        studies = list(pool.map(_mimic_study, [(root, seed, i, difficulty) for i in range(n_studies)], chunksize=16))
    split_rng = _rng(seed, "mimic-split", 0)
    meta, labels, split = [], [], []
    for s in studies:
        u = split_rng.random()  # per patient (one study per synthetic patient): patient-disjoint
        part = "train" if u < 0.9 else "validate" if u < 0.94 else "test"
        for dicom_id, view in s["images"]:
            proc = "CHEST (PA AND LAT)" if view != "AP" else "CHEST (PORTABLE AP)"
            meaning = "lateral" if view == "LATERAL" else "postero-anterior" if view == "PA" else "antero-posterior"
            meta.append([dicom_id, s["subject_id"], s["study_id"], proc, view, IMAGE_HEIGHT, IMAGE_WIDTH,
                         s["date"], "120000.000", proc, meaning, "Erect"])
            split.append([dicom_id, s["study_id"], s["subject_id"], part])
        labels.append([s["subject_id"], s["study_id"], *[_fmt(s["labels"][n]) for n in MIMIC_LABELS]])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta, gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    for name in ("chexpert", "negbio"):
        _write_csv(root / f"mimic-cxr-2.0.0-{name}.csv", ["subject_id", "study_id", *MIMIC_LABELS], labels)


def _chexpert_patient(args: tuple[Path, str, int, int, int, str]) -> list[list]:
    root, part, seed, patient_no, first_number, difficulty = args
    rng = _rng(seed, f"chexpert-{part}", patient_no)
    rows = []
    for study in range(1, 1 + (1 if part != "train" else int(rng.integers(1, 3)))):
        patient = sample_patient(rng)
        labels = patient.labels(with_mentions=part == "train")
        rel = f"{part}/patient{first_number + patient_no:05d}/study{study}"
        pixels, drawn = draw_with_truth(patient, rng, IMAGE_HEIGHT, IMAGE_WIDTH, difficulty)
        views = [("frontal", pixels)]
        if rng.random() < LATERAL_SHARE:
            views.append(("lateral", draw_lateral(rng, IMAGE_HEIGHT, IMAGE_WIDTH)))
        for k, (kind, pixels) in enumerate(views, start=1):
            _save_jpg(root / rel / f"view{k}_{kind}.jpg", pixels)
            ap_pa = str(rng.choice(["AP", "PA"])) if kind == "frontal" else ""
            rows.append([f"{root.name}/{rel}/view{k}_{kind}.jpg", patient.sex, patient.age, kind.capitalize(), ap_pa,
                         *[_fmt(labels[n]) for n in CHEXPERT_LABELS]])
        write_sidecar(root / rel / "view1_frontal.jpg", drawn["findings"])
    return rows


def write_chexpert(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard",
                   test_studies: int | None = None) -> None:
    """`n` patients: `test_studies` of them (default TEST_SHARE of `n`) in the test set (its images and its
    study-level `test/groundtruth.csv`: a `Study` column, no file names), the others in train.csv, with
    root-prefixed `Path` and blank/-1.0 labels; and valid.csv, consensus 0/1 (200 patients, as the real
    one, fewer for a small train)."""
    root.mkdir(parents=True, exist_ok=True)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    test_studies = round(TEST_SHARE * n) if test_studies is None else test_studies
    train = n - test_studies
    parts = [("train", train, 1), ("valid", min(200, max(40, train // 3)), 64541), ("test", test_studies, 64741)]
    for part, count, first in parts:
        with ProcessPoolExecutor(workers) as pool:
            jobs = [(root, part, seed, i, first, difficulty) for i in range(count)]
            chunks = pool.map(_chexpert_patient, jobs, chunksize=16)
            rows = [row for chunk in chunks for row in chunk]
        if part != "test":
            _write_csv(root / f"{part}.csv", header, rows)
        elif rows:
            studies = [[row[0].rsplit("/", 1)[0].replace(root.name, "CheXpert-v1.0", 1), *row[5:]]
                       for row in rows if row[0].endswith("view1_frontal.jpg")]
            _write_csv(root / "test" / "groundtruth.csv", ["Study", *CHEXPERT_LABELS], studies)

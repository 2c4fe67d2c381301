"""Write a synthetic PadChest copy in its real layout (DATASETS.md §15): the labels CSV, gzipped as it is usually
shipped (an unnamed index first, the real column names, every id a long integer), and 12-bit pictures stored as
16-bit grayscale PNGs at `<ImageDir>/<ImageID>`.

A patient has one or two studies; a study has one frontal image (PA, AP or AP_horizontal) and sometimes a
lateral (`L`), which the adapter's frontal filter drops. Each study's findings and picture come from its own
seeded generator (as NIH's follow-ups do), so the files are byte-identical for a seed whatever the worker count.
`Labels` lists PadChest's English terms for what was drawn (`padchest_terms`), and `normal` for a study with
nothing abnormal, so the adapter's mapping gives the observations the CheXpert labeler reads from a report
stating those findings: the 0/1 form of `Patient.labels()`. `Report` is stemmed Spanish from a small phrase table
(no reader uses it). Patient ids are random, so the adapter's patient hash puts about 70% of the patients in
train, as its default fractions do on the real set: for a pretraining source the training split is what counts.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.finding_masks import write_sidecar
from bench.data.synth.drawing import draw_lateral
from bench.data.synth.findings import Finding, Patient, sample_patient
from bench.data.synth.writers import _rng, _write_csv, draw_with_truth

METADATA = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
SIZES = ((128, 128), (128, 116), (120, 128))  # the real images vary in size; readers resize and pad
SECOND_STUDY_SHARE, LATERAL_SHARE, PHYSICIAN_SHARE = 0.3, 0.3, 0.27
FRONTAL = ("PA", "AP", "AP_horizontal")
FRONTAL_SHARES = (0.7, 0.15, 0.15)
VIEW_POSITION = {"PA": "POSTEROANTERIOR", "AP": "ANTEROPOSTERIOR", "AP_horizontal": "ANTEROPOSTERIOR",
                 "L": "LATERAL"}
PATIENTS_PER_FOLDER = 100  # the real folders hold about 3,000 images each, 55 in all
MAX_FOLDERS = 55
HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
          "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
          "PhotometricInterpretation_DICOM", "BitsStored_DICOM", "Rows_DICOM", "Columns_DICOM", "ReportID", "Report",
          "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence"]
# the generator's findings outside the 14 observations, by PadChest's names for them; their reports would never
# say "opacity" except for infiltrates (Lung Opacity is derived from the terms below, as the labeler derives it)
OTHER_TERMS = {"Emphysema": ("emphysema",), "Hernia": ("hiatal hernia",), "Infiltration": ("infiltrates",),
               "Fibrosis": ("pulmonary fibrosis", "interstitial pattern"),
               "COVID-19": ("atypical pneumonia", "ground glass pattern")}
DEVICE_TERMS = {"endotracheal tube": "endotracheal tube", "nasogastric tube": "NSG tube",
                "central venous catheter": "central venous catheter via jugular vein"}
# stemmed Spanish, as PadChest's reports are written (" sin hallazg patolog edad pacient .")
SPANISH = {"Cardiomegaly": "cardiomegali", "Pleural Effusion": "derram pleural", "Consolidation": "consolid",
           "Pneumonia": "neumon", "Edema": "edem pulmonar", "Atelectasis": "atelectasi laminar",
           "Pneumothorax": "neumotorax", "Lung Lesion": "nodul pulmonar", "Enlarged Cardiomediastinum":
           "ensanch mediastin", "Support Devices": "sond", "Fracture": "fractur costal",
           "Pleural Other": "engros pleural", "Emphysema": "enfisem", "Fibrosis": "fibrosis pulmonar",
           "Hernia": "hern hiatal", "Infiltration": "infiltr", "COVID-19": "neumon atip bilateral"}
SPANISH_SIDE = {"right": "derech", "left": "izquierd", "bilateral": "bilateral"}
NORMAL_REPORT = "sin hallazg patolog edad pacient"
LOCATIONS = {"right": "loc right", "left": "loc left", "upper": "loc upper lobe", "mid": "loc middle lobe",
             "lower": "loc basal"}


def finding_terms(f: Finding) -> tuple[str, ...]:
    """PadChest's terms for one drawn finding (the finding's side, severity and device pick among synonyms)."""
    name = f.name
    if name in OTHER_TERMS:
        return OTHER_TERMS[name]
    if name == "Pneumonia":
        return "pneumonia", "alveolar pattern"  # the labeler reads the report's patchy opacities as Lung Opacity
    if name == "Atelectasis":
        return ("atelectasis basal" if f.side == "bilateral" else "laminar atelectasis",)
    if name == "Lung Lesion":
        return ("pulmonary mass" if f.severity == 3 else "nodule",)
    if name == "Edema":
        return ("heart insufficiency", "pulmonary edema") if f.severity == 3 else ("pulmonary edema",)
    if name == "Enlarged Cardiomediastinum":
        return ("superior mediastinal enlargement" if f.severity == 3 else "mediastinal enlargement",)
    if name == "Pleural Other":
        return ("apical pleural thickening" if f.zone == "upper" else "pleural thickening",)
    if name == "Support Devices":
        return (DEVICE_TERMS[f.device],)
    if name == "Fracture":
        return ("rib fracture",)
    return (name.lower(),)  # cardiomegaly, consolidation, pleural effusion, pneumothorax


def padchest_terms(patient: Patient) -> list[str]:
    """The `Labels` terms of a study of `patient`: `normal` where nothing but devices was drawn, then each
    finding's terms."""
    terms = ["normal"] if patient.labels()["No Finding"] == 1.0 else []
    for f in sorted(patient.findings.values(), key=lambda f: f.name):
        terms += [t for t in finding_terms(f) if t not in terms]
    return terms


def padchest_study(seed: int, index: int, study: int, difficulty: str = "standard"
                   ) -> tuple[Patient, np.ndarray, dict]:
    """The findings, the frontal picture and where each finding was drawn, of study `study` of patient `index`."""
    rng = _rng(seed, "padchest", 2 * index + study)
    height, width = SIZES[int(rng.integers(len(SIZES)))]
    patient = sample_patient(rng)
    pixels, annotations = draw_with_truth(patient, rng, height, width, difficulty)
    return patient, pixels, annotations["findings"]


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(int(rng.integers(1, 10))) + "".join(map(str, rng.integers(0, 10, n - 1)))


def _report(patient: Patient) -> str:
    phrases = [("probabl " if f.uncertain else "") + SPANISH[f.name] +
               ("" if f.side == "bilateral" else " " + SPANISH_SIDE[f.side])
               for f in sorted(patient.findings.values(), key=lambda f: f.name)]
    return " " + " . ".join(phrases or [NORMAL_REPORT]) + " ."


def _by_sentence(patient: Patient, terms: list[str]) -> tuple[str, str]:
    """(`Localizations`, `LabelsLocalizationsBySentence`): a sentence per finding, its terms then its places."""
    sentences = [["normal"]] if terms[:1] == ["normal"] else []
    for f in sorted(patient.findings.values(), key=lambda f: f.name):
        places = [] if f.side == "bilateral" else [LOCATIONS[f.side], LOCATIONS[f.zone]]
        sentences.append([*finding_terms(f), *places])
    places = [p for sentence in sentences for p in sentence if p.startswith("loc ")]
    return repr(list(dict.fromkeys(places))), repr(sentences)


def _save_png16(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint16) * 16).save(path)  # 12 bits stored (BitsStored_DICOM) in 16


def _padchest_patient(args: tuple[Path, int, int, int, str]) -> list[list]:
    root, seed, index, folders, difficulty = args
    rng = _rng(seed, "padchest-patient", index)
    patient_id, birth, sex = _digits(rng, 36), int(rng.integers(1920, 2000)), str(rng.choice(["M", "F"]))
    rows = []
    for study in range(1 + int(rng.random() < SECOND_STUDY_SHARE)):
        patient, pixels, drawn = padchest_study(seed, index, study, difficulty)
        study_id, terms = _digits(rng, 38), padchest_terms(patient)
        localizations, by_sentence = _by_sentence(patient, terms)
        method = "Physician" if rng.random() < PHYSICIAN_SHARE else "RNN_model"
        report_id = int(rng.integers(10**6, 10**7))
        date = f"20{int(rng.integers(9, 18)):02d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        views = [(str(rng.choice(FRONTAL, p=FRONTAL_SHARES)), pixels)]
        if rng.random() < LATERAL_SHARE:
            views.append(("L", draw_lateral(rng, *pixels.shape)))
        for projection, image in views:
            name = f"{study_id}_{int(rng.integers(100)):02d}-{int(rng.integers(1000)):03d}-" \
                   f"{int(rng.integers(1000)):03d}.png"
            folder = str(int(rng.integers(folders)))
            _save_png16(root / folder / name, image)
            if projection != "L":
                write_sidecar(root / folder / name, drawn)
            rows.append([name, folder, date, study_id, patient_id, f"{birth}.0", sex, VIEW_POSITION[projection],
                         projection, "Manual review of DICOM fields", "No", "CR", "MONOCHROME2", 12, *image.shape,
                         report_id, _report(patient), method, repr(terms), localizations,
                         by_sentence])
    return rows


def write_padchest(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard") -> None:
    """`n` patients: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz and the PNGs, spread over numbered
    folders `0`, `1`, ... (at least two)."""
    folders = min(MAX_FOLDERS, max(2, n // PATIENTS_PER_FOLDER))
    for folder in range(folders):
        (root / str(folder)).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(root, seed, i, folders, difficulty) for i in range(n)]
        rows = [row for part in pool.map(_padchest_patient, jobs, chunksize=8) for row in part]
    _write_csv(root / METADATA, HEADER, [[i, *row] for i, row in enumerate(rows)], gz=True)

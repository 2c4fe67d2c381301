"""Write synthetic COVIDx and NIH ChestX-ray14 copies in their real on-disk layouts (DATASETS.md §5, §6, §13).

Every image is drawn from its own seeded generator, so the files are byte-identical for a seed whatever
the worker count. `covidx_image` and `nih_image` are what the writers draw; tests call them to check that
the files on disk hold exactly those pictures and labels.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from itertools import accumulate
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.finding_masks import write_sidecar
from bench.data.synth.drawing import draw_frontal
from bench.data.synth.findings import COVIDX_CLASSES, Patient, sample_covidx_patient, sample_patient
from bench.data.synth.writers import TEST_SHARE, _rng, intended_split

# COVIDx pools many sources, so its images come in several sizes
COVIDX_SIZES = ((128, 116), (116, 116), (132, 112), (112, 128))
# (split -> label file) for the two class vocabularies COVIDx has shipped
COVIDX_FILES = {
    "3-class": {"train": "train_COVIDx9A.txt", "test": "test_COVIDx9A.txt"},
    "binary": {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
}
# classes drawn in turn; the binary cycle has as many COVID-19 as other patients, like CXR-4
COVIDX_CYCLES = {"3-class": COVIDX_CLASSES, "binary": ["COVID-19", "normal", "COVID-19", "pneumonia"]}
# sources that contributed each class (COVID-19 came from the COVID collections, the rest mostly from RSNA)
COVIDX_SOURCES = {"normal": ("rsna", "actmed"), "pneumonia": ("rsna", "cohen"),
                  "COVID-19": ("ricord", "bimcv", "sirm", "cohen", "actmed")}
TWO_IMAGE_SHARE = 0.25

NIH_SIZE = 128
NIH_FOLDER_CAP = 300  # the real download puts 10,000 images in each images_NNN/ folder
NIH_SPACINGS = (0.143, 0.168, 0.139)


def covidx_class(index: int, vocabulary: str) -> str:
    cycle = COVIDX_CYCLES[vocabulary]
    return cycle[index % len(cycle)]


def covidx_split(index: int, vocabulary: str) -> str:
    """The file patient `index` is listed in. The split follows the golden-ratio sequence, which is
    independent of the class cycles, so every split gets every class; the 3-class files have no val."""
    split = intended_split(index)
    return "train" if split == "val" and vocabulary == "3-class" else split


def covidx_image(seed: int, index: int, image: int, cls: str, difficulty: str = "standard"
                 ) -> tuple[np.ndarray, dict]:
    """Image `image` of COVIDx patient `index`, drawn for class `cls`, and where its findings were drawn."""
    rng = _rng(seed, "covidx", 4 * index + image)
    height, width = COVIDX_SIZES[int(rng.integers(len(COVIDX_SIZES)))]
    annotations: dict = {}
    pixels = draw_frontal(sample_covidx_patient(rng, cls), rng, height, width, annotations, difficulty)
    return pixels, annotations["findings"]


def _covidx_names(rng: np.random.Generator, index: int, source: str, count: int) -> tuple[str, list[str]]:
    """A patient id and file names in the style of each source (mixed .png/.jpg/.jpeg, as in COVIDx)."""
    if source == "ricord":
        pid = f"{419000 + index}-{int(rng.integers(1, 10**6)):06d}"
        study = int(rng.integers(10**4, 10**5))
        return pid, [f"MIDRC-RICORD-1C-{pid}-{study}-{k}.png" for k in range(count)]
    if source == "rsna":
        pid = "-".join(f"{int(rng.integers(16**d)):0{d}x}" for d in (8, 4, 4, 4, 12))
        return pid, [f"{pid}.png"]
    if source == "bimcv":
        pid, session = f"sub-S{3000 + index:05d}", int(rng.integers(10**5))
        return pid, [f"{pid}_ses-E{session:05d}_run-{k + 1}_bp-chest_vp-ap_cr.png" for k in range(count)]
    if source == "sirm":
        pid = f"SIRM-{index}"
        return pid, [f"COVID-19({2 * index + k}).jpg" for k in range(count)]
    if source == "cohen":
        pid = str(index + 1)
        return pid, [f"{int(rng.integers(16**12)):012x}-{k}.jpeg" for k in range(count)]
    pid = f"COVID-{index:05d}"  # actmed
    return pid, [f"{pid}{'-' + str(k) if k else ''}.jpg" for k in range(count)]


def _covidx_patient(args: tuple[Path, int, int, str, str]) -> tuple[str, list[str]]:
    root, seed, index, vocabulary, difficulty = args
    rng = _rng(seed, "covidx-patient", index)
    cls = covidx_class(index, vocabulary)
    sources = COVIDX_SOURCES[cls]
    source = sources[(index // len(COVIDX_CYCLES[vocabulary])) % len(sources)]
    count = 1 if source == "rsna" or rng.random() >= TWO_IMAGE_SHARE else 2  # one RSNA image per patient
    pid, names = _covidx_names(rng, index, source, count)
    split = covidx_split(index, vocabulary)
    label = cls if vocabulary == "3-class" else "positive" if cls == "COVID-19" else "negative"
    for image, name in enumerate(names):
        pixels, drawn = covidx_image(seed, index, image, cls, difficulty)
        path = root / split / name
        write_sidecar(path, drawn)
        if name.endswith(".png"):
            Image.fromarray(pixels).save(path)
        else:  # the web-scraped JPEGs are often RGB
            Image.fromarray(pixels).convert("RGB").save(path, quality=92)
    return split, [f"{pid} {name} {label} {source}" for name in names]


def write_covidx(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard",
                 vocabulary: str = "3-class") -> None:
    """`n` patients (a quarter of them with two images) in COVIDx's headerless space-separated label files.

    `3-class` writes the V9A pair `train_COVIDx9A.txt`/`test_COVIDx9A.txt` (normal/pneumonia/COVID-19);
    `binary` writes CXR-4's `train.txt`/`val.txt`/`test.txt` (positive/negative). Each patient is in one file.
    """
    if vocabulary not in COVIDX_FILES:
        raise ValueError(f"unknown COVIDx vocabulary {vocabulary!r}; valid: {', '.join(COVIDX_FILES)}")
    files = COVIDX_FILES[vocabulary]
    for split in files:
        (root / split).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(root, seed, i, vocabulary, difficulty) for i in range(n)]
        patients = list(pool.map(_covidx_patient, jobs, chunksize=8))
    for split, file in files.items():
        lines = [line for part, rows in patients if part == split for line in rows]
        (root / file).write_text("".join(f"{line}\n" for line in lines))


def nih_followups(seed: int, index: int) -> int:
    return int(_rng(seed, "nih-patient", index).integers(1, 4))


def nih_name(index: int, followup: int) -> str:
    return f"{index + 1:08d}_{followup:03d}.png"


def nih_image(seed: int, index: int, followup: int, difficulty: str = "standard") -> tuple[Patient, np.ndarray, dict]:
    """The findings, the picture and where each finding was drawn, of follow-up `followup` of NIH patient `index`."""
    rng = _rng(seed, "nih", 4 * index + followup)
    patient = sample_patient(rng)
    annotations: dict = {}
    pixels = draw_frontal(patient, rng, NIH_SIZE, NIH_SIZE, annotations, difficulty)
    return patient, pixels, annotations["findings"]


def _save_nih_png(path: Path, pixels: np.ndarray, index: int, followup: int) -> None:
    if (index, followup) == (1, 0):  # one 12-bit detector image stored as 16-bit
        Image.fromarray(pixels.astype(np.uint16) * 16).save(path)
    elif followup == 0 and index % 20 == 2:  # a few opaque RGBA PNGs, as in the real download
        Image.fromarray(pixels).convert("RGBA").save(path)
    else:
        Image.fromarray(pixels).save(path)


def _nih_patient(args: tuple[Path, int, int, list[str], str]) -> list[str]:
    root, seed, index, folders, difficulty = args
    rng = _rng(seed, "nih-demographics", index)
    sex, age = str(rng.choice(["M", "F"])), int(rng.integers(1, 95))
    rows = []
    for followup, folder in enumerate(folders):
        patient, pixels, drawn = nih_image(seed, index, followup, difficulty)
        name = nih_name(index, followup)
        _save_nih_png(root / folder / "images" / name, pixels, index, followup)
        write_sidecar(root / folder / "images" / name, drawn)
        labels = "|".join(sorted(patient.nih_labels())) or "No Finding"  # the real file sorts them by name
        view = str(rng.choice(["PA", "AP"], p=[0.6, 0.4]))
        width, height = (int(v) for v in rng.integers(2000, 3056, 2))
        spacing = NIH_SPACINGS[int(rng.integers(len(NIH_SPACINGS)))]
        rows.append(f"{name},{labels},{followup},{index + 1},{age},{sex},{view},{width},{height},"
                    f"{spacing},{spacing},")
    return rows


def write_nih(root: Path, n: int, seed: int, workers: int, difficulty: str = "standard") -> None:
    """`n` patients with 1 to 3 follow-ups each: `Data_Entry_2017.csv` (bracketed header names holding
    commas, a trailing comma on every line), PNGs filling `images_001/images/`, `images_002/images/`, ...
    in order (at least two folders), and the patient-disjoint `train_val_list.txt`/`test_list.txt`."""
    counts = [nih_followups(seed, i) for i in range(n)]
    total = sum(counts)
    per_folder = min(NIH_FOLDER_CAP, max(1, -(-total // 2)))
    starts = [0, *accumulate(counts)]
    folders = [[f"images_{(starts[i] + k) // per_folder + 1:03d}" for k in range(counts[i])] for i in range(n)]
    for folder in sorted({f for fs in folders for f in fs}):
        (root / folder / "images").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(root, seed, i, folders[i], difficulty) for i in range(n)]
        rows = [r for part in pool.map(_nih_patient, jobs, chunksize=8)
                for r in part]
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    (root / "Data_Entry_2017.csv").write_text("".join(f"{line}\n" for line in [header, *rows]))
    order = _rng(seed, "nih-lists", 0).permutation(n)
    test = set(order[:min(n - 1, max(1, round(TEST_SHARE * n)))].tolist())  # the real list: 23% of images
    lists: dict[str, list[str]] = {"train_val_list.txt": [], "test_list.txt": []}
    for i, count in enumerate(counts):
        lists["test_list.txt" if i in test else "train_val_list.txt"] += [nih_name(i, k) for k in range(count)]
    for file, names in lists.items():
        (root / file).write_text("".join(f"{name}\n" for name in sorted(names)))

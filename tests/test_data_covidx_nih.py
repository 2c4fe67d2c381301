"""COVIDx and NIH ChestX-ray14: the synthetic copies keep the real formats' quirks, and the adapters read
them (and reject broken copies with one line naming the file and line)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests_support import tree_digest as _digest

from bench.core.errors import UserError
from bench.data.images import read_image
from bench.data.synth.png_writers import (covidx_class, covidx_image, covidx_split, nih_image, nih_name, write_covidx,
                                         write_nih)
from bench.datasets.covidx import Covidx
from bench.datasets.nih import LABELS as NIH_LABELS
from bench.datasets.nih import Nih
from bench.evaluation.prompt_sets import get_prompt_set

SEED = 3
N_COVIDX, N_NIH = 45, 40
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


@pytest.fixture(scope="module")
def covidx3(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("covidx") / "COVIDx"
    write_covidx(root, N_COVIDX, SEED, 2)
    return root


@pytest.fixture(scope="module")
def covidx2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("covidx-cxr4") / "COVIDx-CXR4"
    write_covidx(root, N_COVIDX, SEED, 2, vocabulary="binary")
    return root


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih") / "ChestX-ray14"
    write_nih(root, N_NIH, SEED, 2)
    return root



def _labels(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep=" ", header=None, names=["patient_id", "filename", "class", "data_source"],
                       dtype=str)


def _copy(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# --- COVIDx ---------------------------------------------------------------------------------------

def test_covidx_label_files_are_headerless_space_separated_and_patient_disjoint(covidx3):
    assert sorted(p.name for p in covidx3.iterdir()) == ["test", "test_COVIDx9A.txt", "train", "train_COVIDx9A.txt"]
    lines = (covidx3 / "train_COVIDx9A.txt").read_text().splitlines()
    assert all(len(line.split(" ")) == 4 for line in lines)
    assert lines[0].split(" ")[2] in {"normal", "pneumonia", "COVID-19"}  # no header line
    train, test = _labels(covidx3 / "train_COVIDx9A.txt"), _labels(covidx3 / "test_COVIDx9A.txt")
    assert not set(train["patient_id"]) & set(test["patient_id"])
    both = pd.concat([train, test])
    assert {"cohen", "ricord", "rsna", "bimcv", "sirm", "actmed"} == set(both["data_source"])
    assert {Path(f).suffix for f in both["filename"]} == {".png", ".jpg", ".jpeg"}
    assert (both.groupby("patient_id").size() == 2).any()
    assert set(test["class"]) == {"normal", "pneumonia", "COVID-19"}
    assert all((covidx3 / "train" / f).is_file() for f in train["filename"])
    assert all((covidx3 / "test" / f).is_file() for f in test["filename"])
    sizes = {Image.open(covidx3 / "train" / f).size for f in train["filename"]}
    assert len(sizes) > 1


def test_covidx_binary_layout_has_three_files_and_both_classes_in_each(covidx2):
    for split in ("train", "val", "test"):
        df = _labels(covidx2 / f"{split}.txt")
        assert set(df["class"]) == {"positive", "negative"}
        assert all((covidx2 / split / f).is_file() for f in df["filename"])
    assert not list(covidx2.glob("*COVIDx*"))


def test_covidx_three_class_manifest(covidx3):
    adapter = Covidx(covidx3)
    task = adapter.task
    assert (task.labels, task.multilabel, task.metric, task.kind) == (["normal", "pneumonia", "COVID-19"], False,
                                                                       "acc", "multi-class")
    assert set(get_prompt_set("chexzero").for_task("covidx", task.labels)) == set(task.labels)
    manifest = adapter.read()
    train, test = _labels(covidx3 / "train_COVIDx9A.txt"), _labels(covidx3 / "test_COVIDx9A.txt")
    assert len(manifest) == len(train) + len(test)  # the first line of each file is an image, not a header
    assert list(manifest.columns) == ["sample_id", "patient_id", "image_path", "split", *task.labels]
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert sorted(manifest.loc[manifest["split"] == "test", "sample_id"]) == sorted("test/" + test["filename"])
    onehot = manifest[task.labels].to_numpy()
    assert set(np.unique(onehot)) == {0.0, 1.0} and (onehot.sum(axis=1) == 1).all()
    by_file = pd.concat([train, test]).set_index("filename")["class"]
    drawn = manifest["sample_id"].str.split("/").str[1].map(by_file)
    assert (np.array(task.labels)[onehot.argmax(axis=1)] == drawn.to_numpy()).all()
    assert manifest["image_path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    val_share = (manifest["split"] == "val").sum() / (manifest["split"] != "test").sum()
    assert 0.05 < val_share < 0.45  # MGCA's 80/20 carve-out of the official train


def test_covidx_binary_manifest(covidx2):
    adapter = Covidx(covidx2)
    assert (adapter.task.labels, adapter.task.kind, adapter.task.metric) == (["COVID-19"], "binary", "auc")
    assert get_prompt_set("chexzero").for_task("covidx", adapter.task.labels)["COVID-19"].negative
    manifest = adapter.read()
    for split in ("train", "val", "test"):
        df = _labels(covidx2 / f"{split}.txt")
        part = manifest[manifest["split"] == split].set_index("sample_id")
        assert len(part) == len(df)
        expected = (df["class"] == "positive").astype(float).to_numpy()
        assert (part.loc[f"{split}/" + df["filename"], "COVID-19"].to_numpy() == expected).all()


def test_covidx_images_are_the_drawn_class(covidx3):
    train = _labels(covidx3 / "train_COVIDx9A.txt")
    checked = 0
    # the writer lists patients in index order; covidx_split says which go to the test file
    train_indices = [i for i in range(N_COVIDX) if covidx_split(i, "3-class") == "train"]
    for index, (pid, group) in zip(train_indices, train.groupby("patient_id", sort=False)):
        assert set(group["class"]) == {covidx_class(index, "3-class")}
        for image, name in enumerate(group["filename"]):
            decoded = read_image(covidx3 / "train" / name)
            drawn, _ = covidx_image(SEED, index, image, covidx_class(index, "3-class"))
            assert decoded.shape == drawn.shape and decoded.dtype == np.uint8
            if name.endswith(".png"):
                assert np.array_equal(decoded, drawn)
            else:
                assert np.abs(decoded.astype(int) - drawn).mean() < 3  # JPEG, stored as RGB
            checked += 1
    assert checked == len(train)


def test_writers_are_deterministic_by_seed_and_not_by_workers(tmp_path, covidx3, nih):
    write_covidx(tmp_path / "c", N_COVIDX, SEED, 1)
    assert _digest(tmp_path / "c") == _digest(covidx3)
    write_nih(tmp_path / "n", N_NIH, SEED, 1)
    assert _digest(tmp_path / "n") == _digest(nih)
    write_covidx(tmp_path / "other", N_COVIDX, SEED + 1, 2)
    assert _digest(tmp_path / "other") != _digest(covidx3)


def test_covidx_label_file_discovery(covidx3, tmp_path):
    (covidx3 / "train_COVIDx8A.txt").write_text("")
    try:
        with pytest.raises(UserError, match="train_COVIDx8A.txt, train_COVIDx9A.txt"):
            Covidx(covidx3).read()
        files = {"train": "train_COVIDx9A.txt", "test": "test_COVIDx9A.txt"}
        assert len(Covidx(covidx3, {"label_files": files}).read()) > 0
    finally:
        (covidx3 / "train_COVIDx8A.txt").unlink()
    with pytest.raises(UserError, match="no train.txt|train_COVIDx"):
        Covidx(tmp_path).read()
    with pytest.raises(UserError, match="does not exist"):
        Covidx(tmp_path / "absent")
    copy = _copy(covidx3, tmp_path / "no-test", ["train_COVIDx9A.txt"])
    with pytest.raises(UserError, match="test_COVIDx9A.txt does not exist"):
        Covidx(copy).read()


@pytest.mark.parametrize("line, message", [
    ("p1 a.png COVID-19 ricord extra", r"line 3: expected 4 space-separated fields .* found 5"),
    ("p1 a.png COVID-19", r"line 3: expected 4 .* found 3"),
    ("p1 a.png covid ricord", r"line 3: unknown class 'covid'; expected one of normal, pneumonia, COVID-19"),
    ("p1 a.png positive ricord", r"line 3: unknown class 'positive'"),
])
def test_covidx_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "train_COVIDx9A.txt").write_text(f"p0 x.png normal rsna\n\n{line}\n")
    (tmp_path / "test_COVIDx9A.txt").write_text("p9 y.png pneumonia rsna\n")
    with pytest.raises(UserError, match=rf"train_COVIDx9A.txt: {message}"):
        Covidx(tmp_path).read()


def test_covidx_repairs_a_patient_of_two_files_by_default_and_rejects_conflicting_lines(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("p1 a.png positive ricord\np1 a.png positive ricord\np2 b.png negative rsna\n")
    (tmp_path / "test.txt").write_text("p1 c.png positive ricord\n")
    adapter = Covidx(tmp_path)
    manifest = adapter.patient_disjoint(adapter.read())  # the check loading applies; COVIDx repairs by default
    assert dict(zip(manifest["sample_id"], manifest["split"])) == {"train/a.png": "test", "train/b.png": "train",
                                                                   "test/c.png": "test"}  # a tie goes to test
    assert "moved 1 image(s) of 1 patient(s) found in several splits" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"covidx \(.*\): 1 patient\(s\) have images in more than one split \(e.g. "
                                        r"patient ricord:p1: 1 in train, 1 in test image\(s\)\).*patient_overlap=repair"):
        Covidx(tmp_path, {"patient_overlap": "refuse"}).patient_disjoint(adapter.read())
    (tmp_path / "test.txt").write_text("p3 c.png positive ricord\np3 c.png negative ricord\n")
    with pytest.raises(UserError, match=r"test.txt: lines 1 and 2: file 'c.png'"):
        Covidx(tmp_path).read()
    (tmp_path / "test.txt").write_text("p3 c.png positive ricord\n")
    manifest = Covidx(tmp_path).read()
    assert sorted(manifest["sample_id"]) == ["test/c.png", "train/a.png", "train/b.png"]  # repeated line kept once
    assert Covidx(tmp_path).task.kind == "binary"


# --- NIH ChestX-ray14 ------------------------------------------------------------------------------

def test_nih_metadata_quirks(nih):
    text = (nih / "Data_Entry_2017.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == NIH_HEADER
    assert all(line.endswith(",") and line.count(",") == 11 for line in lines)
    df = pd.read_csv(nih / "Data_Entry_2017.csv")
    assert list(df.columns[7:]) == ["OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
                                    "Unnamed: 11"]
    assert df["Unnamed: 11"].isna().all()
    assert df["Image Index"].str.match(r"^\d{8}_\d{3}\.png$").all()
    assert (df["Image Index"].str[:8].astype(int) == df["Patient ID"]).all()
    assert (df["Image Index"].str[9:12].astype(int) == df["Follow-up #"]).all()
    assert set(df["Follow-up #"]) == {0, 1, 2}
    assert (df["Finding Labels"] == "No Finding").any() and df["Finding Labels"].str.contains(r"\|").any()
    names = {n for labels in df["Finding Labels"] for n in labels.split("|")}
    assert names <= {*NIH_LABELS, "No Finding"}


def test_nih_folders_lists_and_pixel_formats(nih):
    folders = sorted(p.parent.name for p in nih.glob("images_*/images"))
    assert len(folders) >= 2 and folders[:2] == ["images_001", "images_002"]
    in_order = [p.name for f in folders for p in sorted((nih / f / "images").glob("*.png"))]
    assert in_order == sorted(in_order)  # folders fill up one after another
    train_val = (nih / "train_val_list.txt").read_text().split()
    test = (nih / "test_list.txt").read_text().split()
    assert sorted(train_val + test) == in_order and 0.4 < len(test) / len(in_order) < 0.8  # TEST_SHARE of patients
    assert not {n[:8] for n in train_val} & {n[:8] for n in test}
    modes = {Image.open(p).mode for p in nih.glob("images_*/images/*.png")}
    assert modes == {"L", "RGBA", "I;16"}


def test_nih_manifest_labels_and_images_are_what_was_drawn(nih):
    adapter = Nih(nih)
    task = adapter.task
    assert (task.labels, task.kind, task.metric) == (NIH_LABELS, "multi-label", "auc")
    prompts = get_prompt_set("chexzero").for_task("nih", task.labels)
    assert prompts["Pleural_Thickening"].positive == ("pleural thickening",)
    assert prompts["Effusion"].negative == ("no pleural effusion",)
    manifest = adapter.read()
    assert list(manifest.columns[:4]) == ["sample_id", "patient_id", "image_path", "split"]
    assert set(manifest["sex"]) == {"M", "F"}
    test = set((nih / "test_list.txt").read_text().split())
    assert set(manifest.loc[manifest["split"] == "test", "sample_id"]) == test
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    for row in manifest.itertuples(index=False):
        index, followup = int(row.patient_id) - 1, int(row.sample_id[9:12])
        assert row.sample_id == nih_name(index, followup)
        patient, drawn, _ = nih_image(SEED, index, followup)
        expected = [1.0 if label in patient.nih_labels() else 0.0 for label in NIH_LABELS]
        assert list(manifest.loc[manifest["sample_id"] == row.sample_id, NIH_LABELS].iloc[0]) == expected
        decoded = read_image(row.image_path)
        if Image.open(row.image_path).mode == "I;16":  # contrast-stretched on reading: compare the shape of it
            assert np.corrcoef(decoded.ravel(), drawn.ravel())[0, 1] > 0.999
        else:
            assert np.array_equal(decoded, drawn)
    assert manifest[NIH_LABELS].to_numpy().sum() > 0


def test_nih_without_official_lists_uses_a_patient_hash_split(nih, tmp_path):
    root = _copy(nih, tmp_path / "nih", ["Data_Entry_2017.csv"])
    manifest = Nih(root, {"val_fraction": 0.2, "test_fraction": 0.3}).read()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    # no images under this root: every path falls back to images/<name>
    assert (manifest["image_path"] == [str(root / "images" / n) for n in manifest["sample_id"]]).all()


def _nih_root(tmp_path: Path, header: str, rows: list[str], name: str = "Data_Entry_2017.csv") -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / name).write_text("".join(f"{line}\n" for line in [header, *rows]))
    return tmp_path


def test_nih_reads_the_real_row_format_and_the_v2020_header(tmp_path):
    rows = ["00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2894,2729,0.143,0.143,",
            "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,",
            "00000003_001.png,Effusion|Pleural_Thickening|Hernia,1,3,74,F,AP,2500,2048,0.168,0.168,"]
    root = _nih_root(tmp_path / "a", NIH_HEADER, rows)
    (root / "images_002" / "images").mkdir(parents=True)
    (root / "images_002" / "images" / "00000002_000.png").write_bytes(b"")
    manifest = Nih(root).read().set_index("sample_id")
    positive = {name: [c for c in NIH_LABELS if row[c] == 1.0] for name, row in manifest.iterrows()}
    assert positive == {"00000001_000.png": ["Cardiomegaly", "Emphysema"], "00000002_000.png": [],
                        "00000003_001.png": ["Effusion", "Pleural_Thickening", "Hernia"]}
    assert manifest.loc["00000002_000.png", "image_path"] == str(root / "images_002" / "images" / "00000002_000.png")
    assert manifest.loc["00000001_000.png", "image_path"] == str(root / "images" / "00000001_000.png")
    # v2020: `Patient Sex`, no trailing commas; it is preferred over the original file
    v2020 = NIH_HEADER.rstrip(",").replace("Patient Gender", "Patient Sex")
    _nih_root(root, v2020, [rows[0].rstrip(",")], "Data_Entry_2017_v2020.csv")
    manifest = Nih(root).read()
    assert list(manifest["sample_id"]) == ["00000001_000.png"] and list(manifest["sex"]) == ["M"]
    assert len(Nih(root, {"metadata": "Data_Entry_2017.csv"}).read()) == 3


@pytest.mark.parametrize("header, row, message", [
    (NIH_HEADER.replace("Finding Labels", "Findings"), "00000001_001.png,Mass,1,1,58,M,PA,1,1,0.1,0.1,",
     r"missing column\(s\) 'Finding Labels'"),
    (NIH_HEADER, "00000001_001.png,Mass|Pleural Thickening,1,1,58,M,PA,1,1,0.1,0.1,",
     r"line 3: unknown finding 'Pleural Thickening'"),
    (NIH_HEADER, "00000001_001.png,,1,1,58,M,PA,1,1,0.1,0.1,", r"line 3: 'Finding Labels' is empty"),
    (NIH_HEADER, "00000001_001.png,Mass,1,,58,M,PA,1,1,0.1,0.1,", r"line 3: 'Patient ID' is empty"),
    (NIH_HEADER, "00000001_000.png,Mass,0,1,58,M,PA,1,1,0.1,0.1,", r"line 3: image '00000001_000.png' is listed twice"),
])
def test_nih_bad_metadata_names_file_and_line(tmp_path, header, row, message):
    first = "00000001_000.png,No Finding,0,1,58,M,PA,2894,2729,0.143,0.143,"
    root = _nih_root(tmp_path, header, [first, row])
    with pytest.raises(UserError, match=rf"Data_Entry_2017.csv: {message}"):
        Nih(root).read()


def test_nih_missing_metadata_and_a_test_list_that_splits_a_patient(tmp_path):
    with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv, Data_Entry_2017.csv"):
        Nih(tmp_path).read()
    rows = [f"0000000{p}_00{k}.png,No Finding,{k},{p},50,F,PA,1,1,0.1,0.1," for p in (1, 2) for k in (0, 1)]
    root = _nih_root(tmp_path, NIH_HEADER, rows)
    (root / "test_list.txt").write_text("00000002_000.png\n")
    split = Nih(root).read()  # the patient check every adapter shares refuses it when the dataset is loaded
    with pytest.raises(UserError, match=r"nih \(.*\): 1 patient\(s\) have images in more than one split \(e.g. "
                                        r"patient 2: 1 in (train|val), 1 in test image\(s\)\); splits must be "
                                        r"patient-disjoint: fix the split files, or set data.nih.patient_overlap=repair"):
        Nih(root).patient_disjoint(split)
    repaired = Nih(root, {"patient_overlap": "repair"}).patient_disjoint(split)
    assert list(repaired["split"][2:]) == ["test", "test"]  # a tie: test
    (root / "test_list.txt").write_text("00000002_000.png 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n00000002_001.png\n")
    assert list(Nih(root).read()["split"][2:]) == ["test", "test"]

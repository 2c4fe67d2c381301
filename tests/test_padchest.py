"""PadChest: the synthetic copy keeps the real format and reads back with the labels of what was drawn; the
adapter maps the English findings as documented, drops other views, skips or refuses malformed label lists,
splits by patient and names the file, line and column of what it cannot read."""
import csv
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests_support import tree_digest

from bench.core.errors import UserError
from bench.data.adapter import MANIFEST_COLUMNS, patients_in_several_splits
from bench.data.finding_masks import read_sidecar
from bench.data.synth.findings import sample_patient
from bench.data.synth.padchest_writer import METADATA, padchest_study, padchest_terms, write_padchest
from bench.datasets.padchest import LABELS, OBSERVATION_TERMS, PadChest, listed_terms, observations
from bench.modeling.label_prompts import label_prompt

SEED, N = 3, 30
CSV_NAME = METADATA.removesuffix(".gz")
COLUMNS = ["", "ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels", "Report"]
PATIENT = "839860488694292331637988235681460987"  # longer than 64 bits hold: must come back as written
TEMPLATES = {"positive": "There is {finding}.", "uncertain": "There may be {finding}.", "negative": "No {finding}.",
             "normal": "No acute cardiopulmonary abnormality."}


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("padchest") / "PadChest"
    write_padchest(root, N, SEED, 2)
    return root


def _truth(patient) -> dict[str, float]:
    """The 0/1 observations of what was drawn, as a labeler reads a report stating it."""
    return {name: float(v in (1.0, -1.0)) for name, v in patient.labels().items()}


def _plant(root: Path, rows: list[list], gz: bool = False, columns: list[str] = COLUMNS, folders=("0",)) -> Path:
    """A PadChest root: the CSV with `rows` (ImageID, ImageDir, StudyID, PatientID, Projection, Labels, Report;
    the index is added) and empty image folders."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (root / folder).mkdir(exist_ok=True)
    path = root / (CSV_NAME + (".gz" if gz else ""))
    with (gzip.open if gz else open)(path, "wt", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([[i, *row] for i, row in enumerate(rows)])
    return path


def _row(image: str, labels: str, patient: str = PATIENT, projection: str = "PA", folder: str = "0") -> list:
    return [image, folder, f"{patient}1", patient, projection, labels, " sin hallazg patolog ."]


def test_the_copy_reads_back_with_the_labels_of_what_was_drawn(copy):
    raw = pd.read_csv(copy / METADATA, dtype=str)
    assert raw.columns[0] == "Unnamed: 0" and {"ImageID", "ImageDir", "PatientID", "Labels", "Report"} <= set(raw)
    assert set(raw["Projection"]) <= {"PA", "AP", "AP_horizontal", "L"} and (raw["Projection"] == "L").any()
    assert raw["PatientID"].str.len().min() >= 30  # ids far beyond int64, as in the real file
    manifest = PadChest(copy).read()
    assert list(manifest.columns[:4]) == MANIFEST_COLUMNS and set(LABELS) <= set(manifest.columns)
    assert len(manifest) == (raw["Projection"] != "L").sum() and "report" not in manifest  # laterals dropped
    assert {"train", "test"} <= set(manifest["split"]) and patients_in_several_splits(manifest) == []
    # patients in file order, studies in order within each: the writer's (index, study) of every row
    order = {p: i for i, p in enumerate(dict.fromkeys(raw["PatientID"]))}
    studies = {s: k for p, group in raw.groupby("PatientID", sort=False)
               for k, s in enumerate(dict.fromkeys(group["StudyID"]))}
    rows = raw.set_index("ImageID")
    for row in manifest.to_dict("records"):
        written = rows.loc[row["sample_id"]]
        patient, pixels, drawn = padchest_study(SEED, order[row["patient_id"]], studies[written["StudyID"]])
        assert {c: row[c] for c in LABELS} == _truth(patient)
        assert row["image_path"] == str(copy / written["ImageDir"] / row["sample_id"])
        with Image.open(row["image_path"]) as im:
            assert im.mode == "I;16" and (np.asarray(im) == pixels.astype(np.uint16) * 16).all()
        assert set(read_sidecar(row["image_path"])) == {k for k, m in drawn.items() if m.any()}
        assert row["padchest_labels"].split("|") == padchest_terms(patient)


def test_the_writers_terms_map_back_to_what_was_drawn():
    rng = np.random.default_rng(0)
    for _ in range(400):
        patient = sample_patient(rng)
        assert dict(zip(LABELS, observations(tuple(padchest_terms(patient))))) == _truth(patient)


def test_the_writer_is_deterministic_whatever_the_workers(copy, tmp_path):
    write_padchest(tmp_path / "one", N, SEED, 1)
    write_padchest(tmp_path / "other", N, SEED + 1, 2)
    assert tree_digest(tmp_path / "one") == tree_digest(copy) != tree_digest(tmp_path / "other")


def test_findings_map_onto_the_chexpert_observations_as_documented(tmp_path):
    rows = [_row("a.png", "['pleural effusion', 'pacemaker']"), _row("b.png", "['normal']"),
            _row("c.png", "[' Cardiomegaly ', 'NSG tube', 'aortic elongation']", projection="AP_horizontal"),
            _row("d.png", "['aortic elongation', 'kyphosis']", projection="AP"),
            _row("e.png", "['pulmonary fibrosis', 'interstitial pattern', 'rib fracture']"),
            _row("f.png", "['normal']", projection="L"), _row("g.png", "['normal']", projection="COSTAL")]
    _plant(tmp_path, rows)
    manifest = PadChest(tmp_path).read().set_index("sample_id")
    assert list(manifest.index) == ["a.png", "b.png", "c.png", "d.png", "e.png"]  # L and COSTAL are not frontal
    positives = {i: sorted(c for c in LABELS if manifest.at[i, c] == 1.0) for i in manifest.index}
    assert positives == {"a.png": ["Pleural Effusion", "Support Devices"], "b.png": ["No Finding"],
                         "c.png": ["Cardiomegaly", "Support Devices"], "d.png": [],
                         "e.png": ["Fracture", "Lung Opacity", "Pleural Other"]}
    assert set(np.unique(manifest[LABELS])) == {0.0, 1.0}
    assert manifest.at["c.png", "padchest_labels"] == "Cardiomegaly|NSG tube|aortic elongation"
    assert manifest.at["a.png", "patient_id"] == PATIENT
    assert label_prompt(manifest.loc["a.png", LABELS].to_dict(), TEMPLATES, negatives=False) == \
        "There is pleural effusion. There is support devices."
    everything = PadChest(tmp_path, {"projections": []}).read()
    assert sorted(everything["projection"]) == ["AP", "AP_horizontal", "COSTAL", "L", "PA", "PA", "PA"]
    terms = [t.lower() for ts in OBSERVATION_TERMS.values() for t in ts]
    assert set(OBSERVATION_TERMS) == set(LABELS) and len(set(terms)) == len(terms)  # each term names one observation


@pytest.mark.parametrize("cell", ["", "['normal'", "[]", "['', ' ']", "[1, 2]", "normal", "{'normal'}"])
def test_a_malformed_or_empty_label_list_is_skipped_with_a_count_or_refused(tmp_path, capsys, cell):
    assert listed_terms(cell) is None
    _plant(tmp_path, [_row("a.png", "['normal']"), _row("b.png", cell), _row("c.png", cell)])
    manifest = PadChest(tmp_path).read()
    assert list(manifest["sample_id"]) == ["a.png"]
    err = capsys.readouterr().err
    assert "padchest: skipped 2 of 3 image(s)" in err and "line 3" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match=r"\.csv: 2 of 3 image\(s\) .*line 3.*malformed_labels=skip") as e:
        PadChest(tmp_path, {"malformed_labels": "error"}).read()
    assert "\n" not in str(e.value)


def test_unreadable_files_are_one_line_errors_naming_file_line_and_column(tmp_path):
    path = _plant(tmp_path / "a", [_row("a.png", "['normal']")],
                  columns=[c if c != "Labels" else "Findings" for c in COLUMNS])
    with pytest.raises(UserError, match=r"PADCHEST_.*\.csv: missing column\(s\) 'Labels'") as e:
        PadChest(path.parent).read()
    assert "\n" not in str(e.value)
    _plant(tmp_path / "b", [_row("a.png", "['normal']"), _row("b.png", "['normal']", folder="x")])
    with pytest.raises(UserError, match=r"\.csv: line 3: column 'ImageDir' is 'x'"):
        PadChest(tmp_path / "b").read()
    _plant(tmp_path / "c", [_row("a.png", "['normal']"), _row("a.png", "['normal']")])
    with pytest.raises(UserError, match=r"\.csv: line 3: image 'a.png' is listed twice"):
        PadChest(tmp_path / "c").read()
    _plant(tmp_path / "d", [_row("a.png", "['normal']", patient="")])
    with pytest.raises(UserError, match=r"\.csv: line 2: column 'PatientID' is empty"):
        PadChest(tmp_path / "d").read()
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="has none of PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"):
        PadChest(tmp_path / "e").read()


def test_a_missing_image_folder_stops_the_run_or_is_left_out(tmp_path, capsys):
    rows = [_row("a.png", "['normal']"), _row("b.png", "['normal']", folder="7"), _row("c.png", "['normal']")]
    _plant(tmp_path, rows)
    with pytest.raises(UserError, match=r"1 of the 2 image folders .* folder '7', line 3\).*missing_folders=skip"):
        PadChest(tmp_path).read()
    assert list(PadChest(tmp_path, {"missing_folders": "skip"}).read()["sample_id"]) == ["a.png", "c.png"]
    assert "left out 1 of the 2 image folders" in capsys.readouterr().err
    _plant(tmp_path / "none", rows, folders=())
    with pytest.raises(UserError, match=r"2 of the 2 image folders .*<root>/<ImageDir>/<ImageID>"):
        PadChest(tmp_path / "none", {"missing_folders": "skip"}).read()


def test_the_split_is_by_patient_stable_and_the_same_from_a_gzipped_file(tmp_path):
    rows = [_row(f"{p}-{k}.png", "['normal']", patient=f"{10**30 + 7919 * p}") for p in range(300) for k in range(2)]
    _plant(tmp_path / "plain", rows)
    _plant(tmp_path / "gz", rows[::-1], gz=True)  # another order: the hash alone decides
    plain = PadChest(tmp_path / "plain").read()
    assert patients_in_several_splits(plain) == [] and plain["patient_id"].str.len().eq(31).all()
    shares = plain["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.1 and abs(shares["val"] - 0.1) < 0.06 and abs(shares["test"] - 0.2) < 0.08
    gz = PadChest(tmp_path / "gz").read().set_index("sample_id").loc[plain["sample_id"]].reset_index()
    pd.testing.assert_frame_equal(gz[plain.columns.drop("image_path")], plain.drop(columns="image_path"))
    again = PadChest(tmp_path / "plain").read()
    assert (again["split"] == plain["split"]).all()
    (tmp_path / "plain" / CSV_NAME).rename(tmp_path / "plain" / "subset.csv")  # `metadata` names another file
    pd.testing.assert_frame_equal(PadChest(tmp_path / "plain", {"metadata": "subset.csv"}).read(), plain)
    more = PadChest(tmp_path / "plain", {"metadata": "subset.csv", "val_fraction": 0.3}).read()
    moved = plain["split"] != more["split"]
    assert moved.any() and set(more["split"][moved]) == {"val"}  # only train patients join val; test stays
    with pytest.raises(UserError, match="test_fraction must be in"):
        PadChest(tmp_path / "plain", {"metadata": "subset.csv", "test_fraction": 1.5}).read()

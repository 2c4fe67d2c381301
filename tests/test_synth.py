import numpy as np
import pandas as pd
import pytest
from tests_support import tree_digest as _digest

from bench.core.errors import UserError
from bench.core.registry import DATASETS
from bench.data.synth import dataset_dir, ensure_synthetic

CHEXPERT_DIR, MIMIC_DIR = dataset_dir("chexpert"), dataset_dir("mimic-cxr")



def test_generator_is_deterministic_by_seed(tmp_path, data_home):
    again = ensure_synthetic(tmp_path / "again", "tiny", 0, workers=1)
    other = ensure_synthetic(tmp_path / "other", "tiny", 1, workers=2)
    reference = _digest(data_home / "synthetic-tiny-0")
    assert _digest(again) == reference
    assert _digest(other) != reference


def test_existing_tree_is_reused_and_a_different_one_refused(data_home, tmp_path):
    root = data_home / "synthetic-tiny-0"
    assert ensure_synthetic(root, "tiny", 0) == root
    with pytest.raises(UserError, match="not .*'seed': 5"):
        ensure_synthetic(root, "tiny", 5)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        ensure_synthetic(tmp_path / "occupied", "tiny", 0)


def test_mimic_layout_and_quirks(data_home):
    root = data_home / "synthetic-tiny-0" / MIMIC_DIR
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns[:5]) == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                      "ViewPosition"]
    assert meta["subject_id"].astype(str).str.match(r"^1\d{7}$").all()
    assert meta["study_id"].astype(str).str.match(r"^5\d{7}$").all()
    assert meta["dicom_id"].str.match(r"^([0-9a-f]{8}-){4}[0-9a-f]{8}$").all()
    assert "LATERAL" in set(meta["ViewPosition"])
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert set(split["split"]) <= {"train", "validate", "test"}
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(labels.columns[2:]) == sorted(labels.columns[2:])
    assert set(labels["Pleural Effusion"].dropna()) <= {1.0, 0.0, -1.0} and labels["Pleural Effusion"].isna().any()
    row = meta.iloc[0]
    report = root / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}.txt"
    text = report.read_text()
    assert text.startswith("                                 FINAL REPORT\n")
    assert "\n FINDINGS:" in text and "\n IMPRESSION:" in text and "___" in text
    assert max(len(line) for line in text.splitlines()) <= 79


def test_labels_follow_the_report_text(data_home):
    root = data_home / "synthetic-tiny-0" / MIMIC_DIR
    manifest = DATASETS.get("mimic-cxr")(root, {"uncertain_policy": "zeros"}).read()
    hedged_as_positive = DATASETS.get("mimic-cxr")(root, {"uncertain_policy": "ones"}).read()
    effusion = manifest["report"].str.lower().str.contains("pleural effusion")
    negated = manifest["report"].str.lower().str.contains("no pleural effusion")
    hedged = manifest["report"].str.lower().str.contains(r"(?:possible|questionable|probable)[^.]*pleural effusion")
    positive = manifest["Pleural Effusion"] == 1.0
    assert (positive <= (effusion & ~negated & ~hedged)).all()
    assert (manifest.loc[negated, "Pleural Effusion"] == 0.0).all()
    assert hedged.any() and (manifest.loc[hedged, "Pleural Effusion"] == 0.0).all()
    assert (hedged_as_positive.loc[hedged, "Pleural Effusion"] == 1.0).all()
    assert positive.sum() > 0


def test_chexpert_layout(data_home):
    root = data_home / "synthetic-tiny-0" / CHEXPERT_DIR
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns[:5]) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    assert list(train.columns).index("Lung Opacity") < list(train.columns).index("Lung Lesion")
    assert train["Path"].str.startswith(f"{CHEXPERT_DIR}/train/patient").all()
    assert train.loc[train["Frontal/Lateral"] == "Lateral", "AP/PA"].isna().all()
    assert (train.iloc[:, 5:] == -1.0).any().any() and train.iloc[:, 5:].isna().any().any()
    valid = pd.read_csv(root / "valid.csv")
    assert set(np.unique(valid.iloc[:, 5:].to_numpy())) <= {0.0, 1.0}

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_FOLDER
from omegaconf import OmegaConf
from tests_support import tree_digest as _digest

from bench.core.errors import UserError
from bench.core.registry import DATASETS
from bench.data.finding_masks import read_sidecar
from bench.data.images import read_image
from bench.data.loading import dataset_identity
from bench.data.synth import GENERATOR_VERSION, MARKER, dataset_dir, ensure_synthetic, folder_name
from bench.data.synth.drawing import draw_frontal
from bench.data.synth.findings import Finding, Patient
from bench.experiment.config import compose_config

CHEXPERT_DIR, MIMIC_DIR = dataset_dir("chexpert"), dataset_dir("mimic-cxr")


def test_generator_is_deterministic_by_seed(tmp_path, data_home):
    again = ensure_synthetic(tmp_path / "again", "tiny", 0, workers=1)
    other = ensure_synthetic(tmp_path / "other", "tiny", 1, workers=2)
    reference = _digest(data_home / TINY_FOLDER)
    assert _digest(again) == reference
    assert _digest(other) != reference


def test_a_run_generates_only_what_it_reads_and_the_rest_joins_the_same(tmp_path, data_home):
    root = ensure_synthetic(tmp_path / "lazy", "tiny", 0, workers=1, datasets=["rsna"])
    assert sorted(json.loads((root / MARKER).read_text())["counts"]) == ["rsna"]
    assert [p.name for p in root.iterdir() if p.is_dir()] == [dataset_dir("rsna")]
    ensure_synthetic(root, "tiny", 0, workers=1, datasets=["chexpert-5x200"])  # a variant: its owner's copy
    full = data_home / TINY_FOLDER
    for name in ("rsna", "chexpert"):
        assert _digest(root / dataset_dir(name)) == _digest(full / dataset_dir(name)), name


def test_existing_tree_is_reused_and_a_different_one_refused(data_home, tmp_path):
    root = data_home / TINY_FOLDER
    assert ensure_synthetic(root, "tiny", 0) == root
    with pytest.raises(UserError, match="not .*'seed': 5"):
        ensure_synthetic(root, "tiny", 5)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        ensure_synthetic(tmp_path / "occupied", "tiny", 0)


def test_mimic_layout_and_quirks(data_home):
    root = data_home / TINY_FOLDER / MIMIC_DIR
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
    root = data_home / TINY_FOLDER / MIMIC_DIR
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
    root = data_home / TINY_FOLDER / CHEXPERT_DIR
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns[:5]) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    assert list(train.columns).index("Lung Opacity") < list(train.columns).index("Lung Lesion")
    assert train["Path"].str.startswith(f"{CHEXPERT_DIR}/train/patient").all()
    assert train.loc[train["Frontal/Lateral"] == "Lateral", "AP/PA"].isna().all()
    assert (train.iloc[:, 5:] == -1.0).any().any() and train.iloc[:, 5:].isna().any().any()
    valid = pd.read_csv(root / "valid.csv")
    assert set(np.unique(valid.iloc[:, 5:].to_numpy())) <= {0.0, 1.0}


def test_the_default_root_names_the_generator_version():
    config = Path(__file__).resolve().parents[1] / "configs" / "data" / "default.yaml"
    root = OmegaConf.to_container(OmegaConf.load(config))["synthetic"]["root"]  # unresolved
    assert root.endswith(f"/synthetic-v{GENERATOR_VERSION}-${{.difficulty}}-${{.size}}-${{.seed}}")
    assert TINY_FOLDER == folder_name("tiny", 0, "standard")


def test_an_older_generators_folder_is_read_as_it_is(data_home, tmp_path):
    old = tmp_path / "synthetic-tiny-0"
    old.mkdir()
    marker = json.loads((data_home / TINY_FOLDER / MARKER).read_text())
    (old / MARKER).write_text(json.dumps({**{k: v for k, v in marker.items() if k != "difficulty"},
                                          "generator_version": 5}))
    assert ensure_synthetic(old, "tiny", 0) == old  # nothing rewritten, nothing refused
    assert not any(p.name != MARKER for p in old.iterdir())
    with pytest.raises(UserError, match="not .*'seed': 1"):
        ensure_synthetic(old, "tiny", 1)
    with pytest.raises(UserError, match="not .*'difficulty': 'hard'"):
        ensure_synthetic(old, "tiny", 0, difficulty="hard")
    # its records keep the identity they had: version 5, no difficulty
    cfg = compose_config("clip", overrides=["data.synthetic.size=tiny", f"data.synthetic.root={old}"])
    assert dataset_identity(cfg, "rsna")["synthetic"] == {"size": "tiny", "seed": 0, "generator_version": 5,
                                                         "count": marker["counts"]["rsna"]}
    (old / MARKER).write_text("{cut")
    with pytest.raises(UserError, match="synthetic.json: not a synthetic benchmark's marker"):
        ensure_synthetic(old, "tiny", 0)


def test_every_frontal_image_has_its_ground_truth_sidecar(data_home):
    root = data_home / TINY_FOLDER
    for name in ("chexpert", "mimic-cxr", "covidx", "nih", "rsna", "siim", "padchest"):
        manifest = DATASETS.get(name)(root / dataset_dir(name)).read(with_reports=False)
        found = {}
        for path in manifest["image_path"]:
            masks = read_sidecar(path)
            assert masks is not None, path
            found.update(masks)
            shape = read_image(path).shape
            assert all(m.shape == shape and m.dtype == bool for m in masks.values()), path
        assert found, name  # some finding was drawn somewhere
    siim = DATASETS.get("siim")(root / dataset_dir("siim")).read()
    for row in siim.itertuples():  # the sidecar and SIIM's own label agree
        assert ("Pneumothorax" in read_sidecar(row.image_path)) == bool(row.Pneumothorax)


def test_difficulty_scales_findings_against_the_nuisance():
    """The same patient and draw: a finding is more conspicuous at `easy` than at `hard`; an image without
    findings differs only by the nuisance; an unknown level is refused."""
    def draw(patient, difficulty):
        return draw_frontal(patient, np.random.default_rng(7), 96, 88, {}, difficulty).astype(float)

    sick = Patient(findings={"Pneumothorax": Finding("Pneumothorax", "left", "upper", 3)})
    contrast = {d: np.abs(draw(sick, d) - draw(Patient(), d)).mean() for d in ("easy", "standard", "hard")}
    assert contrast["easy"] > contrast["standard"] > contrast["hard"] > 0
    with pytest.raises(UserError, match="difficulty 'brutal'"):
        ensure_synthetic(Path("/nonexistent"), "tiny", 0, difficulty="brutal")


def test_a_finding_is_not_told_by_the_mean_intensity_of_its_region():
    """At the standard difficulty, the mean intensity of the hemithorax a finding is drawn in varies across
    patients (the nuisance) at least as much as the finding shifts it: brightness alone does not tell it."""
    height, width = 96, 88
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    for name in ("Cardiomegaly", "Pleural Effusion", "Consolidation", "Pneumothorax", "Pneumonia", "Edema",
                 "Atelectasis", "Fibrosis", "COVID-19"):
        side = "left" if name in ("Pleural Effusion", "Consolidation", "Pneumothorax", "Pneumonia", "Atelectasis") \
            else "bilateral"
        region = (y > 0.15) & (y < 0.8) & ((x > 0.51) if side == "left" else (x > 0.09)) & (x < 0.91)
        means = {True: [], False: []}
        for i in range(30):
            for present in (True, False):
                patient = Patient(findings={name: Finding(name, side, "lower", 2)} if present else {})
                pixels = draw_frontal(patient, np.random.default_rng(1000 + i), height, width)
                means[present].append(pixels[region].mean())
        shift = abs(np.mean(means[True]) - np.mean(means[False]))
        assert np.std(means[False]) >= shift, name


def test_a_stale_or_cut_sidecar_is_named(data_home, tmp_path):
    from bench.data.finding_masks import sidecar_mask, write_sidecar

    image = next((data_home / TINY_FOLDER / CHEXPERT_DIR / "train").rglob("view1_frontal.jpg"))
    copy = tmp_path / "view1_frontal.jpg"
    copy.write_bytes(image.read_bytes())
    write_sidecar(copy, {"Pneumothorax": np.ones((5, 5), bool)})
    with pytest.raises(UserError, match=r"view1_frontal.findings.npz: the masks of Pneumothorax are not the image's"):
        sidecar_mask(copy)
    (tmp_path / "view1_frontal.findings.npz").write_bytes(b"PK\x03\x04cut")
    with pytest.raises(UserError, match=r"view1_frontal.findings.npz: not a findings sidecar"):
        sidecar_mask(copy)

"""Every adapter on its synthetic stand-in: the manifest contract, patient-disjoint splits, inspect."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from tests_support import bench_cli

from bench.core.errors import UserError
from bench.core.registry import DATASETS
from bench.data.adapter import MANIFEST_COLUMNS, PATIENT_OVERLAP, make_patient_disjoint, patients_in_several_splits
from bench.data.synth import dataset_dir
from bench.datasets.chexpert import COMPETITION, FIVE_BY_200_ZERO
from bench.evaluation.prompt_sets import get_prompt_set, prompt_set_names
from conftest import TINY_FOLDER


def _root(data_home, name: str):
    return data_home / TINY_FOLDER / dataset_dir(name)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_adapter_yields_the_manifest_with_patient_disjoint_splits(data_home, name):
    adapter = DATASETS.get(name)(_root(data_home, name))
    manifest = adapter.read()
    task = adapter.task
    assert list(manifest.columns[:4]) == MANIFEST_COLUMNS and set(task.labels) <= set(manifest.columns)
    assert manifest["sample_id"].is_unique
    assert patients_in_several_splits(manifest) == []
    assert adapter.patient_disjoint(manifest) is manifest  # the synthetic copies pass the shared check as they are
    assert adapter.settings_owner().defaults.get("patient_overlap", "refuse") in PATIENT_OVERLAP
    assert {"train", "test"} <= set(manifest["split"])
    y = manifest[task.labels].to_numpy()
    assert set(np.unique(y)) <= {0.0, 1.0}
    if not task.multilabel and len(task.labels) > 1:  # single-label where it is evaluated
        assert (y[(manifest["split"] == "test").to_numpy()].sum(1) == 1).all()
    assert task.metric in ("auc", "acc")
    for prompt_set in map(get_prompt_set, prompt_set_names()):  # every label has prompts in every set
        assert list(prompt_set.for_task(name, task.labels)) == task.labels
    assert all(p.exists() for p in map(__import__("pathlib").Path, manifest["image_path"]))


def test_chexpert_5x200_follows_the_gloria_rule(data_home):
    root = _root(data_home, "chexpert")
    manifest = DATASETS.get("chexpert")(root).read()
    raw = pd.read_csv(root / "train.csv")
    raw = raw.assign(sample_id=raw["Path"].str.split("/", n=1).str[1]).set_index("sample_id")
    held = manifest[manifest["split"] == "5x200"]
    assert len(held) > 0
    one_hot = raw.loc[held["sample_id"], COMPETITION].fillna(0.0).to_numpy()
    assert (one_hot.sum(1) == 1).all() and set(np.unique(one_hot)) == {0.0, 1.0}
    assert (raw.loc[held["sample_id"], FIVE_BY_200_ZERO].fillna(0.0) == 0).all().all()
    assert len(set(held[COMPETITION].to_numpy().argmax(1))) >= 2  # the tiny copy lacks some single-finding classes
    assert (raw.loc[held["sample_id"], "Frontal/Lateral"] == "Frontal").all()
    variant = DATASETS.get("chexpert-5x200")(root).read()
    assert set(variant.loc[variant["split"] == "test", "sample_id"]) == set(held["sample_id"])
    again = DATASETS.get("chexpert")(root, {"five_by_200_seed": 0}).read()
    assert again["split"].equals(manifest["split"])


def test_chexpert_uncertain_policies(data_home):
    root = _root(data_home, "chexpert")
    raw = pd.read_csv(root / "train.csv").assign(sample_id=lambda d: d["Path"].str.split("/", n=1).str[1])
    read = {p: DATASETS.get("chexpert")(root, {"uncertain_policy": p}).read().set_index("sample_id")
            for p in ("zeros", "ones", "gloria")}
    rows = raw.set_index("sample_id").loc[read["zeros"].index.intersection(raw["sample_id"])]
    for label in COMPETITION:
        unc = rows.index[rows[label] == -1.0]
        blank = rows.index[rows[label].isna()]
        assert (read["zeros"].loc[unc, label] == 0).all() and (read["ones"].loc[unc, label] == 1).all()
        assert (read["gloria"].loc[unc, label] == (1.0 if label in ("Atelectasis", "Edema", "Pleural Effusion")
                                                    else 0.0)).all()
        assert (read["ones"].loc[blank, label] == 0).all()
    with pytest.raises(UserError, match="unknown uncertain_policy 'maybe'"):
        DATASETS.get("chexpert")(root, {"uncertain_policy": "maybe"}).read()


def test_chexpert_study_level_test_set_when_present(tmp_path):
    from bench.data.synth.writers import write_chexpert

    root = tmp_path / "CheXpert-v1.0-small"
    write_chexpert(root, 32, 3, 1, test_studies=12)
    truth = pd.read_csv(root / "test" / "groundtruth.csv")
    assert list(truth.columns[:2]) == ["Study", "No Finding"] and truth["Study"].str.match(
        r"^CheXpert-v1.0/test/patient\d{5}/study1$").all()
    manifest = DATASETS.get("chexpert")(root).read()
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 12 and test["sample_id"].str.endswith("/view1_frontal.jpg").all()
    assert set(manifest.loc[manifest["split"] == "val", "sample_id"].str[:6]) == {"valid/"}


def test_bad_chexpert_input_names_file_and_line(tmp_path, data_home):
    root = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(_root(data_home, "chexpert"), root, ignore=shutil.ignore_patterns("*.jpg"))
    train = pd.read_csv(root / "train.csv", dtype=str)
    good = train.copy()
    train.loc[3, "Edema"] = "2.0"
    train.to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv: line 5: column 'Edema' has value '2.0'"):
        DATASETS.get("chexpert")(root).read()
    train.drop(columns=["Edema"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(UserError, match=r"train.csv: missing column\(s\) 'Edema'"):
        DATASETS.get("chexpert")(root).read()
    good.to_csv(root / "train.csv", index=False)
    (root / "valid.csv").unlink()
    with pytest.raises(UserError, match="has none of valid.csv"):
        DATASETS.get("chexpert")(root).read()


def test_mimic_empty_reports_are_skipped_with_a_count_or_refused(tmp_path, data_home, capsys):
    root = tmp_path / "mimic"
    shutil.copytree(_root(data_home, "mimic-cxr"), root)
    full = DATASETS.get("mimic-cxr")(root).read()
    victim = full.iloc[0]
    report = root / "files" / f"p{victim.patient_id[:2]}" / f"p{victim.patient_id}" / f"s{victim.study_id}.txt"
    report.write_text("")
    kept = DATASETS.get("mimic-cxr")(root).read()
    assert victim.sample_id not in set(kept["sample_id"]) and len(kept) < len(full)
    err = capsys.readouterr().err
    assert "skipped 1 of" in err and str(report) in err
    with pytest.raises(UserError, match=f"first: {report}"):
        DATASETS.get("mimic-cxr")(root, {"empty_reports": "error"}).read()


def test_inspect_json_has_the_documented_shape(data_home):
    out = bench_cli("data", "inspect", "chexpert", "--root", str(_root(data_home, "chexpert")), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) == {"dataset", "n_samples", "n_patients", "n_missing_images", "splits", "labels"}
    assert summary["n_missing_images"] == 0
    assert sum(s["n"] for s in summary["splits"].values()) == summary["n_samples"]
    assert set(summary["labels"]) == set(COMPETITION)
    raw = pd.read_csv(_root(data_home, "chexpert") / "train.csv")
    # the training rows the manifest keeps (5x200's patients leave it)
    kept = set(DATASETS.get("chexpert")(_root(data_home, "chexpert")).read()["sample_id"])
    raw = raw[raw["Path"].str.split("/", n=1).str[1].isin(kept)]
    hedged = max(COMPETITION, key=lambda c: int((raw[c] == -1).sum()))  # a label the tiny copy has uncertain values of
    assert summary["labels"][hedged]["uncertain"] == int((raw[hedged] == -1).sum()) > 0
    ones = json.loads(bench_cli("data", "inspect", "chexpert", "--root", str(_root(data_home, "chexpert")),
                                "--json", "--set", "uncertain_policy=ones").stdout)
    zeros = json.loads(bench_cli("data", "inspect", "chexpert", "--root", str(_root(data_home, "chexpert")),
                                 "--json", "--set", "uncertain_policy=zeros").stdout)
    assert ones["labels"][hedged]["positive"] - zeros["labels"][hedged]["positive"] == \
        summary["labels"][hedged]["uncertain"]


def test_metadata_only_roots_are_allowed_and_strict_refuses_them(tmp_path, data_home):
    root = tmp_path / "nih"
    shutil.copytree(_root(data_home, "nih"), root, ignore=shutil.ignore_patterns("*.png"))
    out = bench_cli("data", "inspect", "nih", "--root", str(root), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_missing_images"] == summary["n_samples"] > 0
    strict = bench_cli("data", "inspect", "nih", "--root", str(root), "--strict")
    assert strict.returncode == 2 and "image file(s) named in the metadata are missing" in strict.stderr


def test_a_corrupt_image_is_skipped_before_training_or_stops_the_run(tmp_path, data_home, tiny_cfg, capsys):
    from bench.data.images import UnreadableImage
    from bench.data.loading import load_dataset

    root = tmp_path / "rsna"
    shutil.copytree(_root(data_home, "rsna"), root)
    victim = sorted((root / "stage_2_train_images").glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated mid-header
    extra = (f"data.rsna.root={root}", f"data.cache_dir={tmp_path / 'cache'}")
    data = load_dataset(tiny_cfg(extra=extra), "rsna")
    split = data.manifest.set_index("sample_id").loc[victim.stem, "split"]
    rows = data.rows(split)
    assert victim.stem not in set(rows["sample_id"]) and len(rows) == (data.manifest["split"] == split).sum() - 1
    assert data.skipped == {f"{split}.txt": 1}
    assert f"skipped 1 unreadable image(s) in rsna {split}; first: {victim}" in capsys.readouterr().err
    with pytest.raises(UnreadableImage, match=victim.name):
        load_dataset(tiny_cfg(extra=(*extra, "data.corrupt_images=error")), "rsna").rows(split)


def test_broken_settings_and_compressed_metadata_are_one_line_errors(tmp_path, data_home):
    root = tmp_path / "mimic"
    shutil.copytree(_root(data_home, "mimic-cxr"), root, ignore=shutil.ignore_patterns("files"))
    meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta.write_bytes(meta.read_bytes()[:200])  # a download cut short
    with pytest.raises(UserError, match="mimic-cxr-2.0.0-metadata.csv.gz: cannot be read as CSV"):
        DATASETS.get("mimic-cxr")(root).read(with_reports=False)
    with pytest.raises(UserError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        DATASETS.get("rsna")(_root(data_home, "rsna"), {"val_fraction": 1.5}).read()
    out = bench_cli("data", "inspect", "chexpert", "--root", str(_root(data_home, "chexpert")),
                    "--set", "frontal_only=[oops")
    assert out.returncode == 2 and "bad dataset setting" in out.stderr and "Traceback" not in out.stderr


def _overlapping() -> pd.DataFrame:
    """Patient a: 2 train, 1 test; b: 1 val, 1 test (a tie); c: train only; d: 1 train and a named set."""
    rows = [("a1", "a", "train"), ("a2", "a", "train"), ("a3", "a", "test"), ("b1", "b", "val"), ("b2", "b", "test"),
            ("c1", "c", "train"), ("d1", "d", "train"), ("d2", "d", "5x200")]
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "split"]).assign(image_path="x")


def test_a_patient_in_several_splits_is_refused_naming_it_or_moved_to_their_main_split(capsys):
    manifest = _overlapping()
    with pytest.raises(UserError) as err:
        make_patient_disjoint(manifest, "toy", "refuse", "data.toy.patient_overlap")
    assert str(err.value) == ("toy: 2 patient(s) have images in more than one split (e.g. patient a: 2 in train, 1 in "
                              "test image(s)); splits must be patient-disjoint: fix the split files, or set "
                              "data.toy.patient_overlap=repair to move each such patient's images to the split "
                              "holding most of them")
    repaired = make_patient_disjoint(manifest, "toy", "repair")
    assert list(repaired["split"]) == ["train", "train", "train", "test", "test", "train", "train", "5x200"]
    assert patients_in_several_splits(repaired) == [] and list(manifest["split"])[2] == "test"  # input untouched
    assert "moved 2 image(s) of 2 patient(s)" in capsys.readouterr().err
    with pytest.raises(UserError, match="data.toy.patient_overlap must be one of refuse, repair, got 'drop'"):
        make_patient_disjoint(manifest, "toy", "drop", "data.toy.patient_overlap")


def test_official_splits_of_mimic_and_chexpert_go_through_the_patient_check(tmp_path, data_home):
    root = tmp_path / "mimic"
    shutil.copytree(_root(data_home, "mimic-cxr"), root, ignore=shutil.ignore_patterns("files"))
    adapter = DATASETS.get("mimic-cxr")(root)
    manifest = adapter.read(with_reports=False)
    train, test = (manifest[manifest["split"] == s].iloc[0] for s in ("train", "test"))
    meta_file = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta = pd.read_csv(meta_file)
    meta.loc[meta["dicom_id"].astype(str) == test.sample_id, "subject_id"] = int(train.patient_id)
    meta.to_csv(meta_file, index=False, compression="gzip")  # the official split lists that subject in train and test
    planted = adapter.read(with_reports=False)
    with pytest.raises(UserError, match=rf"mimic-cxr \(.*\): 1 patient\(s\) have images in more than one split "
                                        rf"\(e.g. patient {train.patient_id}: 1 in train, 1 in test image\(s\)\); .*"
                                        rf"data.mimic-cxr.patient_overlap=repair"):
        adapter.patient_disjoint(planted)
    repaired = DATASETS.get("mimic-cxr")(root, {"patient_overlap": "repair"}).patient_disjoint(planted)
    assert repaired.set_index("sample_id").loc[[train.sample_id, test.sample_id], "split"].tolist() == ["test", "test"]

    chexpert = tmp_path / "chexpert"
    shutil.copytree(_root(data_home, "chexpert"), chexpert, ignore=shutil.ignore_patterns("*.jpg"))
    train, valid = pd.read_csv(chexpert / "train.csv"), pd.read_csv(chexpert / "valid.csv")
    patient = valid["Path"].str.extract(r"(patient\d+)", expand=False).iloc[0]
    moved = train.iloc[[0]].assign(Path=lambda d: d["Path"].str.replace(r"patient\d+", patient, regex=True))
    pd.concat([train, moved]).to_csv(chexpert / "train.csv", index=False)  # a valid.csv patient also in training
    adapter = DATASETS.get("chexpert")(chexpert)
    with pytest.raises(UserError, match=rf"chexpert \(.*\): 1 patient\(s\) .*e.g. patient {patient}: 1 in "):
        adapter.patient_disjoint(adapter.read())

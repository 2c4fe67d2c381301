import hashlib

import numpy as np
import pandas as pd
import pytest

from bench.core.errors import UserError
from bench.data.adapter import Task
from bench.data.splits import fraction_file, materialise


def _manifest(n: int = 1000, classes: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n, p=[0.7, 0.2, 0.1][:classes] if classes == 3 else None)
    split = rng.choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2])
    return pd.DataFrame({"sample_id": [f"s{i:05d}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                         "image_path": "x", "split": split, **{f"c{k}": (y == k).astype(float) for k in range(classes)}})


MULTICLASS = Task(labels=["c0", "c1", "c2"], multilabel=False, metric="acc")


def test_split_files_are_written_once_with_their_hashes_and_reused(tmp_path):
    manifest = _manifest()
    files = materialise(manifest, MULTICLASS, "toy", tmp_path)
    names = sorted(p.name for p in files.directory.iterdir())
    assert names == ["SHA256SUMS", "test.txt", "train.txt", "train_1.txt", "train_10.txt", "val.txt"]
    sums = dict(reversed(line.split("  ")) for line in (files.directory / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((files.directory / name).read_bytes()).hexdigest() == digest
    stamp = (files.directory / "train_1.txt").stat().st_mtime_ns
    again = materialise(manifest.sample(frac=1, random_state=1), MULTICLASS, "toy", tmp_path)
    assert again.directory == files.directory and (files.directory / "train_1.txt").stat().st_mtime_ns == stamp
    moved = manifest.assign(split=np.where(manifest["sample_id"] == "s00000", "val", manifest["split"]))
    assert materialise(moved, MULTICLASS, "toy", tmp_path).directory != files.directory


def test_fractions_are_nested_stratified_and_logged_when_used(tmp_path):
    manifest = _manifest()
    files = materialise(manifest, MULTICLASS, "toy", tmp_path)
    train = files.rows("train")
    one, ten = files.rows("train", 0.01), files.rows("train", 0.1)
    assert set(one["sample_id"]) < set(ten["sample_id"]) < set(train["sample_id"])
    assert len(ten) == pytest.approx(0.1 * len(train), abs=3)
    for c in MULTICLASS.labels:  # each class keeps its share, and at least one sample
        assert ten[c].sum() == pytest.approx(0.1 * train[c].sum(), abs=1)
        assert one[c].sum() >= 1
    assert set(files.used) == {"train.txt", "train_1.txt", "train_10.txt"}
    five = files.rows("train", 0.05)  # another fraction is materialised on first use
    assert (files.directory / fraction_file(0.05)).exists() and len(five) == pytest.approx(0.05 * len(train), abs=3)


def test_a_split_file_edited_by_hand_is_refused(tmp_path):
    files = materialise(_manifest(), MULTICLASS, "toy", tmp_path)
    with (files.directory / "test.txt").open("a") as fh:
        fh.write("s99999\n")
    with pytest.raises(UserError, match="test.txt: split file changed since it was written"):
        files.rows("test")


def test_fractions_do_not_depend_on_row_order_and_the_key_covers_labels(tmp_path):
    manifest = _manifest()
    files = materialise(manifest, MULTICLASS, "toy", tmp_path / "a")
    shuffled = materialise(manifest.sample(frac=1, random_state=3), MULTICLASS, "toy", tmp_path / "b")
    for name in ("train_1.txt", "train_10.txt"):
        assert (files.directory / name).read_text() == (shuffled.directory / name).read_text()
    relabelled = manifest.assign(c0=manifest["c1"], c1=manifest["c0"])
    assert materialise(relabelled, MULTICLASS, "toy", tmp_path / "a").directory != files.directory


def _patients_manifest(n_patients: int = 400, seed: int = 0) -> pd.DataFrame:
    """1-4 images per patient; a patient's images mostly share a class."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        base = rng.choice(3, p=[0.7, 0.2, 0.1])
        split = rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2])
        for k in range(rng.integers(1, 5)):
            c = base if rng.random() < 0.8 else rng.integers(3)
            rows.append({"sample_id": f"p{p:04d}_{k}", "patient_id": f"p{p:04d}", "image_path": "x", "split": split,
                         **{f"c{j}": float(c == j) for j in range(3)}})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("task", [MULTICLASS, Task(labels=["c1"], multilabel=True, metric="auc"),
                                  Task(labels=["c0", "c1", "c2"], multilabel=True, metric="auc")])
def test_fractions_take_whole_patients_stay_nested_and_keep_every_class(tmp_path, task):
    manifest = _patients_manifest()
    files = materialise(manifest, task, "toy", tmp_path)
    train = files.rows("train")
    one, ten = files.rows("train", 0.01), files.rows("train", 0.1)
    assert set(one["sample_id"]) < set(ten["sample_id"]) < set(train["sample_id"])
    for part in (one, ten):  # every chosen patient comes with all their training images
        chosen = train[train["patient_id"].isin(part["patient_id"])]
        assert set(chosen["sample_id"]) == set(part["sample_id"])
        for c in task.labels:  # every class keeps a positive (a binary task: a negative too)
            assert part[c].sum() >= 1 and (len(task.labels) > 1 or (part[c] == 0).any())
    assert ten["patient_id"].nunique() == pytest.approx(0.1 * train["patient_id"].nunique(), abs=3)
    assert materialise(manifest.sample(frac=1, random_state=5), task, "toy", tmp_path / "b").rows(
        "train", 0.1)["sample_id"].sort_values().tolist() == ten["sample_id"].sort_values().tolist()


def test_fractions_are_stratified_by_the_patients_most_frequent_class(tmp_path):
    manifest = _patients_manifest(2000, seed=1)
    files = materialise(manifest, MULTICLASS, "toy", tmp_path)
    train, ten = files.rows("train"), files.rows("train", 0.1)
    stratum = train.groupby("patient_id")[MULTICLASS.labels].sum().to_numpy().argmax(1)
    chosen = train.groupby("patient_id")[MULTICLASS.labels].sum().index.isin(ten["patient_id"])
    for k in range(3):
        assert chosen[stratum == k].sum() == pytest.approx(0.1 * (stratum == k).sum(), abs=1)


def test_the_split_key_covers_patients_and_the_fraction_rule(tmp_path, monkeypatch):
    from bench.data import splits

    manifest = _patients_manifest()
    first = materialise(manifest, MULTICLASS, "toy", tmp_path).directory
    regrouped = manifest.assign(patient_id=manifest["sample_id"])
    assert materialise(regrouped, MULTICLASS, "toy", tmp_path).directory != first
    monkeypatch.setattr(splits, "FRACTION_RULE", "fractions by patient v3")
    assert materialise(manifest, MULTICLASS, "toy", tmp_path).directory != first


def test_without_patient_ids_each_image_is_its_own_patient():
    from bench.data.splits import fraction_ids

    manifest = _patients_manifest()
    train = manifest[manifest["split"] == "train"]
    alone = train.assign(patient_id=train["sample_id"])
    assert fraction_ids(train.drop(columns="patient_id"), MULTICLASS, 0.1) == fraction_ids(alone, MULTICLASS, 0.1)
    blank = train.assign(patient_id=None)
    assert fraction_ids(blank, MULTICLASS, 0.1) == fraction_ids(train.drop(columns="patient_id"), MULTICLASS, 0.1)

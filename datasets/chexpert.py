"""CheXpert (Stanford): train.csv/valid.csv whose `Path` starts with the root folder's own name.

Splits (documented rule):
- `test`: the study-level `groundtruth.csv` (CheXpert test set, 500 studies; at `<root>/groundtruth.csv` or
  `<root>/test/groundtruth.csv`) when present, one image per study (`view1_frontal.jpg`, as CheXzero);
  otherwise the official valid.csv (radiologist consensus, 0/1).
- `val`: valid.csv when the test set is present; otherwise the training patients whose stable hash falls
  below `val_fraction`.
- `5x200`: the zero-shot set built by GLoRIA/MGCA's rule (frontal training images with exactly one positive
  competition label among the five and the other observations but No Finding negative, after blank->0;
  200 per class, drawn with seed `five_by_200_seed`);
  these images leave the training split, as in GLoRIA/MGCA, and so do their patients' other images
  (GLoRIA keeps them in train, which puts one patient on both sides). Fewer than 200 where a class has fewer.
- `train`: the remaining training patients.
A patient of valid.csv (or of the test set) also in train.csv is refused when the dataset is loaded
(`patient_overlap: refuse`; `repair` moves their images to the split holding most of them,
bench/data/adapter.py).
Frontal views only by default (`frontal_only`). Uncertain labels (-1) follow `uncertain_policy`: `zeros`
(U-Zeros), `ones` (U-Ones) or `gloria` (GLoRIA/MGCA per-class mapping, the default). Blank (not mentioned)
counts as negative under each of these; `keep` leaves 1/0/-1 and blank as NaN, for the prompts of image-only
pretraining samples (bench/modeling/label_prompts.py), never for evaluation.
"""
from __future__ import annotations

import os

from bench.core.checks import integer, one_of
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import (Adapter, Synthetic, Task, count_uncertain, finding_task, fraction_setting, label_values,
                                patient_fold, patient_overlap_check, read_csv, require_columns)

np = lazy_module("numpy")
pd = lazy_module("pandas")

COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
ALL_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
              "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
              "Fracture", "Support Devices"]
GLORIA_UNCERTAIN = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                    "Pleural Effusion": 1.0}
POLICIES = ("zeros", "ones", "gloria", "keep")  # keep: 1/0/-1 and NaN for blank, for prompts of image-only
                                                #   pretraining samples; evaluation needs 0/1 labels
FIVE_BY_200_ZERO = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
                    "Pleural Other", "Fracture", "Support Devices"]
FIVE_BY_200 = "5x200"


def apply_uncertain_policy(labels: pd.DataFrame, policy: str) -> pd.DataFrame:
    if policy not in POLICIES:
        raise UserError(f"unknown uncertain_policy {policy!r}; valid: {', '.join(POLICIES)}")
    if policy == "keep":
        return labels.astype(float)
    out = labels.fillna(0.0).astype(float)
    for col in out.columns:
        value = {"zeros": 0.0, "ones": 1.0}.get(policy, GLORIA_UNCERTAIN.get(col, 0.0))
        out.loc[out[col] == -1.0, col] = value
    return out


def five_by_200(frame: pd.DataFrame, raw: pd.DataFrame, frontal: pd.Series, seed: int,
                per_class: int = 200) -> pd.Index:
    """GLoRIA/MGCA's CheXpert 5x200 rule: among frontal rows, with blank as 0, those whose competition labels
    are exactly one-hot and whose other eight observations (all but No Finding) are 0; uncertain -1 never
    matches. `per_class` drawn per class with `seed`."""
    filled = raw[[*COMPETITION, *FIVE_BY_200_ZERO]].fillna(0.0).to_numpy()
    chosen = []
    for i, name in enumerate(COMPETITION):
        target = np.eye(len(COMPETITION) + len(FIVE_BY_200_ZERO))[i]
        rows = frame.index[(filled == target).all(axis=1) & frontal.to_numpy()]
        rng = np.random.default_rng([seed, i])
        chosen.extend(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    return pd.Index(sorted(chosen))


@register_adapter
class CheXpert(Adapter):
    name = "chexpert"
    description = "CheXpert: 5 competition labels, multi-label AUC; the 5x200 set for zero-shot accuracy"
    task = finding_task(COMPETITION)
    setting_checks = {"uncertain_policy": one_of(POLICIES[:-1]), "five_by_200_seed": integer(0),
                      "patient_overlap": patient_overlap_check}
    defaults = {  # also read by chexpert-5x200; root: .../CheXpert-v1.0-small (or CheXpert-v1.0)
        "uncertain_policy": "gloria",  # gloria (GLoRIA/MGCA per-class mapping) | zeros | ones
        "frontal_only": True,
        "val_fraction": 0.1,  # of training patients, when the study-level test set is absent
        "five_by_200_seed": 0,
        "patient_overlap": "refuse",  # refuse | repair: a patient in several splits (bench/data/adapter.py)
    }
    synthetic = Synthetic("CheXpert-v1.0-small", {"tiny": 100, "small": 2200, "medium": 10000},  # patients, 60% test
                          "bench.data.synth.writers:write_chexpert")

    def _read_listing(self, file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        path = self.require(file)
        df = read_csv(path, dtype={"Path": str})
        require_columns(df, ["Path", "Frontal/Lateral", *ALL_LABELS], path)
        raw = label_values(df, ALL_LABELS, path)
        if self.cfg.get("frontal_only", True):
            keep = df["Frontal/Lateral"] == "Frontal"
            df, raw = df[keep], raw[keep]
        # `Path` is relative to the folder that holds the root: drop its first component
        rel = df["Path"].str.split("/", n=1).str[1]
        patient = rel.str.extract(r"(patient\d+)", expand=False)
        bad = rel.isna() | patient.isna()
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: line {df.index[line] + 2}: Path {df['Path'].iloc[line]!r} is not "
                            f"<dataset folder>/<part>/patientNNNNN/...")
        frame = pd.DataFrame({"sample_id": rel.values, "patient_id": patient.values,
                              "image_path": (str(self.root.absolute()) + os.sep + rel).values,
                              "frontal": (df["Frontal/Lateral"] == "Frontal").values}, index=df.index)
        return frame, raw

    def _test_set(self) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        for name in ("groundtruth.csv", "test/groundtruth.csv"):
            path = self.root / name
            if path.exists():
                df = read_csv(path, dtype={"Study": str})
                require_columns(df, ["Study", *COMPETITION], path)
                raw = label_values(df, COMPETITION, path, allowed=(0.0, 1.0))
                rel = df["Study"].str.split("/", n=1).str[1] + "/view1_frontal.jpg"
                frame = pd.DataFrame({"sample_id": rel.values,
                                      "patient_id": rel.str.extract(r"(patient\d+)", expand=False).values,
                                      "image_path": (str(self.root.absolute()) + os.sep + rel).values})
                return frame, raw
        return None

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        policy = self.cfg.get("uncertain_policy", "gloria")
        train, train_raw = self._read_listing("train.csv")
        valid, valid_raw = self._read_listing("valid.csv")
        test = self._test_set()
        train["split"] = "train"
        held_out = five_by_200(train, train_raw, train["frontal"], int(self.cfg.get("five_by_200_seed", 0)))
        train.loc[held_out, "split"] = FIVE_BY_200
        shared = train["patient_id"].isin(train.loc[held_out, "patient_id"]) & (train["split"] == "train")
        train, train_raw = train[~shared], train_raw[~shared]
        parts = [(train, train_raw)]
        if test is None:
            valid["split"] = "test"
            val_fraction = fraction_setting(self.cfg, "val_fraction", 0.1)
            is_val = patient_fold(train["patient_id"], "chexpert-val") < val_fraction
            train.loc[is_val & (train["split"] == "train").to_numpy(), "split"] = "val"
            parts.append((valid, valid_raw))
        else:
            valid["split"] = "val"
            test[0]["split"] = "test"
            parts += [(valid, valid_raw), test]
        frames = []
        for frame, raw in parts:
            labels = apply_uncertain_policy(raw[COMPETITION], policy)
            frames.append(frame.assign(**{c: labels[c].to_numpy() for c in COMPETITION}))
        manifest = pd.concat(frames, ignore_index=True).drop(columns="frontal")
        manifest.attrs["uncertain"] = count_uncertain(pd.concat([raw[COMPETITION] for _, raw in parts]))
        return manifest


@register_adapter
class CheXpert5x200(CheXpert):
    """The same manifest, with the 5x200 images as the test split of a 5-class single-label task (the
    zero-shot accuracy benchmark of GLoRIA, MedCLIP and BenchX)."""

    name = "chexpert-5x200"
    config_key = "chexpert"
    description = "CheXpert 5x200: 1,000 training images with exactly one of 5 findings; zero-shot accuracy"
    task = Task(labels=COMPETITION, multilabel=False, metric="acc")
    provides = frozenset({"single-label"})

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        manifest = super().read(with_reports)
        split = manifest["split"].replace({"test": "held-out", FIVE_BY_200: "test"})
        return manifest.assign(split=split)

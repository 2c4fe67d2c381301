"""CheXpert (Stanford): train.csv/valid.csv whose `Path` starts with the root folder's own name.

Splits (documented rule): test = the official valid.csv (radiologist consensus, 0/1); val = the training
patients whose stable hash falls below `val_fraction`; train = the other training patients. Frontal
views only by default, as in GLoRIA/MGCA. Uncertain labels (-1) follow `uncertain_policy`:
`zeros` (U-Zeros), `ones` (U-Ones) or `gloria` (the GLoRIA/MGCA per-class mapping, the default).
Blank (not mentioned) counts as negative under every policy.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.datasets.base import Adapter, Task, patient_fold, read_csv, register_adapter, require_columns
from bench.errors import UserError

COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
GLORIA_UNCERTAIN = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                    "Pleural Effusion": 1.0}
POLICIES = ("zeros", "ones", "gloria")


def apply_uncertain_policy(labels: pd.DataFrame, policy: str) -> pd.DataFrame:
    if policy not in POLICIES:
        raise UserError(f"unknown uncertain_policy {policy!r}; valid: {', '.join(POLICIES)}")
    out = labels.fillna(0.0).astype(float)
    for col in out.columns:
        value = {"zeros": 0.0, "ones": 1.0}.get(policy, GLORIA_UNCERTAIN.get(col, 0.0))
        out.loc[out[col] == -1.0, col] = value
    return out


@register_adapter
class CheXpert(Adapter):
    name = "chexpert"
    task = Task(
        labels=COMPETITION,
        multilabel=True,
        metric="auc",
        prompts={c: [c.lower()] for c in COMPETITION},
        negative_prompts={c: [f"no {c.lower()}"] for c in COMPETITION},
    )

    def read(self) -> pd.DataFrame:
        cfg = self.cfg or {}
        policy = cfg.get("uncertain_policy", "gloria")
        frames = []
        for file, split in (("train.csv", "train"), ("valid.csv", "test")):
            path = self.require(file)
            df = read_csv(path)
            require_columns(df, ["Path", "Frontal/Lateral", *COMPETITION], path)
            if cfg.get("frontal_only", True):
                df = df[df["Frontal/Lateral"] == "Frontal"]
            # `Path` is relative to the folder that holds the root: drop its first component
            rel = df["Path"].str.split("/", n=1).str[1]
            if rel.isna().any():
                bad = df["Path"][rel.isna()].iloc[0]
                raise UserError(f"{path}: Path {bad!r} does not start with the dataset folder's name")
            patient = rel.str.extract(r"(patient\d+)", expand=False)
            if patient.isna().any():
                raise UserError(f"{path}: Path {df['Path'][patient.isna()].iloc[0]!r} names no patientNNNNN folder")
            labels = apply_uncertain_policy(df[COMPETITION], policy)
            frames.append(pd.DataFrame({
                "sample_id": rel.values, "patient_id": patient.values,
                "image_path": [str(self.root / r) for r in rel], "split": split,
                **{c: labels[c].values for c in COMPETITION},
            }))
        manifest = pd.concat(frames, ignore_index=True)
        val_fraction = float(cfg.get("val_fraction", 0.1))
        is_val = np.array([patient_fold(p, "chexpert-val") < val_fraction for p in manifest["patient_id"]])
        manifest.loc[(manifest["split"] == "train") & is_val, "split"] = "val"
        return manifest

"""RSNA Pneumonia Detection (Kaggle 2018, stage 2): `stage_2_train_labels.csv` and one DICOM per patient.

The labels file has a row per opacity box, so a positive patient can have several rows, and a negative one
a single row with blank box fields. Classification label (as GLoRIA/MGCA): Pneumonia = 1 when any of the
patient's rows has Target 1. One manifest row per patientId, image `<images_dir>/<patientId>.dcm`.

Kaggle never published the stage-2 test labels, so every split comes from the labelled training set: a
patient hash split, 70/15/15 by default (GLoRIA/MGCA and BenchX also split 70/15/15, with seeded shuffles
this harness does not reproduce). Each patientId has exactly one image, so the split is patient-disjoint.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import (Adapter, Synthetic, finding_task, fraction_setting, hash_split, label_values, read_csv,
                                require_columns)

np = lazy_module("numpy")
pd = lazy_module("pandas")

LABEL = "Pneumonia"


@register_adapter
class Rsna(Adapter):
    name = "rsna"
    task = finding_task([LABEL], "auc")
    provides = frozenset({"masks"})
    description = "RSNA Pneumonia Detection: binary pneumonia (lung opacity) classification from DICOMs (AUC)"
    defaults = {"images_dir": "stage_2_train_images", "val_fraction": 0.15, "test_fraction": 0.15}  # root: .../rsna-pneumonia-detection-challenge
    synthetic = Synthetic("rsna-pneumonia-detection-challenge", {"tiny": 80, "small": 2600, "medium": 6000},  # 60% test
                          "bench.data.synth.dicom_writers:write_rsna")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        path = self.require("stage_2_train_labels.csv")
        df = read_csv(path, dtype=str)  # as written, so errors quote the file's text
        require_columns(df, ["patientId", "Target"], path)
        target = label_values(df, ["Target"], path, allowed=(0.0, 1.0))["Target"]
        blank = target.isna() | df["patientId"].isna()
        if blank.any():
            i = int(np.flatnonzero(blank.to_numpy())[0])
            raise UserError(f"{path}: line {i + 2}: patientId and Target must not be blank")
        patients = df["patientId"].str.strip()
        positive = target.groupby(patients, sort=False).max()
        self._boxes = _boxes(df, patients, target)
        ids = positive.index.to_numpy(dtype=str)
        images_dir = self.root / str(self.cfg.get("images_dir", "stage_2_train_images"))
        return pd.DataFrame({
            "sample_id": ids,
            "patient_id": ids,
            "image_path": [str(images_dir / f"{i}.dcm") for i in ids],
            "split": hash_split(ids, "rsna", fraction_setting(self.cfg, "val_fraction", 0.15),
                                fraction_setting(self.cfg, "test_fraction", 0.15)),
            LABEL: positive.to_numpy(dtype=float),
        })

    def finding_mask(self, row: Mapping[str, Any]) -> np.ndarray | None:
        """The union of the patient's opacity boxes (x, y, width, height in the image's pixels), on the image
        file's own rows and columns; all False for Target 0; None where the labels file has no box columns."""
        from bench.data.finding_masks import box_mask, image_shape  # numpy: not at import, `bench list` stays instant

        if not hasattr(self, "_boxes"):
            self.read(with_reports=False)
        if self._boxes is None or str(row["sample_id"]) not in self._boxes:
            return None
        return box_mask(image_shape(row["image_path"]), self._boxes[str(row["sample_id"])])


def _boxes(df: pd.DataFrame, patients: pd.Series, target: pd.Series) -> dict[str, list[tuple]] | None:
    """patientId -> its Target-1 boxes (none for a negative patient), or None without the box columns."""
    columns = ["x", "y", "width", "height"]
    if any(c not in df.columns for c in columns):
        return None
    values = df[columns].apply(pd.to_numeric, errors="coerce")
    out: dict[str, list[tuple]] = {p: [] for p in patients.unique()}
    whole = (target == 1) & values.notna().all(axis=1)
    for patient, box in zip(patients[whole], values[whole].itertuples(index=False)):
        out[patient].append(tuple(float(v) for v in box))
    return out

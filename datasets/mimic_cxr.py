"""MIMIC-CXR-JPG (PhysioNet): the pretraining corpus of paired images and reports.

Reads `mimic-cxr-2.0.0-{metadata,split,chexpert}.csv` (plain or .gz), images at
`files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg` and reports at `files/pXX/pSUBJECT/sSTUDY.txt` (under
`reports_root`, default the same root). Reports are split into sections with the official MIMIC-CXR
header rule; the text is the configured sections joined (default impression then findings, as MGCA).
The official split is used, with `validate` renamed `val`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bench.datasets.base import Adapter, Task, read_csv, register_adapter, require_columns
from bench.errors import UserError

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
SECTION_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
SECTION_ALIASES = {"conclusion": "impression", "findings and impression": "impression",
                   "impression and recommendation": "impression", "finding": "findings"}


def report_sections(text: str) -> dict[str, str]:
    """Lower-cased section name -> text with whitespace collapsed; the preamble is '' (MIT-LCP's rule)."""
    parts = SECTION_HEADER.split("\n" + text)
    sections = {"": " ".join(parts[0].split())}
    for header, body in zip(parts[1::2], parts[2::2]):
        name = SECTION_ALIASES.get(header.strip().lower(), header.strip().lower())
        sections[name] = (sections.get(name, "") + " " + " ".join(body.split())).strip()
    return sections


@register_adapter
class MimicCxrJpg(Adapter):
    name = "mimic-cxr"
    task = Task(labels=LABELS, multilabel=True, metric="auc")

    def _csv(self, stem: str) -> tuple[pd.DataFrame, Path]:
        path = self.require(f"{stem}.csv", f"{stem}.csv.gz")
        return read_csv(path), path

    def read(self) -> pd.DataFrame:
        cfg = self.cfg or {}
        meta, meta_path = self._csv("mimic-cxr-2.0.0-metadata")
        require_columns(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_path)
        split, split_path = self._csv("mimic-cxr-2.0.0-split")
        require_columns(split, ["dicom_id", "split"], split_path)
        df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner")
        views = cfg.get("views", ["PA", "AP"])
        if views:
            df = df[df["ViewPosition"].isin(list(views))]
        labels, labels_path = self._csv("mimic-cxr-2.0.0-chexpert")
        require_columns(labels, ["subject_id", "study_id"], labels_path)
        df = df.merge(labels, on=["subject_id", "study_id"], how="left")
        reports_root = Path(cfg.get("reports_root") or self.root).expanduser()
        sections = list(cfg.get("sections", ["impression", "findings"]))
        texts = {}
        for subject, study in df[["subject_id", "study_id"]].drop_duplicates().itertuples(index=False):
            path = reports_root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
            texts[study] = self._report_text(path, sections)
        df = df.assign(report=df["study_id"].map(texts))
        df = df[df["report"].str.len() > 0]
        df = df.assign(split=df["split"].replace({"validate": "val"}))
        return pd.DataFrame({
            "sample_id": df["dicom_id"].values,
            "patient_id": df["subject_id"].astype(str).values,
            "study_id": df["study_id"].astype(str).values,
            "image_path": [str(self.root / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg")
                           for s, t, d in df[["subject_id", "study_id", "dicom_id"]].itertuples(index=False)],
            "split": df["split"].values,
            "report": df["report"].values,
            **{c: df[c].values for c in LABELS if c in df.columns},
        }).reset_index(drop=True)

    @staticmethod
    def _report_text(path: Path, sections: list[str]) -> str:
        try:
            found = report_sections(path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise UserError(f"{path}: cannot be read ({exc})") from None
        text = " ".join(found[s] for s in sections if found.get(s))
        return text or found.get("last_paragraph", "")

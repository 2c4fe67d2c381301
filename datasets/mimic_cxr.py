"""MIMIC-CXR-JPG (PhysioNet): the pretraining corpus of paired images and reports.

Reads `mimic-cxr-2.0.0-{metadata,split,chexpert}.csv` (plain or .gz), images at
`files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg` and reports at `files/pXX/pSUBJECT/sSTUDY.txt` (under
`reports_root`, default the same root). Reports are split into sections with the official MIMIC-CXR
header rule; the text is the configured sections joined (default impression then findings, as MGCA).
The official split is used, with `validate` renamed `val`; a subject it puts in several splits is refused
when the dataset is loaded (`patient_overlap: refuse`; `repair` moves their images, bench/data/adapter.py).
Labels come from the CheXpert labeler's CSV (`labeler: chexpert`, default) or NegBio's (`negbio`), per study, with `uncertain_policy` as for CheXpert
(default `zeros`). A study whose report file is missing or has no findings/impression/last paragraph
is skipped with a count naming the first such file (`empty_reports: skip`) or stops the run (`error`).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from bench.core.checks import list_of, one_of, text
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import (Adapter, Synthetic, count_uncertain, finding_task, label_values,
                                patient_overlap_check, read_csv, require_columns)
from bench.datasets.chexpert import POLICIES, apply_uncertain_policy

pd = lazy_module("pandas")

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
    description = "MIMIC-CXR-JPG: the paired image-report pretraining corpus (14 CheXpert-labeler labels)"
    task = finding_task(LABELS)
    provides = frozenset({"reports"})
    setting_checks = {"labeler": one_of(("chexpert", "negbio")), "uncertain_policy": one_of(POLICIES[:-1]),
                      "empty_reports": one_of(("skip", "error")), "reports_root": text(null=True),
                      "sections": list_of(text(), nonempty=True),
                      "views": list_of(text()), "patient_overlap": patient_overlap_check}
    defaults = {  # root: .../physionet.org/files/mimic-cxr-jpg/2.0.0
        "reports_root": None,  # where mimic-cxr-reports.zip was extracted, if not beside the images
        "sections": ["impression", "findings"],
        "views": ["PA", "AP"],
        "labeler": "chexpert",  # chexpert | negbio: which label CSV
        "uncertain_policy": "zeros",
        "empty_reports": "skip",  # skip | error
        "patient_overlap": "refuse",  # refuse | repair: a subject in several official splits (bench/data/adapter.py)
    }
    synthetic = Synthetic("mimic-cxr-jpg", {"tiny": 96, "small": 2000, "medium": 12000},  # studies
                          "bench.data.synth.writers:write_mimic_cxr_jpg")

    def _csv(self, stem: str) -> tuple[pd.DataFrame, Path]:
        path = self.require(f"{stem}.csv", f"{stem}.csv.gz")
        return read_csv(path), path

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        cfg = self.cfg
        meta, meta_path = self._csv("mimic-cxr-2.0.0-metadata")
        require_columns(meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta_path)
        split, split_path = self._csv("mimic-cxr-2.0.0-split")
        require_columns(split, ["dicom_id", "split"], split_path)
        unknown = ~split["split"].isin(["train", "validate", "test"])
        if unknown.any():
            i = int(unknown.to_numpy().argmax())
            raise UserError(f"{split_path}: line {i + 2}: split {split['split'].iloc[i]!r} is not train, "
                            f"validate or test")
        df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner")
        views = cfg.get("views", ["PA", "AP"])
        if views:
            df = df[df["ViewPosition"].isin(list(views))]
        labeler = cfg.get("labeler", "chexpert")
        labels, labels_path = self._csv(f"mimic-cxr-2.0.0-{labeler}")
        require_columns(labels, ["subject_id", "study_id", *LABELS], labels_path)
        raw = label_values(labels, LABELS, labels_path)
        labels = labels[["subject_id", "study_id"]].join(apply_uncertain_policy(raw, cfg.get("uncertain_policy",
                                                                                          "zeros")))
        df = df.merge(labels, on=["subject_id", "study_id"], how="left").fillna({c: 0.0 for c in LABELS})
        subject, study = df["subject_id"].astype(str), df["study_id"].astype(str)
        # string arithmetic over whole columns: Path objects per row would cost seconds on 377k images
        folder = str(self.root.absolute() / "files") + os.sep + "p" + subject.str[:2] + os.sep + "p" + subject + \
            os.sep + "s" + study + os.sep
        manifest = pd.DataFrame({
            "sample_id": df["dicom_id"].astype(str).values, "patient_id": subject.values,
            "image_path": (folder + df["dicom_id"].astype(str) + ".jpg").values,
            "split": df["split"].replace({"validate": "val"}).values, "study_id": study.values,
            **{c: df[c].to_numpy(dtype=float) for c in LABELS},
        })
        if with_reports:
            manifest = self._with_reports(manifest, subject, study)
        manifest.attrs["uncertain"] = count_uncertain(raw)
        return manifest.reset_index(drop=True)

    def _with_reports(self, manifest: pd.DataFrame, subject: pd.Series, study: pd.Series) -> pd.DataFrame:
        reports_root = Path(self.cfg.get("reports_root") or self.root).expanduser()
        sections = list(self.cfg.get("sections", ["impression", "findings"]))
        texts, empty = {}, []
        for s, t in dict.fromkeys(zip(subject, study)):
            path = reports_root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}.txt"
            texts[t] = self._report_text(path, sections)
            if not texts[t]:
                empty.append(path)
        if empty:
            message = (f"{len(empty)} of {len(texts)} studies have a missing or empty report "
                       f"(no {'/'.join(sections)} or last paragraph); first: {empty[0]}")
            if self.cfg.get("empty_reports", "skip") == "error":
                raise UserError(message)
            print(f"bench: mimic-cxr: skipped {message}", file=sys.stderr)
        manifest = manifest.assign(report=manifest["study_id"].map(texts).to_numpy())
        return manifest[manifest["report"].str.len() > 0]

    @staticmethod
    def _report_text(path: Path, sections: list[str]) -> str:
        """The wanted sections joined; failing those, the last paragraph (MIT-LCP's `last_paragraph`)."""
        try:
            raw = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise UserError(f"{path}: cannot be read ({exc})") from None
        found = report_sections(raw)
        text = " ".join(found[s] for s in sections if found.get(s))
        paragraphs = [p for p in re.split(r"\n\s*\n", raw) if p.strip()]
        if text or len(paragraphs) < 2:
            return text
        return " ".join(paragraphs[-1].split())

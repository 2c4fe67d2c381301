"""COVIDx (COVID-Net): headerless, space-separated label files `patient_id filename class data_source`.

Label files: config `label_files` maps split (train/val/test) to a file name under the root. By default
CXR-4's `train.txt`/`val.txt`/`test.txt` are used when `train.txt` exists, else the one `train_COVIDx*.txt`
with its `test_COVIDx*.txt` (the V5-V9 pairs). Every line is data: BenchX reads these files with
`read_csv(sep=" ")` and so loses each file's first image as a header; this reader never does.
Images are `<root>/<split>/<filename>`.

Task: the class values decide it. normal/pneumonia/COVID-19 (the "A" files) is MGCA's 3-class task,
scored by accuracy; positive/negative (the "B" files and CXR-4) is binary COVID-19, scored by AUROC.

Splits: each file's own. Without a val file, val is the training patients whose stable hash falls below
`val_fraction` (default 0.2, MGCA's 80/20 split of the official train). Patient ids are qualified by the
data source, since sources number their patients independently. A patient listed in several files (the
official files are meant to be patient-disjoint, and are not quite) is repaired by default when the dataset
is loaded, by the check every adapter shares (`patient_overlap: repair`, bench/data/adapter.py): their images
move to the split holding most of them (ties: test, then val), with a warning that counts them; `refuse`
stops instead.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from bench.core.checks import Check
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import Adapter, Synthetic, Task, fraction_setting, patient_fold, patient_overlap_check

np = lazy_module("numpy")
pd = lazy_module("pandas")

FIELDS = ["patient_id", "filename", "class", "data_source"]
SPLITS = ("train", "val", "test")
VOCABULARIES = {"3-class": ("normal", "pneumonia", "COVID-19"), "binary": ("positive", "negative")}


def read_label_file(path: Path) -> pd.DataFrame:
    """The four fields of every non-blank line, plus `line` (1-based) for error messages."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    fields = pd.Series(text.splitlines(), dtype=object).str.split()
    width = fields.str.len().to_numpy()
    bad = np.flatnonzero((width > 0) & (width != len(FIELDS)))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{path}: line {i + 1}: expected 4 space-separated fields "
                        f"({' '.join(FIELDS)}), found {width[i]}")
    keep = np.flatnonzero(width > 0)
    if not len(keep):
        raise UserError(f"{path}: holds no label lines")
    df = pd.DataFrame(fields.iloc[keep].tolist(), columns=FIELDS)
    df["line"] = keep + 1
    return df


@register_adapter
class Covidx(Adapter):
    name = "covidx"
    description = "COVIDx CXR: normal/pneumonia/COVID-19 (V5-V9A, accuracy) or COVID-19 positive/negative (CXR-4)"
    # root: the COVIDx folder holding the label .txt files and train/ (val/) test/
    defaults = {"label_files": None,  # null = auto; or {train: train_COVIDx9A.txt, test: test_COVIDx9A.txt}
                "patient_overlap": "repair"}  # refuse | repair: a patient in several files (bench/data/adapter.py)
    setting_checks: ClassVar[dict[str, Check]] = {"patient_overlap": patient_overlap_check}
    synthetic = Synthetic("COVIDx", {"tiny": 90, "small": 2000, "medium": 4000},  # patients, 60% test
                          "bench.data.synth.png_writers:write_covidx")

    def label_files(self) -> dict[str, Path]:
        """split -> label file, from the config or found by the documented rule."""
        configured = self.cfg.get("label_files")
        if configured:
            files = {str(split): self.root / str(name) for split, name in configured.items()}
            unknown = sorted(set(files) - set(SPLITS))
            if unknown:
                raise UserError(f"covidx: label_files has unknown split(s) {', '.join(unknown)}; "
                                f"valid splits: {', '.join(SPLITS)}")
        elif (self.root / "train.txt").exists():
            files = {split: self.root / f"{split}.txt" for split in SPLITS}
            files = {s: p for s, p in files.items() if s != "val" or p.exists()}
        else:
            trains = sorted(self.root.glob("train_COVIDx*.txt"))
            if len(trains) != 1:
                found = ", ".join(p.name for p in trains) or "none"
                raise UserError(f"covidx: {self.root} needs train.txt or exactly one train_COVIDx*.txt (found "
                                f"{found}); name the files with label_files={{train: ..., test: ...}}")
            files = {"train": trains[0], "test": trains[0].with_name("test_" + trains[0].name[len("train_"):])}
        for split in ("train", "test"):
            if split not in files:
                raise UserError(f"covidx: label_files names no {split} file")
        for path in files.values():
            if not path.is_file():
                raise UserError(f"covidx: label file {path} does not exist")
        return files

    @cached_property
    def _tables(self) -> dict[str, tuple[Path, pd.DataFrame]]:
        return {split: (path, read_label_file(path)) for split, path in self.label_files().items()}

    @cached_property
    def vocabulary(self) -> str:
        """`3-class` or `binary`, from the first class value; every other line must use the same one
        (an unknown first value fails the check against both vocabularies)."""
        first = next(iter(self._tables.values()))[1]
        vocabulary = next((v for v, names in VOCABULARIES.items() if first["class"].iloc[0] in names), None)
        for path, df in self._tables.values():
            allowed = VOCABULARIES[vocabulary] if vocabulary else sum(VOCABULARIES.values(), ())
            bad = np.flatnonzero(~df["class"].isin(allowed).to_numpy())
            if len(bad):
                row = df.iloc[int(bad[0])]
                raise UserError(f"{path}: line {row['line']}: unknown class {row['class']!r}; "
                                f"expected one of {', '.join(allowed)}")
        return vocabulary

    @cached_property
    def task(self) -> Task:
        if self.vocabulary == "3-class":
            return Task(labels=list(VOCABULARIES["3-class"]), multilabel=False, metric="acc")
        return Task(labels=["COVID-19"], multilabel=True, metric="auc")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        labels = self.task.labels
        frames = []
        for split, (path, df) in self._tables.items():
            # a repeated line is harmless; a file name repeated with another label or patient is not
            df = df.drop_duplicates(FIELDS)
            repeated = df["filename"].duplicated(keep=False).to_numpy()
            if repeated.any():
                lines = df["line"][repeated].tolist()
                raise UserError(f"{path}: lines {lines[0]} and {lines[1]}: file {df['filename'][repeated].iloc[0]!r} "
                                f"is listed twice with different fields")
            cls = df["class"]
            onehot = {c: (cls == c).to_numpy(float) for c in labels} if self.vocabulary == "3-class" \
                else {"COVID-19": (cls == "positive").to_numpy(float)}
            frames.append(pd.DataFrame({
                "sample_id": (f"{split}/" + df["filename"]).to_numpy(),
                "patient_id": (df["data_source"] + ":" + df["patient_id"]).to_numpy(),
                "image_path": (str(self.root.absolute() / split) + os.sep + df["filename"]).to_numpy(),
                "split": split,
                **onehot,
            }))
        manifest = pd.concat(frames, ignore_index=True)
        if "val" not in self._tables:
            fraction = fraction_setting(self.cfg, "val_fraction", 0.2)
            carve = (manifest["split"] == "train").to_numpy() & \
                (patient_fold(manifest["patient_id"], "covidx-val") < fraction)
            manifest.loc[carve, "split"] = "val"
        return manifest

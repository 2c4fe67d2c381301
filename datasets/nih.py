"""NIH ChestX-ray14: `Data_Entry_2017_v2020.csv` or `Data_Entry_2017.csv`, PNGs in `images_NNN/images/`.

The metadata header's bracketed names hold commas (`OriginalImage[Width,Height]`), so every CSV reader
splits them, and each line ends in a comma that adds an empty `Unnamed: NN` column; neither split column
is used here and the empty one is dropped. The v2020 file says `Patient Sex` where the original says
`Patient Gender`; either becomes the manifest's `sex` column.

Labels: the 14 findings of the pipe-joined `Finding Labels`, in REFERS/MRM order; `No Finding` is all zero.
Images: `images_*/images/`, `images_*/` and `images/` are listed once; a name found in none of them is
expected at `images/<name>`.
Splits: with the official `test_list.txt`, test is its images and every other image is train or val by
patient hash (`val_fraction`, default 0.1); `train_val_list.txt` is the complement and not needed.
Without it, a patient hash split: `val_fraction` val, `test_fraction` (default 0.2) test, the rest train.
A patient with images both in `test_list.txt` and outside it is refused when the dataset is loaded, as by
every adapter (`patient_overlap: refuse`, bench/data/adapter.py); `repair` moves their images to the split
holding most of them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from bench.core.checks import Check
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import (Adapter, Synthetic, finding_task, fraction_setting, hash_split, patient_fold,
                                patient_overlap_check, read_csv, require_columns)

np = lazy_module("numpy")
pd = lazy_module("pandas")

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
METADATA = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED = ["Image Index", "Finding Labels", "Patient ID"]


def _line(mask: np.ndarray) -> int:
    """The file line of the first True row (line 1 is the header)."""
    return int(np.flatnonzero(mask)[0]) + 2


def finding_matrix(findings: pd.Series, path: Path) -> np.ndarray:
    """rows x 14 floats from pipe-joined names. Work is per distinct combination (about 800 in 112k rows)."""
    codes, combos = pd.factorize(findings)
    if (codes < 0).any():
        raise UserError(f"{path}: line {_line(codes < 0)}: 'Finding Labels' is empty; "
                        f"expected {NO_FINDING!r} or finding names joined by '|'")
    column = {name: j for j, name in enumerate(LABELS)}
    table = np.zeros((len(combos), len(LABELS)))
    for k, combo in enumerate(combos):
        names = [name.strip() for name in combo.split("|")]
        unknown = [name for name in names if name not in column and name != NO_FINDING]
        if unknown:
            raise UserError(f"{path}: line {_line(codes == k)}: unknown finding {unknown[0]!r} in 'Finding Labels'; "
                            f"expected {NO_FINDING!r} or names from {', '.join(LABELS)}")
        table[k, [column[name] for name in names if name != NO_FINDING]] = 1.0
    return table[codes]


def read_list(path: Path) -> dict[str, int]:
    """Image name -> line number, from a split list: one name per line, optionally followed by labels
    (MRM/BenchX lists)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    return {line.split()[0]: i for i, line in enumerate(lines, 1) if line.strip()}


@register_adapter
class Nih(Adapter):
    name = "nih"
    description = "NIH ChestX-ray14: 14 findings from report NLP, multi-label AUROC"
    task = finding_task(LABELS, "auc")  # zero-shot names ("lung mass", ...): bench/evaluation/prompt_sets/*.yaml
    defaults = {  # root: .../ChestX-ray14 (Data_Entry_2017*.csv, images_0NN/images/)
        "metadata": None,  # null = Data_Entry_2017_v2020.csv, else Data_Entry_2017.csv
        "val_fraction": 0.1,
        "test_fraction": 0.2,  # only without the official train_val_list.txt/test_list.txt
        "patient_overlap": "refuse",  # refuse | repair: a patient in several splits (bench/data/adapter.py)
    }
    setting_checks: ClassVar[dict[str, Check]] = {"patient_overlap": patient_overlap_check}
    synthetic = Synthetic("ChestX-ray14", {"tiny": 100, "small": 1000, "medium": 5000},  # patients, 60% test
                          "bench.data.synth.png_writers:write_nih")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        metadata = self.cfg.get("metadata")
        path = self.require(*([metadata] if metadata else METADATA))
        # index_col=False: when the trailing commas are on the rows but not the header, pandas would
        # otherwise take the first column as the index and shift every name by one
        df = read_csv(path, dtype=str, index_col=False)
        df = df.loc[:, ~df.columns.str.startswith("Unnamed:")]
        require_columns(df, REQUIRED, path)
        for column in ("Image Index", "Patient ID"):
            blank = df[column].isna().to_numpy()
            if blank.any():
                raise UserError(f"{path}: line {_line(blank)}: {column!r} is empty")
        repeated = df["Image Index"].duplicated().to_numpy()
        if repeated.any():
            raise UserError(f"{path}: line {_line(repeated)}: image {df['Image Index'][repeated].iloc[0]!r} "
                            f"is listed twice")
        labels = finding_matrix(df["Finding Labels"], path)
        names, patients = df["Image Index"], df["Patient ID"].str.strip()
        manifest = pd.DataFrame({
            "sample_id": names.to_numpy(),
            "patient_id": patients.to_numpy(),
            "image_path": self._image_paths(names).to_numpy(),
            "split": self._splits(names, patients, path),
            **{c: labels[:, j] for j, c in enumerate(LABELS)},
        })
        sex = next((df[c] for c in ("Patient Gender", "Patient Sex") if c in df.columns), None)
        if sex is not None:
            manifest["sex"] = sex.to_numpy()
        return manifest

    def _image_paths(self, names: pd.Series) -> pd.Series:
        root = self.root.absolute()
        found: dict[str, str] = {}
        folders = [*sorted(root.glob("images_*/images")), *sorted(root.glob("images_*")), root / "images"]
        for folder in folders:
            if folder.is_dir():
                with os.scandir(folder) as entries:
                    for entry in entries:
                        found.setdefault(entry.name, entry.path)
        return names.map(found).fillna(str(root / "images") + os.sep + names)

    def _splits(self, names: pd.Series, patients: pd.Series, metadata: Path) -> np.ndarray:
        val = fraction_setting(self.cfg, "val_fraction", 0.1)
        test_list = self.root / "test_list.txt"
        if not test_list.exists():
            return hash_split(patients, "nih", val, fraction_setting(self.cfg, "test_fraction", 0.2))
        listed = read_list(test_list)
        absent = set(listed).difference(names)
        if absent:  # a list cut short ends in a partial name; one of other metadata names other images
            name = min(absent, key=listed.get)
            raise UserError(f"{test_list}: line {listed[name]}: image {name!r} is not in {metadata.name}")
        is_test = names.isin(list(listed)).to_numpy()
        return np.where(is_test, "test", np.where(patient_fold(patients, "nih-val") < val, "val", "train"))

"""PadChest (BIMCV, Hospital San Juan, Alicante; DATASETS.md §15): the image-only (unpaired) pretraining source.

Files: `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`, plain or gzipped (`metadata` names another file),
one row per image with an unnamed index first; the image, a 16-bit PNG, at `<root>/<ImageDir>/<ImageID>`
(folders `0` ... `54`). Every column is read as text: `PatientID` and `StudyID` are integers too long for 64 bits.
Images listed in a folder the root lacks (a partial download) stop the run naming the folder
(`missing_folders: error`) or are left out with a count (`skip`).

Views: rows whose `Projection` is one of `projections` (default `PA`, `AP`, `AP_horizontal`: the frontal views;
`[]` keeps every row, the lateral `L`, `COSTAL`, `EXCLUDE` and `UNK` too).

Labels: `Labels` is a Python-list string of English findings (`"['pleural effusion', 'pacemaker']"`). A listed
term of OBSERVATION_TERMS sets its CheXpert observation to 1, and `normal` sets No Finding; every observation no
listed term names is 0, since the lists name positive findings only (no uncertain or negated values). Terms
outside the table (`aortic elongation`, `kyphosis`, ...) set nothing. The table follows the CheXpert labeler's
mention lists, the labeler that labels MIMIC-CXR, so a finding reads as the same observation in both: the
opacity patterns are Lung Opacity, `heart insufficiency` is Edema (the labeler's "heart failure"), `pulmonary
fibrosis` is Pleural Other (where the labeler files "fibrosis"). A row whose `Labels` is blank, not a list of
text, or lists nothing is skipped with a count naming the first (`malformed_labels: skip`) or stops the run
(`error`). The terms as listed stay in the manifest's `padchest_labels` column, joined by `|`.

Task: the 14 observations, multi-label AUC, as MIMIC-CXR's. As the image-only corpus's labels (the disease-kind
prompts, the supervised control's heads) an observation no term lists is blank, not negative
(`labels_as_written`): a prompt states what the list names and denies nothing; the heads count blank as 0.

Splits: none official. By `PatientID` hash: `val_fraction` (default 0.1) val, `test_fraction` (0.2) test, the
rest train. Every image of a patient lands in one split, so the patient check every manifest goes through
(bench/data/adapter.py) can only fail on a bug and refuses it: no `patient_overlap` setting, as for RSNA and SIIM.

The `Report` column is stemmed Spanish and is not read: PadChest is no image-text (paired) source.
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

from bench.core.checks import Check, list_of, one_of, text
from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import Adapter, Synthetic, finding_task, fraction_setting, hash_split, read_csv, require_columns
from bench.datasets.chexpert import ALL_LABELS

np = lazy_module("numpy")
pd = lazy_module("pandas")

METADATA = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = ["ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels"]
FRONTAL = ("PA", "AP", "AP_horizontal")
# CheXpert observation -> the PadChest terms that state it (matched after stripping, ignoring case)
OBSERVATION_TERMS: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Cardiomegaly": ("cardiomegaly",),
    # the labeler's opacity words: opacity, infiltrate, increased density, interstitial and reticular patterns
    "Lung Opacity": ("infiltrates", "alveolar pattern", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern", "miliary opacities",
                     "increased density"),
    "Lung Lesion": ("nodule", "multiple nodules", "mass", "pulmonary mass", "lung metastasis"),
    "Edema": ("pulmonary edema", "heart insufficiency"),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "atelectasis basal", "total atelectasis", "round atelectasis"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Pleural Other": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening",
                      "pleural plaques", "calcified pleural plaques", "pulmonary fibrosis"),
    "Fracture": ("fracture", "rib fracture", "callus rib fracture", "clavicle fracture", "humeral fracture",
                 "vertebral fracture"),
    # tubes, lines and cardiac devices; not sutures, prostheses or osteosynthesis material
    "Support Devices": ("pacemaker", "dual chamber device", "single chamber device", "electrical device",
                        "NSG tube", "endotracheal tube", "tracheostomy tube", "chest drain tube", "catheter",
                        "central venous catheter", "central venous catheter via subclavian vein",
                        "central venous catheter via jugular vein", "central venous catheter via umbilical vein",
                        "reservoir central venous catheter"),
}
TERM_OBSERVATION = {term.lower(): obs for obs, terms in OBSERVATION_TERMS.items() for term in terms}
LABELS = list(ALL_LABELS)
EXAMPLE = "['normal']"


def listed_terms(value: object) -> tuple[str, ...] | None:
    """The findings a `Labels` cell lists (stripped, blanks and repeats dropped), or None where the cell is
    blank, not a Python list of text, or lists nothing."""
    if not isinstance(value, str):
        return None
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(t, str) for t in parsed):
        return None
    return tuple(dict.fromkeys(t.strip() for t in parsed if t.strip())) or None


def observations(terms: tuple[str, ...]) -> np.ndarray:
    """0/1 per observation of LABELS from the terms a row lists."""
    found = {TERM_OBSERVATION.get(t.lower()) for t in terms}
    return np.array([float(label in found) for label in LABELS])


@register_adapter
class PadChest(Adapter):
    name = "padchest"
    description = "PadChest: 160k images labelled with 174 findings (mapped to the 14 CheXpert observations, AUC)"
    task = finding_task(LABELS)
    defaults: ClassVar[dict[str, Any]] = {  # root: the folder holding the CSV and the image folders 0 ... 54
        "metadata": None,  # null = PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv, plain or .gz
        "projections": list(FRONTAL),  # rows kept, by Projection; [] = every row
        "val_fraction": 0.1,  # of patients, by PatientID hash (no official split)
        "test_fraction": 0.2,
        "malformed_labels": "skip",  # skip (counted on stderr) | error: a row whose Labels is blank or no list
        "missing_folders": "error",  # error | skip: images listed in a folder the root lacks (a partial download)
    }
    setting_checks: ClassVar[dict[str, Check]] = {
        "metadata": text(null=True), "projections": list_of(text()),
        "malformed_labels": one_of(("skip", "error")), "missing_folders": one_of(("error", "skip"))}
    synthetic = Synthetic("PadChest", {"tiny": 80, "small": 1200, "medium": 6000},  # patients, 1-2 studies, 70% train
                          "bench.data.synth.padchest_writer:write_padchest")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        metadata = self.cfg.get("metadata")
        path = self.require(*([metadata] if metadata else [METADATA, f"{METADATA}.gz"]))
        df = read_csv(path, dtype=str)
        df = df.loc[:, ~df.columns.str.startswith("Unnamed:")]  # the unnamed index
        require_columns(df, REQUIRED, path)
        df = df.assign(**{column: df[column].str.strip() for column in REQUIRED})
        for column in ("ImageID", "ImageDir", "PatientID"):
            _refuse(path, df, df[column].fillna("") == "", f"column {column!r} is empty")
        _refuse(path, df, ~df["ImageDir"].str.fullmatch(r"\d+", na=False),
                "column 'ImageDir' is {ImageDir!r}, not the number of an image folder (0 ... 54)")
        _refuse(path, df, df["ImageID"].duplicated(), "image {ImageID!r} is listed twice")
        projections = list(self.cfg.get("projections", FRONTAL))
        if projections:
            df = df[df["Projection"].isin(projections)]
        df = df.assign(ImageDir=df["ImageDir"].astype(int).astype(str))
        df = self._in_folders(df, path)
        codes, cells = pd.factorize(df["Labels"])
        terms = [listed_terms(cell) for cell in cells]
        bad = (codes < 0) | np.isin(codes, [k for k, t in enumerate(terms) if t is None])
        if bad.any():
            df, codes = self._malformed(df, codes, bad, path)
        table = np.array([observations(t) if t else np.zeros(len(LABELS)) for t in terms]).reshape(-1, len(LABELS))
        labels = table[codes]
        patients = df["PatientID"]
        return pd.DataFrame({
            "sample_id": df["ImageID"].to_numpy(),
            "patient_id": patients.to_numpy(),
            "image_path": (str(self.root) + os.sep + df["ImageDir"] + os.sep + df["ImageID"]).to_numpy(),
            "split": hash_split(patients, self.name, fraction_setting(self.cfg, "val_fraction", 0.1),
                                fraction_setting(self.cfg, "test_fraction", 0.2)),
            **{label: labels[:, j] for j, label in enumerate(LABELS)},
            "study_id": df["StudyID"].to_numpy(),
            "projection": df["Projection"].to_numpy(),
            "padchest_labels": ["|".join(terms[k]) for k in codes],
        })

    def labels_as_written(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """The lists name positive findings only: an observation no term lists was not mentioned (NaN), never
        denied, so a disease-kind prompt states what is listed and no "No X." for the rest (0 as evaluation
        labels, and for the supervised control's heads, which count blank as 0)."""
        labels = manifest.set_index("sample_id")[list(LABELS)]
        return labels.where(labels == 1)

    def _in_folders(self, df: pd.DataFrame, path: Path) -> pd.DataFrame:
        """The rows whose image folder is under the root; the others stop the run or are counted and left out."""
        folders = df["ImageDir"].unique()
        absent = [f for f in folders if not (self.root / f).is_dir()]
        if not absent:
            return df
        lost = df["ImageDir"].isin(absent)
        first = df.index[lost.to_numpy()][0]
        where = (f"{len(absent)} of the {len(folders)} image folders {path.name} names are not under {self.root} "
                 f"({int(lost.sum())} image(s); first: folder {df.at[first, 'ImageDir']!r}, line {first + 2})")
        if len(absent) == len(folders):
            raise UserError(f"{self.name}: {where}; images are expected at <root>/<ImageDir>/<ImageID>")
        if self.cfg.get("missing_folders", "error") == "error":
            raise UserError(f"{self.name}: {where}; set data.{self.settings_key()}.missing_folders=skip to read "
                            f"a partial download")
        print(f"bench: {self.name}: left out {where}", file=sys.stderr)
        return df[~lost]

    def _malformed(self, df: pd.DataFrame, codes: np.ndarray, bad: np.ndarray, path: Path
                   ) -> tuple[pd.DataFrame, np.ndarray]:
        first = df.index[bad][0]
        found = f"{int(bad.sum())} of {len(df)} image(s) have a blank 'Labels' or one that is not a list of " \
                f"findings such as \"{EXAMPLE}\" (first: line {first + 2}: {df.at[first, 'Labels']!r})"
        if self.cfg.get("malformed_labels", "skip") == "error":
            raise UserError(f"{path}: {found}; set data.{self.settings_key()}.malformed_labels=skip to leave them out")
        print(f"bench: {self.name}: skipped {found} in {path}", file=sys.stderr)
        return df[~bad], codes[~bad]


def _refuse(path: Path, df: pd.DataFrame, bad: pd.Series, problem: str) -> None:
    """One line naming the file, the file line of the first bad row and the problem (formatted with its cells)."""
    bad = bad.fillna(True).to_numpy(dtype=bool)
    if bad.any():
        row = df.iloc[int(np.flatnonzero(bad)[0])]
        raise UserError(f"{path}: line {row.name + 2}: {problem.format(**row.to_dict())}")

"""The common manifest, the task description every evaluator consumes, and what all adapters share.

A manifest is a pandas DataFrame with one row per image: `sample_id`, `patient_id`, `image_path`
(absolute), `split` (train/val/test, plus named evaluation sets such as CheXpert's `5x200`), one float
column per label of the task (0/1 after the uncertain-label policy; one-hot for multi-class tasks) and
`report` where the dataset has reports. Splits are patient-disjoint: every manifest goes through
`Adapter.patient_disjoint` when its dataset is loaded, which refuses a patient with images in several of
train, val and test, or with `data.<name>.patient_overlap: repair` moves them (`make_patient_disjoint`).
`manifest.attrs["uncertain"]` counts the raw uncertain (-1) values per label before any policy.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from omegaconf import DictConfig

from bench.core.checks import Check, one_of
from bench.core.errors import UserError
from bench.core.lazy import lazy_module

np = lazy_module("numpy")
pd = lazy_module("pandas")

MANIFEST_COLUMNS = ["sample_id", "patient_id", "image_path", "split"]
# the splits no patient may share; a named evaluation set (CheXpert's 5x200) is drawn from them on purpose
PATIENT_SPLITS = ("train", "val", "test")
# `data.<name>.patient_overlap`: what to do with a patient found in several PATIENT_SPLITS. Adapters whose split
# files can do that (MIMIC-CXR, CheXpert, NIH, COVIDx) declare it; the others split by patient hash, so only a bug
# could put a patient on both sides, and it is refused
PATIENT_OVERLAP = ("refuse", "repair")
patient_overlap_check = one_of(PATIENT_OVERLAP)


@dataclass(frozen=True)
class Task:
    labels: list[str]
    multilabel: bool  # False: exactly one of `labels` per sample (multi-class); a 1-label task is binary
    metric: str  # the metric the field reports for this dataset (DATASETS.md §11): "auc" or "acc"
    # zero-shot prompts are not part of a task: they are named, versioned data (bench/evaluation/prompt_sets.py)

    @property
    def kind(self) -> str:
        return "binary" if len(self.labels) == 1 else "multi-label" if self.multilabel else "multi-class"


def finding_task(labels: list[str], metric: str = "auc") -> Task:
    """A multi-label (or, with one label, binary) task."""
    return Task(labels=labels, multilabel=True, metric=metric)


@dataclass(frozen=True)
class Synthetic:
    """A dataset's copy in the built-in synthetic benchmark: the folder it is written to (named as the real
    download names it), how many items each size has, and the writer, `module:function` called as
    `function(folder, count, seed, workers, difficulty)` (named rather than imported, so that listing the adapters stays
    instant)."""

    folder: str
    counts: Mapping[str, int]
    writer: str


class Adapter:
    """Reads a dataset root into a manifest. A plug-in subclass (one module in datasets/, registered with
    `@register_adapter`) sets `name`, `task` and `description`, implements `read`, and declares:
    - `defaults`: its settings, which the configuration holds as `data.<name>` (with `root: null` first: null
      reads the synthetic copy), and `setting_checks`, the valid values of those that need more than their
      default's type;
    - `synthetic`: its copy in the synthetic benchmark (`Synthetic`), or None for a dataset without one;
    - `prompts`: zero-shot prompts for labels the shipped prompt sets do not cover, per prompt set
      ({set name: {label: class}} in the prompt-set file schema, bench/evaluation/prompt_sets.py);
    - `provides`: what it offers beyond labels (reports, masks, single-label test images), for the protocols
      that need it.
    A variant that reads another adapter's files and settings (chexpert-5x200) sets `config_key` to that
    adapter's name; its settings, synthetic copy and prompts are that adapter's (whatever it inherits).

    `read(with_reports=False)` may skip reading report text (metadata-only inspection of big corpora).
    """

    name: ClassVar[str] = ""
    config_key: ClassVar[str] = ""  # the `data.<key>` entry it reads, when not its own name
    task: Task  # a class attribute, or a property where the files decide it (COVIDx's two vocabularies)
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # valid values of its own settings (data.<key>.<setting>), checked with the rest of the configuration
    # before any work (bench.experiment.config_checks); a setting without one is checked against its default's type
    setting_checks: ClassVar[dict[str, Check]] = {}
    synthetic: ClassVar[Synthetic | None] = None
    prompts: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # what it offers beyond labels, for the protocols that need it (`Protocol.requires`): "reports" (each image's
    # report, `read(with_reports=True)`), "masks" (finding masks from its own annotations, `finding_mask`),
    # "single-label" (exactly one class per test image, for class-consistent retrieval)
    provides: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def settings_key(cls) -> str:
        """The `data.<key>` entry this adapter reads."""
        return cls.config_key or cls.name

    @classmethod
    def settings_owner(cls) -> type["Adapter"]:
        """The adapter whose settings, synthetic copy and prompts hold for this one: itself, or for a variant the
        adapter whose files it reads."""
        from bench.core.registry import DATASETS

        return DATASETS.get(cls.settings_key())

    @classmethod
    def is_variant(cls) -> bool:
        """Whether it reads another adapter's files and settings: then that adapter's declarations hold."""
        return cls.settings_key() != cls.name

    def __init__(self, root: str | Path, cfg: DictConfig | dict | None = None):
        self.root = Path(root).expanduser().absolute()
        self.cfg = cfg if cfg is not None else {}
        if not self.root.is_dir():
            raise UserError(f"{self.name}: data root {self.root} does not exist or is not a folder")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        raise NotImplementedError

    def finding_mask(self, row: Mapping[str, Any]) -> np.ndarray | None:
        """Ground truth of where row's image shows findings: a bool mask at the image file's resolution (all
        False for an image known to show none), or None where the dataset says nothing. `row` is a manifest
        row (`sample_id`, `image_path`, ...). By default the synthetic generator's sidecar beside the image
        (the union of its findings; `bench.data.finding_masks`); an adapter whose files carry annotations
        (SIIM's RLE masks, RSNA's boxes) reads those instead."""
        from bench.data.finding_masks import sidecar_mask

        return sidecar_mask(row["image_path"])

    def labels_as_written(self, manifest: pd.DataFrame) -> pd.DataFrame | None:
        """The task's labels of `manifest` as the files state them, indexed by sample id, for the disease-kind
        prompts of image-only pretraining: 1, 0 (stated negative), -1 (uncertain), NaN (not mentioned); None
        where the manifest's labels are that already. By default, for an adapter with an uncertainty policy
        (CheXpert, MIMIC-CXR), the files read again with `uncertain_policy: keep`."""
        if "uncertain_policy" not in self.cfg:
            return None
        from omegaconf import OmegaConf

        from bench.core.hashing import to_plain

        kept = type(self)(self.root, OmegaConf.create({**to_plain(self.cfg), "uncertain_policy": "keep"}))
        return kept.read(with_reports=False).set_index("sample_id")[self.task.labels]

    def patient_disjoint(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """`manifest` with no patient in several of train, val and test, by `data.<key>.patient_overlap` (the
        adapter's default where the settings lack it): the one patient check every adapter's manifest goes
        through when its dataset is loaded."""
        policy = self.cfg.get("patient_overlap", self.defaults.get("patient_overlap", "refuse"))
        setting = f"data.{self.settings_key()}.patient_overlap" if "patient_overlap" in self.defaults else None
        return make_patient_disjoint(manifest, f"{self.name} ({self.root})", policy, setting)

    def require(self, *names: str) -> Path:
        """The first of `names` that exists under the root, or a clear error naming what is missing."""
        for name in names:
            if (self.root / name).exists():
                return self.root / name
        raise UserError(f"{self.name}: {self.root} has none of {', '.join(names)}")


def patient_split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per split (columns in PATIENT_SPLITS order) of each patient with images in more than one of
    PATIENT_SPLITS, indexed by patient id (as text, sorted)."""
    main = manifest[manifest["split"].isin(PATIENT_SPLITS)]
    splits = main.groupby("patient_id")["split"].nunique()
    shared = main[main["patient_id"].isin(splits.index[splits > 1])]
    counts = pd.crosstab(shared["patient_id"].astype(str), shared["split"]) if len(shared) else pd.DataFrame()
    return counts.reindex(columns=[s for s in PATIENT_SPLITS if s in counts.columns]).sort_index()


def patients_in_several_splits(manifest: pd.DataFrame) -> list[str]:
    """Patients with images in more than one of train, val and test, sorted."""
    return list(patient_split_counts(manifest).index)


def make_patient_disjoint(manifest: pd.DataFrame, dataset: str, policy: str = "refuse",
                          setting: str | None = "patient_overlap") -> pd.DataFrame:
    """`manifest` if no patient has images in several of train, val and test. Otherwise `policy` "refuse"
    raises an error naming the dataset, the count and an example; "repair" moves each such patient's images
    to the split holding most of them, and on a tie to the later of train, val, test (so a tie never takes
    images out of the official test set, and the fewest images change split otherwise), and says so on stderr.
    Rows of other splits (named evaluation sets) stay as they are. `setting` is the key that chooses the policy,
    named in the refusal (None for an adapter without one: it splits by patient itself)."""
    if policy not in PATIENT_OVERLAP:
        raise UserError(f"{setting} must be one of {', '.join(PATIENT_OVERLAP)}, got {policy!r}")
    counts = patient_split_counts(manifest)
    if counts.empty:
        return manifest
    example = counts.index[0]
    found = ", ".join(f"{n} in {split}" for split, n in counts.loc[example].items() if n)
    if policy == "refuse":
        # an adapter without the setting splits by patient itself: an overlap there is no file's to repair
        remedy = (f"fix the split files, or set {setting}=repair to move each such patient's images to the split "
                  f"holding most of them") if setting else "its splits are drawn by patient, so this is a bug"
        raise UserError(f"{dataset}: {len(counts)} patient(s) have images in more than one split (e.g. patient "
                        f"{example}: {found} image(s)); splits must be patient-disjoint: {remedy}")
    target = counts[counts.columns[::-1]].idxmax(axis=1)  # idxmax takes the first maximum: the later split
    patients = manifest["patient_id"].astype(str)
    moved = manifest["split"].isin(PATIENT_SPLITS) & patients.isin(target.index)
    out = manifest.copy()
    out.loc[moved, "split"] = patients[moved].map(target)
    changed = int((out["split"] != manifest["split"]).sum())
    print(f"bench: {dataset}: moved {changed} image(s) of {len(counts)} patient(s) found in several splits to the "
          f"split holding most of each one's images (ties: test, then val); e.g. patient {example}: {found} -> "
          f"{target[example]}", file=sys.stderr)
    return out


def patient_fold(patient_ids: Iterable[str], salt: str) -> np.ndarray:
    """A stable number in [0, 1) per patient: deterministic, patient-disjoint splits without stored state.
    Computed once per distinct patient, so a 200k-row manifest costs milliseconds."""
    ids = pd.Series(list(patient_ids), dtype=str)
    unique = ids.unique()
    values = {p: int.from_bytes(hashlib.sha256(f"{salt}:{p}".encode()).digest()[:8], "big") / 2**64
              for p in unique}
    return ids.map(values).to_numpy(dtype=float)


def fraction_setting(cfg, key: str, default: float) -> float:
    """A split fraction from an adapter's settings, checked to lie in [0, 1)."""
    value = cfg.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= value < 1:
        raise UserError(f"{key} must be in [0, 1), got {value}")
    return value


def hash_split(patient_ids: Iterable[str], salt: str, val: float, test: float) -> np.ndarray:
    """train/val/test by patient hash: the documented split for datasets without an official one."""
    if not (0 <= val and 0 <= test and val + test < 1):
        raise UserError(f"val and test fractions must be >= 0 and sum below 1, got {val} and {test}")
    u = patient_fold(patient_ids, salt)
    return np.where(u < test, "test", np.where(u < test + val, "val", "train"))


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with one-line errors naming the file (gzip is recognised by the suffix), and a file cut
    short or with a ragged row refused, naming the line: pandas would fill a row's missing fields with blanks."""
    try:
        df = pd.read_csv(path, **kwargs)
        short = short_row(path, kwargs.get("sep", ","), bool(kwargs.get("skipinitialspace", False)))
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError,
            ValueError, zlib.error, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({' '.join(str(exc).split())})") from None
    if short is not None:
        line, found, expected = short
        raise UserError(f"{path}: line {line}: {found} field(s) where the header has {expected}; the file is cut "
                        f"short or the row is ragged")
    return df


def short_row(path: Path, sep: str = ",", skipinitialspace: bool = False) -> tuple[int, int, int] | None:
    """(line, fields, header's fields) of the first row with fewer fields than the header, or with non-blank
    fields past it; None if every row is whole. Blank lines are skipped, as pandas skips them."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as fh:
        rows = csv.reader(fh, delimiter=sep, skipinitialspace=skipinitialspace)
        header = list(next(rows, None) or [])
        while header and not header[-1].strip():  # a trailing comma on the header alone adds no column
            header.pop()
        width = len(header)
        for row in rows:
            if any(field.strip() for field in row) and \
                    (len(row) < width or any(field.strip() for field in row[width:])):
                return rows.line_num, len(row), width
    return None


def require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        found = ", ".join(map(repr, df.columns[:20]))
        raise UserError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (found {found})")


def label_values(df: pd.DataFrame, columns: list[str], path: Path, allowed: tuple[float, ...] = (1.0, 0.0, -1.0),
                 header_lines: int = 1) -> pd.DataFrame:
    """The label columns as floats (blank = NaN); any other value is an error naming file, line and column."""
    out = {}
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = (values.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")) | \
            (values.notna() & ~values.isin(allowed))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: line {i + 1 + header_lines}: column {col!r} has value {str(df[col].iloc[i])!r}; "
                            f"expected one of {', '.join(map(str, allowed))} or blank")
        out[col] = values.astype(float)
    return pd.DataFrame(out, index=df.index)


def count_uncertain(raw: pd.DataFrame) -> dict[str, int]:
    return {str(c): int((raw[c] == -1.0).sum()) for c in raw.columns}

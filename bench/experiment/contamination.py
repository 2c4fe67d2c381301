"""Evaluation data inside pretraining: which of a run's pretraining sources overlap a dataset it is evaluated
on, by the same dataset (one adapter's files, variants included), the same patients (within one dataset,
where patient ids mean the same person) or the same image files (one path read by two adapters).

Every record of a pretrained model carries what this finds for its dataset (`contamination`: empty when
clean), `bench table` marks the cell, and a run that pretrains on an evaluated dataset says so when it
starts. Files are compared by normalised absolute path: a copy of an image under another path, or a dataset
drawn from another (RSNA Pneumonia and SIIM-ACR re-use NIH ChestX-ray14 images under new ids), is not found."""
from __future__ import annotations

import os
import sys

import pandas as pd
from omegaconf import DictConfig

from bench.core.registry import DATASETS
from bench.data.loading import LoadedDataset, load_dataset
from bench.experiment.identity import corpus_sources


def _family(name: str) -> str:
    return DATASETS.get(name).settings_owner().name


def same_dataset_sources(cfg: DictConfig, evaluated: str) -> list[tuple[str, str]]:
    """(kind, source) of the pretraining sources this method reads that are the evaluated dataset, or share its
    files (a variant such as chexpert-5x200)."""
    family = _family(evaluated)
    return [(kind, name) for kind, names in corpus_sources(cfg).items() for name in names if _family(name) == family]


def announce(cfg: DictConfig) -> None:
    """One line per evaluated dataset that pretraining also reads: said when a run starts."""
    from bench.evaluation.protocol import evaluated_datasets

    for evaluated in evaluated_datasets(cfg):
        for kind, name in same_dataset_sources(cfg, evaluated):
            print(f"bench: data.corpus.{kind} reads {name}, and the evaluation reads {evaluated}: its labels or "
                  f"images are seen in pretraining, so its records are marked contaminated "
                  f"(set data.corpus.{kind} to a dataset that is not evaluated to avoid it)", file=sys.stderr)


def _paths(frame: pd.DataFrame) -> set[str]:
    return {os.path.normpath(os.path.abspath(p)) for p in frame["image_path"].astype(str)}


def pretraining_overlap(cfg: DictConfig, evaluated: LoadedDataset, loaded: dict[str, LoadedDataset]) -> list[dict]:
    """What of `evaluated` the run of `cfg` saw in pretraining, one entry per overlapping source: {"source",
    "kind", "how": [same dataset | patients | images], "patients", "images"}: how many of the evaluated
    dataset's val and test patients, and of its image files (any split), are among the source's training rows.
    Sources are loaded into `loaded` (by name) once, and taken from it when there."""
    held_out = evaluated.manifest[evaluated.manifest["split"] != "train"]
    family = _family(evaluated.name)
    found = []
    for kind, names in corpus_sources(cfg).items():
        for name in names:
            if name not in loaded:
                loaded[name] = load_dataset(cfg, name)
            source = loaded[name]
            train = source.manifest[source.manifest["split"] == "train"]
            same = _family(name) == family
            patients = len(set(train["patient_id"].astype(str)) & set(held_out["patient_id"].astype(str))) \
                if same else 0
            images = len(_paths(train) & _paths(evaluated.manifest))
            how = [h for h, hit in (("same dataset", same), ("patients", patients), ("images", images)) if hit]
            if how:
                found.append({"source": name, "kind": kind, "how": how, "patients": patients, "images": images})
    return found

"""Evaluation data inside pretraining is found and said: the same dataset, a planted patient, a shared file."""
import pandas as pd

from bench.data.loading import LoadedDataset
from bench.experiment.contamination import announce, pretraining_overlap, same_dataset_sources


def _loaded(name: str, rows: list[tuple[str, str, str]]) -> LoadedDataset:
    """A dataset of (patient, split, image path) rows; nothing else is read."""
    manifest = pd.DataFrame(rows, columns=["patient_id", "split", "image_path"])
    manifest["sample_id"] = manifest["image_path"]
    return LoadedDataset(name, manifest, None, None, None, None)


def test_a_planted_evaluation_patient_and_a_shared_file_are_found(tiny_cfg, tmp_path):
    cfg = tiny_cfg("mmclip", extra=("data.corpus.image_only=[chexpert]",))
    evaluated = _loaded("chexpert", [("p1", "test", f"{tmp_path}/a.jpg"), ("p2", "train", f"{tmp_path}/b.jpg")])
    clean_nih = _loaded("nih", [("n1", "test", f"{tmp_path}/n.png")])
    sources = {
        "mimic-cxr": _loaded("mimic-cxr", [("m1", "train", f"{tmp_path}/sub/../n.png")]),  # the same file as nih's
        "chexpert": _loaded("chexpert", [("p1", "train", f"{tmp_path}/c.jpg"), ("p3", "train", f"{tmp_path}/d.jpg")]),
    }
    found = pretraining_overlap(cfg, evaluated, sources)
    assert found == [{"source": "chexpert", "kind": "image_only", "how": ["same dataset", "patients"],
                      "patients": 1, "images": 0}]
    assert pretraining_overlap(cfg, clean_nih, sources) == [
        {"source": "mimic-cxr", "kind": "paired", "how": ["images"], "patients": 0, "images": 1}]
    # CLIP reads no image-only source: CheXpert stays clean for it
    clip = tiny_cfg("clip", extra=("data.corpus.image_only=[chexpert]",))
    assert pretraining_overlap(clip, evaluated, sources) == []


def test_a_run_that_pretrains_on_an_evaluated_dataset_says_so_when_it_starts(tiny_cfg, capsys):
    cfg = tiny_cfg("mmclip", extra=("data.corpus.image_only=[chexpert]", "eval.datasets=[chexpert-5x200,rsna]"))
    assert same_dataset_sources(cfg, "chexpert-5x200") == [("image_only", "chexpert")]
    assert same_dataset_sources(cfg, "rsna") == []
    announce(cfg)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.corpus.image_only reads chexpert, and the evaluation reads " \
                               "chexpert-5x200" in lines[0] and "contaminated" in lines[0]

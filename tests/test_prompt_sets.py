"""Zero-shot prompt sets as data: every shipped set loads and covers every label of every dataset task, the
GLoRIA expansion is GLoRIA's, and broken files fail with one line naming the file."""
import hashlib
import math
from pathlib import Path

import pytest
import yaml

from bench.core.errors import UserError
from bench.core.registry import DATASETS
from bench.data.adapter import Task
from bench.datasets.covidx import VOCABULARIES
from bench.evaluation.prompt_sets import (SETS_DIR, ClassPrompts, compose_prompts, get_prompt_set, load_prompt_set,
                                          prompt_set_names)

SHIPPED = ["chexzero", "class-names", "gloria", "medklip", "synthetic-reports"]


def dataset_tasks() -> list[tuple[str, list[str]]]:
    """(dataset, labels) of every registered task; COVIDx's depends on its files, so both vocabularies."""
    out = []
    for name in DATASETS.names():
        task = DATASETS.get(name).task
        if isinstance(task, Task):
            out.append((name, task.labels))
        elif name == "covidx":
            out += [(name, list(VOCABULARIES["3-class"])), (name, ["COVID-19"])]
        else:
            pytest.fail(f"{name}: the task is decided by the files; list its label vocabularies here")
    return out


def test_the_shipped_sets_are_listed():
    assert prompt_set_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_set_loads_and_covers_every_label_of_every_dataset(name):
    prompt_set = get_prompt_set(name)
    assert prompt_set.name == name and prompt_set.version >= 1 and prompt_set.id == f"{name}@v{prompt_set.version}"
    assert prompt_set.description and prompt_set.source and prompt_set.path == SETS_DIR / f"{name}.yaml"
    assert prompt_set.sha256 == hashlib.sha256(prompt_set.path.read_bytes()).hexdigest()
    tasks = dataset_tasks()
    assert {d for d, _ in tasks} == set(DATASETS.names()) and len(tasks) >= 8
    for dataset, labels in tasks:
        prompts = prompt_set.for_task(dataset, labels)
        assert list(prompts) == labels
        for label, p in prompts.items():
            assert isinstance(p, ClassPrompts) and p.positive, (dataset, label)
            assert all(isinstance(t, str) and t == " ".join(t.split()) and t for t in p.positive + p.negative)


def test_nih_and_mimic_and_covidx_label_spellings_are_covered():
    nih = DATASETS.get("nih").task.labels
    assert "Pleural_Thickening" in nih and "Effusion" in nih
    assert set(DATASETS.get("mimic-cxr").task.labels) >= {"No Finding", "Support Devices", "Pleural Other"}
    names = get_prompt_set("class-names").for_task("nih", nih)
    assert {k: names[k].positive[0] for k in ("Pleural_Thickening", "Mass", "Nodule", "Hernia", "Effusion")} == {
        "Pleural_Thickening": "pleural thickening", "Mass": "lung mass", "Nodule": "lung nodule",
        "Hernia": "hiatal hernia", "Effusion": "pleural effusion"}
    covid = get_prompt_set("class-names").for_task("covidx", ["normal", "pneumonia", "COVID-19"])
    assert covid["COVID-19"].positive == ("covid-19 pneumonia",)


def test_chexzero_is_class_names_with_no_negatives():
    chexzero, names = get_prompt_set("chexzero"), get_prompt_set("class-names")
    assert chexzero.labels() == names.labels()
    for label in names.labels():
        plain = names.classes[label]
        assert plain.negative == () and len(plain.positive) == 1 and plain.positive[0] == plain.positive[0].lower()
        assert chexzero.classes[label].positive == plain.positive
        assert chexzero.classes[label].negative == tuple(f"no {p}" for p in plain.positive)


def test_which_sets_have_negatives():
    for name in SHIPPED:
        prompt_set = get_prompt_set(name)
        every = [p for p in prompt_set.classes.values()] + \
            [p for block in prompt_set.datasets.values() for p in block.values()]
        has = {bool(p.negative) for p in every}
        assert has == ({True} if name in ("chexzero", "synthetic-reports") else {False}), name


# --- GLoRIA ------------------------------------------------------------------------------------------------

def _raw(name: str) -> dict:
    return yaml.safe_load((SETS_DIR / f"{name}.yaml").read_text())


def test_gloria_expansion_counts_sampling_and_typo_fix():
    raw, prompt_set = _raw("gloria"), get_prompt_set("gloria")
    assert raw["seed"] == 6
    composed = {k: v for k, v in raw["classes"].items() if "compose" in v}
    assert len(composed) >= 20
    for label, entry in composed.items():
        slots = entry["compose"]
        assert len(compose_prompts(slots)) == math.prod(map(len, slots))
        drawn = prompt_set.classes[label].positive
        assert entry["sample"] == 5 and len(drawn) == 5 and len(set(drawn)) == 5, label
        assert set(drawn) <= {" ".join(p.split()) for p in compose_prompts(slots)}
    assert math.prod(map(len, composed["Atelectasis"]["compose"])) == 3 * 7 * 10
    assert math.prod(map(len, composed["Pleural Effusion"]["compose"])) == 6 * 3 * 3
    every = [p for c in prompt_set.classes.values() for p in c.positive]
    assert not [p for p in every if "uppper" in p]
    assert "at the right upper lobe" in composed["Consolidation"]["compose"][2]
    assert prompt_set.classes["Effusion"] == prompt_set.classes["Pleural Effusion"]


def test_gloria_draws_are_deterministic_and_glorias_own(tmp_path):
    copy = tmp_path / "gloria-copy.yaml"
    copy.write_bytes((SETS_DIR / "gloria.yaml").read_bytes())
    again = load_prompt_set(copy)  # parsed afresh (another path)
    shipped = get_prompt_set("gloria")
    assert dict(again.classes) == dict(shipped.classes) and again.sha256 == shipped.sha256
    # Python's random.seed(6) then random.sample(prompts, 5) class after class over GLoRIA's own dictionary
    # (typo included), computed once with GLoRIA's loop
    assert shipped.classes["Atelectasis"].positive == (
        "minimal residual atelectasis at the left lung zone", "minimal subsegmental atelectasis at the left lung base",
        "trace atelectasis at the mid lung zone", "mild bandlike atelectasis at the lung bases",
        "minimal bandlike atelectasis at the right lung base")
    assert shipped.classes["Consolidation"].positive[:2] == (
        "apperance of bilateral consolidation at the right lung base",
        "improved patchy consolidation at the lower lung zone")
    assert shipped.classes["Pleural Effusion"].positive == (
        "increased left subpulmonic pleural effusion", "stable tiny bilateral pleural effusion",
        "large tiny subpulmonic pleural effusion", "decreased tiny subpulmonic pleural effusion",
        "tiny bilateral pleural effusion")


def test_compose_collapses_the_spaces_of_empty_slots(tmp_path):
    path = _write(tmp_path, "classes:\n  Edema: {compose: [[\"\", mild], [pulmonary edema], [\"\"]]}\n")
    assert load_prompt_set(path).classes["Edema"].positive == ("pulmonary edema", "mild pulmonary edema")
    assert compose_prompts([["", "mild"], ["pulmonary edema"], [""]]) == [" pulmonary edema ", "mild pulmonary edema "]


# --- names, versions, user files, errors ---------------------------------------------------------------------

def test_names_and_versions():
    assert get_prompt_set("chexzero@v1") is get_prompt_set("chexzero")  # cached
    assert get_prompt_set("chexzero@1").id == "chexzero@v1"
    for bad in ("chexzero@v2", "nope", "nope@v1"):
        with pytest.raises(UserError) as err:
            get_prompt_set(bad)
        assert all(name in str(err.value) for name in SHIPPED), str(err.value)
    with pytest.raises(UserError, match="name@vN"):
        get_prompt_set("chexzero@latest")


def _write(tmp_path: Path, body: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text("name: mine\nversion: 2\ndescription: a test set\nsource: tests\n" + body)
    return path


def test_a_user_file_by_path_and_dataset_overrides_first(tmp_path):
    path = _write(tmp_path, """seed: 1
classes:
  Pneumonia: {positive: [pneumonia], negative: [no pneumonia]}
  Pneumothorax: {positive: [collapsed lung]}
datasets:
  rsna:
    Pneumonia: {positive: [lung opacity], note: RSNA boxes opacities}
  siim:
    Pneumothorax: {same_as: Pneumonia}
""")
    mine = get_prompt_set(str(path))
    assert (mine.id, mine.path) == ("mine@v2", path.resolve())
    assert mine.for_task("rsna", ["Pneumonia"])["Pneumonia"] == ClassPrompts(("lung opacity",))
    assert mine.for_task("nih", ["Pneumonia"])["Pneumonia"] == ClassPrompts(("pneumonia",), ("no pneumonia",))
    assert mine.for_task("siim", ["Pneumothorax"])["Pneumothorax"].positive == ("pneumonia",)
    assert mine.labels("rsna") == ["Pneumonia", "Pneumothorax"]
    with pytest.raises(UserError) as err:
        mine.for_task("nih", ["Pneumonia", "Mass", "Nodule"])
    assert str(path.resolve()) in str(err.value) and "'Mass', 'Nodule'" in str(err.value)
    # an edited file is read again
    path.write_text(path.read_text().replace("collapsed lung", "air in the pleural space"))
    assert get_prompt_set(str(path)).classes["Pneumothorax"].positive == ("air in the pleural space",)


def test_shipped_overrides_take_precedence():
    for name in ("medklip", "synthetic-reports"):
        prompt_set = get_prompt_set(name)
        rsna = prompt_set.for_task("rsna", ["Pneumonia"])["Pneumonia"]
        assert rsna == prompt_set.datasets["rsna"]["Pneumonia"] != prompt_set.classes["Pneumonia"]
        assert prompt_set.for_task("nih", ["Pneumonia"])["Pneumonia"] == prompt_set.classes["Pneumonia"]


@pytest.mark.parametrize("body, message", [
    ("classes: {Edema: [oops\n", "not valid YAML"),
    ("classes:\n  Edema: {negative: [no edema]}\n", "a class without positives"),
    ("classes:\n  Edema: {positive: [edema], compose: [[a]]}\n", "exactly one of positive, compose or same_as"),
    ("classes:\n  Edema: {positive: [edema], negatives: [no edema]}\n", "unknown key(s) negatives"),
    ("colour: blue\nclasses:\n  Edema: {positive: [edema]}\n", "unknown key(s) colour"),
    ("classes:\n  Edema: {positive: []}\n", "non-empty list"),
    ("classes:\n  Edema: {positive: [edema, 3]}\n", "is not text"),
    ("classes:\n  Edema: {positive: [edema]}\n  Edema: {positive: [oedema]}\n", "duplicate key 'Edema'"),
    ("classes:\n  Edema: {compose: [[a, b]], sample: 1}\n", "needs a top-level seed"),
    ("seed: 0\nclasses:\n  Edema: {compose: [[a, b]], sample: 3}\n", "3 exceeds the 2 composed prompts"),
    ("classes:\n  Edema: {compose: [[\"\", a], [\"\"]]}\n", "composes an empty prompt"),
    ("classes:\n  Edema: {positive: [edema], sample: 2}\n", "sample draws from compose"),
    ("classes:\n  Effusion: {same_as: Pleural Effusion}\n", "not a class of this set"),
    ("classes:\n  Edema: {positive: [edema]}\ndatasets:\n  nowhere: {Edema: {positive: [x]}}\n",
     "unknown dataset(s) nowhere"),
    ("classes: []\n", "must map label names"),
])
def test_malformed_files_fail_naming_the_file(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(UserError) as err:
        get_prompt_set(str(path))
    text = str(err.value)
    assert text.startswith(str(path.resolve())) and message in text and "\n" not in text, text


def test_bad_header_fields_and_missing_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad Name\nversion: 1\ndescription: d\nsource: s\nclasses: {A: {positive: [a]}}\n")
    with pytest.raises(UserError, match="name must be"):
        get_prompt_set(str(path))
    path.write_text("name: ok\nversion: one\ndescription: d\nsource: s\nclasses: {A: {positive: [a]}}\n")
    with pytest.raises(UserError, match="version must be"):
        get_prompt_set(str(path))
    path.write_text("name: ok\nversion: 1\nclasses: {A: {positive: [a]}}\n")
    with pytest.raises(UserError, match="missing key.*description, source"):
        get_prompt_set(str(path))
    with pytest.raises(UserError, match="does not exist"):
        get_prompt_set(str(tmp_path / "absent.yaml"))

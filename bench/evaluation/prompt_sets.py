"""Named, versioned zero-shot prompt sets, kept as data: one YAML file per set in bench/evaluation/prompt_sets/
(a dataset adapter may add blocks for its own labels: `Adapter.prompts`).

Zero-shot classification embeds each class's prompts with the text tower. Which prompts is a protocol
choice (DATASETS.md §10: CheXzero's "<finding>" / "no <finding>", GLoRIA's severity x subtype x location,
MedKLIP's entity descriptions), so the prompts are not part of a dataset's task: a run names a set, and
results record its id (`name@vN`) and the sha256 of its file.

File schema (unknown keys are errors):

    name: chexzero                 # lower case; a shipped set's file is <name>.yaml
    version: 1                     # bumped whenever a prompt changes
    description: ...               # what the set is, what it reproduces, what is harness-authored
    source: ...                    # where the text comes from
    seed: 6                        # only when a class draws a `sample`
    classes:                       # keyed by the label as the dataset tasks spell it
      Atelectasis: {positive: [atelectasis], negative: [no atelectasis]}
      Edema:
        compose: [["", mild], [pulmonary edema, interstitial edema]]   # slots: cartesian product
        sample: 5                  # optional: draw 5 of the composed prompts
        note: free text            # optional: provenance of this class
      Effusion: {same_as: Pleural Effusion}                           # the prompts of another class
    datasets:                      # optional per-dataset overrides (a label meaning something else there)
      rsna:
        Pneumonia: {positive: [...]}

A class has exactly one of `positive` (a list of prompts), `compose` (a list of slots, each a list of
phrases, expanded as the cartesian product in slot order, GLoRIA's `f"{severity} {subtype} {location}"`) or
`same_as`. Negatives (`negative`, a list) are optional per class: pos-vs-neg scoring needs them for every
label it scores, the other modes ignore them.

Whitespace: every prompt is stripped and inner runs of spaces become one. GLoRIA's code joins slots with
single spaces and so leaves leading, trailing and double spaces where a slot is "" (" cardiomegaly
unchanged "); its tokenizers ignore them, so collapsing changes no token. A prompt that is empty after
this is an error.

Sampling: `sample: N` draws N of the composed prompts with Python's `random.Random(seed).sample` over the
expansion in product order, before whitespace is collapsed. One generator, seeded once per file, serves
every sampling class in file order (`classes` first, then `datasets` blocks), just as GLoRIA's
`generate_chexpert_class_prompts` draws class after class from the global generator it seeds with
`random.seed(6)` at import. The draws are deterministic; adding a class after the others leaves theirs
unchanged. Composed prompts are kept as expanded: a phrase listed twice in a slot (GLoRIA's Pleural
Effusion subtype) yields the same prompt twice before sampling, as in the original.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from bench.core.errors import UserError

SETS_DIR = Path(__file__).with_name("prompt_sets")
TOP_KEYS = ("name", "version", "description", "source", "seed", "classes", "datasets")
REQUIRED_KEYS = ("name", "version", "description", "source", "classes")
CLASS_KEYS = ("positive", "negative", "compose", "sample", "same_as", "note")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class ClassPrompts:
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: int
    description: str
    source: str
    path: Path
    classes: Mapping[str, ClassPrompts] = field(default_factory=dict, repr=False, compare=False)
    datasets: Mapping[str, Mapping[str, ClassPrompts]] = field(default_factory=dict, repr=False, compare=False)
    digest: str = field(default="", repr=False)

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def sha256(self) -> str:
        """The sha256 of the file's bytes as loaded (results record it next to `id`)."""
        return self.digest

    def labels(self, dataset: str | None = None) -> list[str]:
        """The labels with prompts: every class, plus the overrides of `dataset`."""
        return sorted({*self.classes, *self.datasets.get(dataset or "", {})})

    def for_task(self, dataset: str, labels: list[str]) -> dict[str, ClassPrompts]:
        """The prompts of each label in order (the dataset's overrides first); a UserError naming the set's
        file and the labels without prompts if any has none."""
        overrides = self.datasets.get(dataset, {})
        out, missing = {}, []
        for label in labels:
            prompts = overrides.get(label) or self.classes.get(label)
            if prompts is None:
                missing.append(label)
            else:
                out[label] = prompts
        if missing:
            raise UserError(f"{self.path}: prompt set {self.id} has no prompts for {dataset} label(s) "
                            f"{', '.join(map(repr, missing))}; add them under classes (or datasets: {dataset})")
        return out


# --- loading -------------------------------------------------------------------------------------------

class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser where PyYAML has it: `bench list` reads every set), refusing a key
    given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def compose_prompts(slots: list[list[str]]) -> list[str]:
    """The cartesian product of the slots in order, each combination joined with single spaces (GLoRIA's
    f-string), whitespace not yet collapsed."""
    return [" ".join(parts) for parts in itertools.product(*slots)]


def normalize(prompt: str) -> str:
    """Strip the prompt and collapse inner whitespace runs to one space."""
    return " ".join(prompt.split())


class _Parser:
    def __init__(self, path: Path, seed: int | None):
        self.path = path
        self.seed = seed
        self.rng = random.Random(seed) if seed is not None else None

    def fail(self, where: str, what: str) -> UserError:
        return UserError(f"{self.path}: {where}: {what}")

    def texts(self, where: str, value: Any, allow_empty: bool = False) -> list[str]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of prompts, got {value!r}")
        for item in value:
            if not isinstance(item, str):
                raise self.fail(where, f"{item!r} is not text (quote it)")
            if not allow_empty and not item.strip():
                raise self.fail(where, "holds an empty prompt")
        return value

    def block(self, where: str, entries: Any) -> dict[str, ClassPrompts | str]:
        """Parse one mapping of label -> class entry, in file order; a `same_as` class holds its target's
        name until `resolve`."""
        if not isinstance(entries, dict) or not entries:
            raise self.fail(where, "must map label names to their prompts")
        parsed: dict[str, ClassPrompts | str] = {}
        for label, entry in entries.items():
            at = f"{where}.{label}"
            if not isinstance(label, str) or not label.strip():
                raise self.fail(where, f"label {label!r} is not a name (quote it)")
            if not isinstance(entry, dict):
                raise self.fail(at, "must be a mapping with positive, compose or same_as")
            unknown = [k for k in entry if k not in CLASS_KEYS]
            if unknown:
                raise self.fail(at, f"unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(CLASS_KEYS)}")
            kinds = [k for k in ("positive", "compose", "same_as") if k in entry]
            if len(kinds) != 1:
                raise self.fail(at, "needs exactly one of positive, compose or same_as"
                                + (f" (found {', '.join(kinds)})" if kinds else " (a class without positives)"))
            if "note" in entry and not isinstance(entry["note"], str):
                raise self.fail(at, "note must be text")
            if "sample" in entry and "compose" not in entry:
                raise self.fail(at, "sample draws from compose; this class has none")
            if kinds == ["same_as"]:
                if set(entry) - {"same_as", "note"}:
                    raise self.fail(at, "same_as takes the other class's prompts whole; drop the other keys")
                if not isinstance(entry["same_as"], str):
                    raise self.fail(at, f"same_as must name a class, got {entry['same_as']!r}")
                parsed[label] = entry["same_as"]
                continue
            if "positive" in entry:
                positive = [normalize(p) for p in self.texts(f"{at}.positive", entry["positive"])]
            else:
                positive = self.composed(at, entry)
            negative = [normalize(p) for p in self.texts(f"{at}.negative", entry["negative"])] \
                if "negative" in entry else []
            parsed[label] = ClassPrompts(tuple(positive), tuple(negative))
        return parsed

    def composed(self, at: str, entry: dict) -> list[str]:
        slots = entry["compose"]
        if not isinstance(slots, list) or not slots:
            raise self.fail(f"{at}.compose", "must be a non-empty list of slots, each a list of phrases")
        for i, slot in enumerate(slots):
            self.texts(f"{at}.compose[{i}]", slot, allow_empty=True)
        prompts = compose_prompts(slots)
        empty = next((p for p in prompts if not p.strip()), None)
        if empty is not None:
            raise self.fail(f"{at}.compose", "composes an empty prompt (every slot offers \"\")")
        if "sample" in entry:
            n = entry["sample"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise self.fail(f"{at}.sample", f"must be a positive whole number, got {n!r}")
            if n > len(prompts):
                raise self.fail(f"{at}.sample", f"{n} exceeds the {len(prompts)} composed prompts")
            if self.rng is None:
                raise self.fail(at, "sample needs a top-level seed, so that the draw is reproducible")
            prompts = self.rng.sample(prompts, n)
        return [normalize(p) for p in prompts]

    def resolve(self, where: str, parsed: dict[str, ClassPrompts | str],
                fallback: Mapping[str, ClassPrompts]) -> dict[str, ClassPrompts]:
        """Each `same_as` class gets its target's prompts (a class of the same block, else of `classes`)."""
        out = {}
        for label, value in parsed.items():
            if isinstance(value, str):
                found = parsed.get(value, fallback.get(value))
                if not isinstance(found, ClassPrompts):
                    hint = "itself a same_as class" if isinstance(found, str) else "not a class of this set"
                    raise self.fail(f"{where}.{label}.same_as", f"{value!r} is {hint}; name a class with prompts")
                value = found
            out[label] = value
        return out


def _parse(path: Path, data: bytes, declared: str = "{}") -> PromptSet:
    """The set in `data`, with the blocks dataset adapters declare for it (`declared`: JSON of
    {set name: {dataset: block}}, `Adapter.prompts`) joined as `datasets` blocks."""
    try:
        stream = io.StringIO(data.decode("utf-8"))
        stream.name = path.name  # PyYAML names it in its messages
        raw = yaml.load(stream, Loader=_Loader)  # a safe loader
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({_one_line(exc)})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a prompt set is a mapping with {', '.join(REQUIRED_KEYS)}; got {type(raw).__name__}")
    unknown = [str(k) for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(TOP_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    name, version = raw["name"], raw["version"]
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"{path}: name must be lower-case letters, digits, '.', '_' or '-', got {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: version must be a whole number >= 1, got {version!r}")
    for key in ("description", "source"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise UserError(f"{path}: {key} must be non-empty text")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"{path}: seed must be a whole number, got {seed!r}")
    parser = _Parser(path, seed)
    classes = parser.resolve("classes", parser.block("classes", raw["classes"]), {})
    overrides = raw.get("datasets") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: datasets must map dataset names to label overrides")
    if overrides:
        from bench.core.registry import DATASETS

        unknown = sorted(str(d) for d in overrides if d not in DATASETS.names())
        if unknown:
            raise UserError(f"{path}: datasets: unknown dataset(s) {', '.join(unknown)}; "
                            f"valid datasets: {', '.join(DATASETS.names())}")
    from_adapters = json.loads(declared).get(name, {})
    both = sorted(set(overrides) & set(from_adapters))
    if both:
        raise UserError(f"{path}: datasets: {', '.join(both)} also declare(s) prompts for {name} in the adapter; "
                        f"keep one")
    overrides = {**overrides, **from_adapters}
    datasets = {}
    for dataset, block in overrides.items():
        parsed = parser.resolve(f"datasets.{dataset}", parser.block(f"datasets.{dataset}", block), classes)
        datasets[dataset] = MappingProxyType(parsed)
    return PromptSet(name=name, version=version, description=" ".join(raw["description"].split()),
                     source=" ".join(raw["source"].split()), path=path, classes=MappingProxyType(classes),
                     datasets=MappingProxyType(datasets), digest=_digest(data, from_adapters))


def _digest(data: bytes, from_adapters: dict) -> str:
    """The sha256 of the file's bytes, and of the adapters' blocks for the set where there are any."""
    if from_adapters:
        data += b"\n# declared by dataset adapters\n" + json.dumps(from_adapters, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def adapter_prompts() -> str:
    """JSON of {prompt set: {dataset: block}}: the prompts every registered adapter declares (`prompts`)."""
    from bench.core.registry import DATASETS

    declared: dict[str, dict] = {}
    for cls in DATASETS.classes():
        for set_name, block in cls.prompts.items():
            declared.setdefault(set_name, {})[cls.name] = block
    return json.dumps(declared, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _load(path: Path, mtime_ns: int, size: int, declared: str) -> PromptSet:
    """One file, parsed once per (path, modification time, size, adapters' blocks): an edited user file is
    read again."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({_one_line(exc)})") from None
    return _parse(path, data, declared)


def load_prompt_set(path: str | Path) -> PromptSet:
    """A prompt set from any YAML file with the schema above (cached while the file is unchanged)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt set file {path} does not exist")
    path = path.resolve()
    stat = path.stat()
    return _load(path, stat.st_mtime_ns, stat.st_size, adapter_prompts())


@functools.lru_cache(maxsize=1)
def prompt_set_names() -> list[str]:
    """The shipped sets, by name (the file stems of bench/evaluation/prompt_sets/*.yaml)."""
    return sorted(p.stem for p in SETS_DIR.glob("*.yaml"))


def _is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def get_prompt_set(name: str) -> PromptSet:
    """A shipped set by `name` or `name@vN` (an error if its version is not N), or a user's YAML file by path."""
    text = str(name).strip()
    if _is_path(text):
        return load_prompt_set(text)
    base, at, wanted = text.partition("@")
    names = prompt_set_names()
    if base not in names:
        raise UserError(f"unknown prompt set {base!r}; valid prompt sets: {', '.join(names)} "
                        f"(or the path of a .yaml file with the same schema)")
    found = load_prompt_set(SETS_DIR / f"{base}.yaml")
    if found.name != base:
        raise UserError(f"{found.path}: name is {found.name!r}; a shipped set's name is its file name, {base!r}")
    if at:
        match = re.fullmatch(r"v?(\d+)", wanted)
        if not match:
            raise UserError(f"prompt set {text!r}: the version is written name@vN, e.g. {base}@v{found.version}")
        if int(match.group(1)) != found.version:
            raise UserError(f"prompt set {text!r} does not exist: {found.path} is {found.id}; "
                            f"valid prompt sets: {', '.join(names)} (name or name@vN)")
    return found

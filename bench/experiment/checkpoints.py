"""The models `bench eval` evaluates: one of our run folders (its own model, method and data settings), a
folder `bench export` wrote, or an external open_clip-format CLIP model."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.core.hashing import stable_hash
from bench.core.io import file_sha256
from bench.experiment.config import compose_config
from bench.experiment.config_checks import check_config, check_known, override_keys, plain_config
from bench.experiment.evaluating import Subject, subject_of_run
from bench.experiment.export import WEIGHTS, is_export, read_config
from bench.experiment.pretraining import build_method
from bench.modeling.method import Method


def run_folder(spec: str) -> tuple[Path, Path]:
    """(run folder, weights file) of a run folder or of its final.pt / checkpoint.pt."""
    path = Path(spec).expanduser()
    run_dir = path if path.is_dir() else path.parent
    weights = path if path.is_file() else next((run_dir / n for n in ("final.pt", "checkpoint.pt")
                                                if (run_dir / n).exists()), None)
    if not (run_dir / "config.yaml").exists() or weights is None:
        raise UserError(f"{spec}: not a run folder (needs config.yaml and final.pt or checkpoint.pt), not a `bench "
                        f"export` folder and not an external model spec (open_clip:MODEL[:PRETRAINED] or "
                        f"hf-hub:ORG/REPO)")
    return run_dir, weights


EVAL_OVERRIDES = ("eval.", "data.", "runtime.")  # what `bench eval` may set: not how the model was made


def load_checkpoint(spec: str, overrides: list[str], open_clip_config: str | None = None
                    ) -> tuple[DictConfig, Method, Subject]:
    """A model to evaluate: one of our runs (its own model/method/data config), or an open_clip-format CLIP model
    (its own preprocessing); the eval and runtime settings are the defaults with `overrides`, which may set
    eval.*, data.*, runtime.* and results_dir only (the model's own settings come with it)."""
    from bench.modeling.external import is_external_spec, load_external

    for item, key in zip(overrides, override_keys(overrides)):
        if "=" not in item or not key:
            raise UserError(f"malformed override {item!r}: expected key=value (e.g. eval.seeds=[0,1,2])")
        if key != "results_dir" and not key.startswith(EVAL_OVERRIDES):
            raise UserError(f"{item!r}: bench eval sets only eval.*, data.*, runtime.* and results_dir; how the model "
                            f"was made ({key.split('.')[0]}) comes from its checkpoint")
    if is_external_spec(spec):
        cfg = compose_config("clip", overrides=overrides)
        model = load_external(spec, open_clip_config, "cpu")
        OmegaConf.set_struct(cfg, False)
        cfg.method = {"name": "external", **model.identity}
        cfg.model.image = model.image_cfg
        digest = stable_hash(model.identity)
        return cfg, model, Subject("external", model.name, digest, 0, dict(model.identity), f"external-{digest[:16]}")
    exported = is_export(spec)
    if exported:
        made, written = read_config(Path(spec))
        weights = Path(spec).expanduser().resolve() / WEIGHTS
    else:
        run_dir, weights = run_folder(spec)
        made = run_config(run_dir)
    check_known(override_keys(overrides), plain_config(made))
    try:
        cfg = OmegaConf.merge(made, OmegaConf.from_dotlist(overrides))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's grammar errors: the override is at fault
        raise UserError(f"bad override in {' '.join(overrides)}: {str(exc).strip().splitlines()[0]}") from None
    check_config(cfg, made, reads_corpus=False)
    method = build_method(cfg, int(cfg.seed))
    load_weights(method, weights)
    if exported:  # the run it was exported from, whose records it shares: the same weights give the same numbers
        ident = written["identity"]
        digest = file_sha256(weights)
        checkpoint = {"path": str(weights), "sha256": digest, "exported_from": ident["checkpoint"]}
        return cfg, method, Subject(ident["method"], ident["ablation"], ident["pretrain_hash"],
                                    int(ident["pretrain_seed"]), checkpoint, digest[:16])
    subject = subject_of_run(made, weights)  # the pretraining's identity, whatever the overrides say
    if weights.name != "final.pt":  # an unfinished run's weights are not its pretrained model: another variant
        subject = Subject(subject.method, subject.ablation, stable_hash([subject.pretrain_hash, subject.feature_key]),
                          subject.pretrain_seed, subject.checkpoint, subject.feature_key)
    return cfg, method, subject


def run_config(run_dir: Path) -> DictConfig:
    """The run's model, method and data settings over today's defaults (settings added since then get their
    default); how to evaluate and run is left to the caller (today's `eval`, not what the run was evaluated with)."""
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    for key in ("eval", "runtime", "results_dir"):
        run_cfg.pop(key, None)
    defaults = compose_config(str(run_cfg.method.name))
    OmegaConf.set_struct(defaults, False)
    return OmegaConf.merge(defaults, run_cfg)


def load_weights(method: Method, weights: Path) -> None:
    """`weights` (a trainer's .pt, or an export's model.safetensors) into `method`; a UserError naming the file."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_model

            load_model(method, str(weights))
        else:
            method.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["model"])
    except Exception as exc:  # noqa: BLE001 - any unreadable or mismatched file gets the same clear message
        raise UserError(f"{weights}: cannot load these weights into {method.cfg.method.name} ({exc})") from None

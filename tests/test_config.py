import pytest

from bench.core.errors import UserError
from bench.core.registry import METHODS
from bench.experiment.config import ablation_names, compose_config
from bench.experiment.identity import config_hash, eval_hash, pretrain_hash


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_and_ablation_composes(method):
    for ablation in ablation_names(method):
        cfg = compose_config(method, ablation, 0, ["data.synthetic.size=tiny"])
        assert cfg.method.name == method and cfg.ablation == ablation
        for group in ("model", "data", "trainer", "eval", "runtime"):
            assert group in cfg


def test_ablation_overrides_the_method_switch():
    assert compose_config("clip").method.learn_temperature is True
    assert compose_config("clip", "fixed-temperature").method.learn_temperature is False
    assert compose_config("clip", "frozen-text").method.freeze_text is True


def test_overrides_and_presets_apply():
    cfg = compose_config("clip", "none", 3, ["trainer.budget.epochs=7", "model=base"])
    assert cfg.seed == 3 and cfg.trainer.budget.epochs == 7
    assert cfg.model.image.open_clip_name == "ViT-B-16" and cfg.model.image.image_size == 224


@pytest.mark.parametrize("args, expected", [
    (("nope", "none", []), "unknown method 'nope'; valid methods: clip"),
    (("clip", "nope", []), "valid ablations: none, fixed-temperature, frozen-text"),
    (("clip", "none", ["model=huge"]), "valid model options: base, tiny"),
    (("clip", "none", ["trainer.nonexistent=1"]), "trainer.nonexistent"),
    (("clip", "none", ["trainer.budget.epochs"]), "malformed override 'trainer.budget.epochs'"),
    (("clip", "none", ["trainer.budget.epochs=[1"]), "bad override"),
    (("clip", "none", ["data.nope.root=/x"]), "data.nope.root"),
])
def test_bad_input_is_one_clear_line(args, expected):
    with pytest.raises(UserError) as err:
        compose_config(args[0], args[1], None, args[2])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_hashes_separate_what_decides_the_numbers():
    a = compose_config("clip", "none", 0)
    b = compose_config("clip", "none", 1)
    c = compose_config("clip", "none", 0, ["runtime.num_workers=2", "results_dir=/elsewhere"])
    d = compose_config("clip", "none", 0, ["trainer.lr=0.1"])
    assert pretrain_hash(a) == pretrain_hash(b) and config_hash(a) != config_hash(b)  # seeds aggregate
    assert config_hash(a) == config_hash(c)  # how and where it runs does not matter
    assert pretrain_hash(a) != pretrain_hash(d)


def test_a_downstream_dataset_changes_its_evaluations_not_the_pretrained_model(tmp_path):
    a = compose_config("clip", "none", 0)
    rsna = compose_config("clip", "none", 0, [f"data.rsna.root={tmp_path}"])
    corpus = compose_config("clip", "none", 0, ["data.mimic-cxr.sections=[impression]"])
    assert pretrain_hash(a) == pretrain_hash(rsna) != pretrain_hash(corpus)
    assert eval_hash(a, "zero-shot", "rsna") != eval_hash(rsna, "zero-shot", "rsna")
    assert eval_hash(a, "zero-shot", "nih") == eval_hash(rsna, "zero-shot", "nih")

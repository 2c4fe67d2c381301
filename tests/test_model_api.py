"""The model as a library (bench.tools.model) and `bench export`: every input kind gives the features evaluation
computes, an export loads with nothing else and evaluates to the run's numbers, the README's example runs."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.core.errors import UserError
from bench.core.results import ResultsStore


@pytest.fixture(scope="module")
def untrained_mmclip():
    from bench import MMCLIPModel

    return MMCLIPModel(device="cpu", batch_size=2)


def test_every_image_input_kind_gives_the_evaluators_features(untrained_mmclip, data_home, tiny_cfg):
    from bench.data.image_datasets import ImagePreprocessor
    from bench.data.images import ImageCache

    tiny_cfg()
    model = untrained_mmclip
    jpg, dcm = next(data_home.rglob("*.jpg")), next(data_home.rglob("*.dcm"))
    size, image = model.image_size, model.cfg.model.image
    # what evaluation feeds the encoder for the same files: the cache's square, the dataset's preprocessing
    evaluated = torch.stack([ImagePreprocessor(size, image.mean, image.std, False)(ImageCache(None, size).get(p), None)
                             for p in (jpg, dcm)])
    expected = model.method.embed_image(evaluated)
    by_path = model.encode_image([str(jpg), dcm])  # str and Path; 2 images at batch_size 2 and 1 below
    assert by_path.shape == (2, model.cfg.model.embed_dim)
    torch.testing.assert_close(by_path, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_path.norm(dim=-1), torch.ones(2))
    with Image.open(jpg) as pil:
        rgb = np.array(pil.convert("RGB"))
        torch.testing.assert_close(model.encode_image(pil), expected[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_image(rgb), expected[:1], rtol=1e-5, atol=1e-6)  # H x W x 3 uint8
    torch.testing.assert_close(model.encode_image(rgb[..., 0]), expected[:1], rtol=1e-5, atol=1e-6)  # 2-D grey
    torch.testing.assert_close(model.encode_image(torch.from_numpy(rgb[..., 0])), expected[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_image(evaluated), expected, rtol=1e-5, atol=1e-6)  # preprocessed batch
    torch.testing.assert_close(model.encode_image(evaluated[1]), expected[1:], rtol=1e-5, atol=1e-6)
    # 16-bit and float arrays are stretched as 16-bit files are: the same picture gives the same features, up to
    # a grey level's rounding
    torch.testing.assert_close(model.encode_image(rgb[..., 0].astype(np.float32) / 255.0),
                               model.encode_image(rgb[..., 0].astype(np.uint16) * 257), rtol=0, atol=1e-4)
    for bad in ([], np.zeros((3, 4, 5, 6)), object(), torch.zeros(1, 3, 7, 7)):
        with pytest.raises(UserError):
            model.encode_image(bad)


def test_texts_similarity_and_zero_shot_labels(untrained_mmclip, data_home):
    model = untrained_mmclip
    jpg = str(next(data_home.rglob("*.jpg")))
    one = model.encode_text("Small right pleural effusion.")
    three = model.encode_text(["No acute findings.", "Small right pleural effusion.", "Cardiomegaly."])
    assert one.shape == (1, model.cfg.model.embed_dim) and three.shape == (3, model.cfg.model.embed_dim)
    torch.testing.assert_close(one[0], three[1], rtol=1e-5, atol=1e-6)  # batching changes nothing
    images, texts = model.encode([jpg, jpg], "Cardiomegaly.")
    assert images.shape[0] == 2 and texts.shape[0] == 1
    sims = model.similarity([jpg, jpg, jpg], ["a", "b"])
    assert sims.shape == (3, 2) and float(sims.abs().max()) <= 1.0 + 1e-5
    torch.testing.assert_close(sims[0], (images[:1] @ model.encode_text(["a", "b"]).T)[0], rtol=1e-5, atol=1e-6)
    probs = model.classify([jpg, jpg], ["Pneumonia", "Pleural Effusion"])
    assert list(probs.columns) == ["Pneumonia", "Pleural Effusion"] and list(probs.index) == [jpg, jpg]
    assert ((probs.to_numpy() > 0) & (probs.to_numpy() < 1)).all()
    exclusive = model.classify(jpg, ["Atelectasis", "Cardiomegaly", "Edema"], exclusive=True)
    np.testing.assert_allclose(exclusive.sum(axis=1).to_numpy(), 1.0, rtol=1e-5)
    with pytest.raises(UserError, match="its labels"):
        model.classify(jpg, ["Not A Finding"])
    with pytest.raises(UserError):
        model.encode_text([])


def test_export_loads_alone_and_evaluates_to_the_run_folders_numbers(tiny_cfg, data_home, tmp_path, monkeypatch):
    from bench import EmbeddingModel, MMCLIPModel, load_model
    from bench.cli import main
    from bench.experiment.chain import run_experiment

    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot,linear-probe]",
                          "eval.random_init_baseline=false", "trainer.budget.steps=2"))
    store = run_experiment(cfg)
    (run_dir,) = (store.root / "runs").iterdir()
    out = tmp_path / "export" / "clip"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert main(["export", str(run_dir), "--out", str(out)]) == 2  # never overwrites a folder
    written = json.loads((out / "config.json").read_text())
    assert written["method"] == "clip" and written["embed_dim"] == cfg.model.embed_dim
    assert written["preprocessing"]["image_size"] == cfg.model.image.image_size
    assert written["preprocessing"]["mean"] == cfg.model.image.mean
    assert written["identity"]["checkpoint"]["sha256"] and (out / "cost.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: medvlp-bench") and "### zero-shot: auc" in card and "rsna" in card

    jpg = str(next(data_home.rglob("*.jpg")))
    from_run, from_export = load_model(run_dir, device="cpu"), load_model(out, device="cpu")
    assert type(from_export) is EmbeddingModel and from_export.cfg.method.name == "clip"
    run_state, export_state = from_run.method.state_dict(), from_export.method.state_dict()
    assert run_state.keys() == export_state.keys()
    assert all(torch.equal(run_state[k], export_state[k]) for k in run_state)
    assert torch.equal(from_run.encode_image(jpg), from_export.encode_image(jpg))
    assert torch.equal(from_run.encode_text("Cardiomegaly."), from_export.encode_text("Cardiomegaly."))
    with pytest.raises(UserError, match="load_model"):
        MMCLIPModel.from_pretrained(out)
    # saved again unchanged, the export keeps the run's identity; changed, it gets one of its own
    resaved = from_export.save_pretrained(tmp_path / "resaved")
    assert json.loads((resaved / "config.json").read_text())["identity"] == written["identity"]
    with torch.no_grad():
        from_export.method.image_proj.weight.mul_(2.0)
    derived = json.loads(from_export.save_pretrained(tmp_path / "derived").joinpath("config.json").read_text())
    assert derived["identity"]["ablation"] == "derived"
    assert derived["identity"]["pretrain_hash"] != written["identity"]["pretrain_hash"]

    # the export alone: the results folder (its run, records, config) is gone, and it is read from elsewhere
    ran = {(r["protocol"], r["dataset"]): r for r in store.records()}
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), moved)
    shutil.rmtree(store.root)
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    assert main(["eval", "--checkpoint", str(moved), "--results-dir", str(other), "--dataset", "rsna",
                 "--protocol", "zero-shot", "--protocol", "linear-probe", "--fractions", "1",
                 "eval.bootstrap.resamples=200"]) == 0
    again = {(r["protocol"], r["dataset"]): r for r in ResultsStore(other).records()}
    assert again.keys() == ran.keys()
    for key, record in again.items():
        assert record["metrics"] == ran[key]["metrics"] and record["bootstrap"]["ci"] == ran[key]["bootstrap"]["ci"]
        assert record["pretrain_hash"] == ran[key]["pretrain_hash"]  # the run's records: the same model
        assert record["checkpoint"]["exported_from"]["sha256"] == ran[key]["checkpoint"]["sha256"]
        assert record["cost"] == ran[key]["cost"]


def test_a_pretrained_text_tower_is_exported_as_its_architecture(data_home, tmp_path):
    from bench import EmbeddingModel, load_model
    from bench.experiment.config import compose_config
    from bench.experiment.pretraining import build_method

    cfg = compose_config("clip", overrides=["model.text.pretrained=bundled-minilm"])
    model = EmbeddingModel.from_method(build_method(cfg, 0), cfg, device="cpu")
    out = model.save_pretrained(tmp_path / "minilm-clip")
    text = json.loads((out / "config.json").read_text())["config"]["model"]["text"]
    assert text["pretrained"] is None and text["tokenizer"] == "." and text["config"]["model_type"] == "bert"
    assert text["config"]["hidden_size"] == 384  # MiniLM's, not the preset's
    loaded = load_model(out, device="cpu")
    torch.testing.assert_close(loaded.encode_text(["No pneumothorax.", "Effusion."]),
                               model.encode_text(["No pneumothorax.", "Effusion."]), rtol=0, atol=0)


def test_models_without_a_joint_space_or_weights_are_refused(data_home, tmp_path):
    from bench import load_model
    from bench.experiment.config import compose_config
    from bench.experiment.pretraining import build_method
    from bench.tools.model import EmbeddingModel

    cfg = compose_config("mrm")
    with pytest.raises(UserError, match="no joint image-text space"):
        EmbeddingModel.from_method(build_method(cfg, 0), cfg, device="cpu")
    with pytest.raises(UserError, match="no such file or folder"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(UserError, match="hub repository could not be fetched"):
        load_model("nobody-here/no-such-model")  # HF_HUB_OFFLINE (conftest): the hub is never reached


def test_the_readmes_use_a_trained_model_example_runs_verbatim(untrained_mmclip, data_home, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use a trained model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    untrained_mmclip.save_pretrained("exports/mmclip")  # what `bench export` writes, from an untrained model
    identity = json.loads(Path("exports/mmclip/config.json").read_text())["identity"]
    # random weights never take the key of `bench run --method mmclip`'s records
    from bench.experiment.identity import pretrain_hash

    assert identity["ablation"] == "untrained" and identity["pretrain_hash"] != pretrain_hash(untrained_mmclip.cfg)
    Path("path/to/xray").mkdir(parents=True)
    shutil.copyfile(next(data_home.rglob("*.jpg")), "path/to/xray/image.jpg")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image_features"].shape == scope["text_features"].shape == (1, untrained_mmclip.cfg.model.embed_dim)


def test_an_export_that_would_not_rebuild_the_same_model_is_refused(untrained_mmclip, tmp_path, monkeypatch):
    import random

    import bench.tools.export as export
    from bench.experiment.export import read_config

    def lossy(folder):  # a rebuilt configuration that lost a setting the weights cannot show
        cfg, written = read_config(folder)
        cfg.model.text.pooling = "cls" if cfg.model.text.pooling == "mean" else "mean"
        return cfg, written

    monkeypatch.setattr(export, "read_config", lossy)
    with pytest.raises(UserError, match="other features"):
        untrained_mmclip.save_pretrained(tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists() and not list(tmp_path.glob(".tmp-*"))
    # loading a model leaves the caller's random streams alone
    random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    monkeypatch.undo()
    untrained_mmclip.save_pretrained(tmp_path / "fine")  # builds the rebuilt model
    assert (random.random(), torch.rand(1)) == expected

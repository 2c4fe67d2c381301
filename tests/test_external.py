"""bench/modeling/external.py: open_clip-format CLIP models we did not train, built offline from a tiny custom config."""
from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid

import pytest
import torch

import bench  # noqa: F401  (its import hook lets open_clip's torchvision import on a CPU torch)
from bench.core.errors import UserError
from bench.data.batch import TextBatch
from bench.modeling.external import ExternalCLIP, is_external_spec, load_external

open_clip = pytest.importorskip("open_clip")


def tiny_config(width: int = 64, layers: int = 2) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def unique_name(prefix: str = "tiny-test") -> str:
    """open_clip's model registry is global: each test registers its own name so none sees another's config."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_model(tmp_path, name: str, width: int = 64, seed: int = 0, wrap: bool = False, layers: int = 2):
    """(config json, weights .pt, the model whose state dict was saved) for a tiny open_clip CLIP."""
    folder = tmp_path / f"cfg-{width}-{layers}-{seed}"
    folder.mkdir(exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(tiny_config(width, layers)))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**tiny_config(width, layers)).eval()
    with torch.no_grad():  # a logit scale other than the init value, so loading it is visible
        model.logit_scale.fill_(2.5)
    weights = folder / "weights.pt"
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, weights)
    return config, weights, model


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Any attempt to reach the network fails at once (so a test can never hang on it), the hub is in offline
    mode and its cache is an empty folder."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture()
def tiny(tmp_path, no_network):
    name = unique_name()
    config, weights, model = write_model(tmp_path, name)
    loaded = load_external(f"open_clip:{name}:{weights}", model_config=str(config))
    return name, config, weights, model, loaded


def test_is_external_spec():
    assert is_external_spec("open_clip:ViT-B-16:laion2b_s34b_b88k")
    assert is_external_spec("open_clip:ViT-B-16")
    assert is_external_spec("open_clip:tiny:/abs/path/w.pt")
    assert is_external_spec("hf-hub:org/repo")
    assert is_external_spec("open_clip:hf-hub:org/repo")
    assert not is_external_spec("results/clip-none-seed0")
    assert not is_external_spec("/abs/run/checkpoints/last.pt")
    assert not is_external_spec("last.pt")
    assert not is_external_spec("ViT-B-16")
    assert not is_external_spec("openclip:ViT-B-16")
    assert not is_external_spec("")


def test_loaded_model_matches_the_saved_one(tiny):
    name, _, weights, model, loaded = tiny
    assert isinstance(loaded, ExternalCLIP) and loaded.joint_space
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, 49407, (3, 16))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)
        assert torch.allclose(loaded.embed_image(images), model.encode_image(images, normalize=True), atol=1e-5)
        text = TextBatch(ids, torch.ones_like(ids))
        assert torch.allclose(loaded.embed_text(text), model.encode_text(ids, normalize=True), atol=1e-5)
    assert float(loaded.logit_scale.detach()) == pytest.approx(2.5)
    assert loaded.image_width == 32
    assert loaded.name == f"open_clip:{name}:weights.pt"
    assert not loaded.training


def test_a_wrapped_state_dict_loads_too(tmp_path, no_network):
    name = unique_name()
    config, weights, model = write_model(tmp_path, name, wrap=True)
    loaded = load_external(f"open_clip:{name}:{weights}", model_config=str(config))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)


def test_embeddings_are_unit_norm_and_tokenizer_shapes(tiny):
    *_, loaded = tiny
    batch = loaded.tokenizer(["no acute cardiopulmonary process", "small left pleural effusion",
                              "a much longer report " * 20])
    assert isinstance(batch, TextBatch)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, 16)
    assert batch.input_ids.dtype == torch.long
    assert batch.attention_mask[0].sum() < 16 and bool(batch.attention_mask[2].all())  # padding, truncation
    assert bool((batch.attention_mask == (batch.input_ids != 0).long()).all())
    assert loaded.tokenizer.max_length == 16
    with torch.no_grad():
        text = loaded.embed_text(batch)
        image = loaded.embed_image(torch.randn(4, 3, 32, 32))
    assert text.shape == (3, 32) and image.shape == (4, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-5)
    features = loaded.encode_image(torch.randn(2, 3, 32, 32))
    assert torch.allclose(loaded.project_image(features).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_image_cfg_is_the_models_preprocessing(tiny):
    *_, model, loaded = tiny
    cfg = loaded.image_cfg
    assert cfg.image_size == 32 and cfg.channels == 3
    pp = open_clip.get_model_preprocess_cfg(model) or {}
    assert list(cfg.mean) == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))  # open_clip's default for a file
    assert list(cfg.std) == pytest.approx(list(open_clip.OPENAI_DATASET_STD))
    assert set(cfg.keys()) == {"image_size", "mean", "std", "channels"}
    assert pp is not None


def test_identity_records_the_files(tiny):
    name, config, weights, _, loaded = tiny
    ident = loaded.identity
    assert ident["spec"] == f"open_clip:{name}:{weights}"
    assert ident["model"] == name
    assert ident["pretrained"] == str(weights.resolve())
    assert ident["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ident["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()


def test_reregistering_a_name_takes_the_new_config(tmp_path, no_network):
    """Two configs of the same name one after another: each load builds the architecture it was given."""
    name = unique_name()
    config64, weights64, _ = write_model(tmp_path, name, width=64)
    config96, weights96, _ = write_model(tmp_path, name, width=96, seed=1)
    assert load_external(f"open_clip:{name}:{weights96}", model_config=str(config96)).model.visual.conv1.out_channels == 96
    assert load_external(f"open_clip:{name}:{weights64}", model_config=str(config64)).model.visual.conv1.out_channels == 64


def test_missing_weights_file(tmp_path, no_network):
    name = unique_name()
    config, _, _ = write_model(tmp_path, name)
    missing = tmp_path / "nowhere" / "w.pt"
    with pytest.raises(UserError, match=r"weights file .*w\.pt does not exist") as err:
        load_external(f"open_clip:{name}:{missing}", model_config=str(config))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_missing_model_config(tmp_path, no_network):
    with pytest.raises(UserError, match="model config .* does not exist"):
        load_external("open_clip:tiny-x:/x/w.pt", model_config=str(tmp_path / "tiny-x.json"))


def test_model_config_must_be_named_after_the_model(tmp_path, no_network):
    name = unique_name()
    config, weights, _ = write_model(tmp_path, name)
    with pytest.raises(UserError, match=r"must be called other-name\.json"):
        load_external(f"open_clip:other-name:{weights}", model_config=str(config))


def test_weights_of_another_architecture(tmp_path, no_network):
    name = unique_name()
    config, _, _ = write_model(tmp_path, name, width=64)
    _, wide_weights, _ = write_model(tmp_path, unique_name(), width=96)
    with pytest.raises(UserError, match=r"do not fit the architecture .*size mismatch") as err:
        load_external(f"open_clip:{name}:{wide_weights}", model_config=str(config))
    assert f"open_clip:{name}:" in str(err.value) and "\n" not in str(err.value)
    assert "visual.class_embedding is [96] in the file, [64] in the model" in str(err.value)
    _, deeper, _ = write_model(tmp_path, unique_name(), layers=3)
    with pytest.raises(UserError, match=r"do not fit the architecture .*unexpected key\(s\) \(first: visual\.transformer"):
        load_external(f"open_clip:{name}:{deeper}", model_config=str(config))
    _, shallower, _ = write_model(tmp_path, unique_name(), layers=1)
    with pytest.raises(UserError, match=r"do not fit the architecture .*missing key\(s\) \(first: visual\.transformer"):
        load_external(f"open_clip:{name}:{shallower}", model_config=str(config))


def test_a_file_that_is_not_weights(tmp_path, no_network):
    name = unique_name()
    config, _, _ = write_model(tmp_path, name)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not load the weights file"):
        load_external(f"open_clip:{name}:{junk}", model_config=str(config))


def test_unknown_model_name(no_network):
    with pytest.raises(UserError, match=r"unknown open_clip model 'ViT-B-16x'.*did you mean.*ViT-B-16.*list_models"):
        load_external("open_clip:ViT-B-16x:laion2b_s34b_b88k")
    with pytest.raises(UserError, match="unknown open_clip model 'no-such-model-zz'"):
        load_external("open_clip:no-such-model-zz")


def test_unknown_pretrained_tag_lists_the_known_ones(no_network):
    with pytest.raises(UserError, match=r"neither a weights file nor a pretrained tag .*laion2b_s34b_b88k"):
        load_external("open_clip:ViT-B-16:not-a-tag")


def test_tags_trained_with_quick_gelu_get_it(no_network):
    """open_clip only warns when a tag needs QuickGELU and the config says GELU; we build what the tag needs."""
    from bench.modeling.external import _parse

    assert _parse("open_clip:ViT-B-16:openai", None).force_quick_gelu
    assert not _parse("open_clip:ViT-B-16-quickgelu:openai", None).force_quick_gelu  # the config has it already
    assert not _parse("open_clip:ViT-B-16:laion2b_s34b_b88k", None).force_quick_gelu


def test_malformed_specs(no_network):
    for spec in ("open_clip:", "hf-hub:", "hf-hub:just-a-name", "not-a-spec"):
        with pytest.raises(UserError):
            load_external(spec)


def test_hub_offline_fails_fast_with_a_user_error(no_network):
    start = time.monotonic()
    for spec in ("hf-hub:nobody-xyz/no-such-clip", "open_clip:hf-hub:nobody-xyz/no-such-clip"):
        with pytest.raises(UserError, match=r"Hugging Face hub.*offline") as err:
            load_external(spec)
        assert spec in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - start < 30


def test_pretrained_tag_offline_fails_with_a_user_error(no_network):
    """A real tag whose weights are not cached: no download is possible, so a one-line error, fast."""
    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not get the pretrained weights 'laion2b_s34b_b88k'"):
        load_external("open_clip:ViT-B-16:laion2b_s34b_b88k")
    assert time.monotonic() - start < 60


def test_hub_model_from_the_local_cache(tmp_path, no_network):
    """An hf-hub model already in the hub cache loads offline: a fake cache entry in the hub's layout."""
    import huggingface_hub.constants as hub_constants

    torch.manual_seed(2)
    model = open_clip.model.CLIP(**tiny_config()).eval()
    commit = "0" * 40
    repo = tmp_path / "hub-cache" / "models--someorg--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": tiny_config(),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    assert hub_constants.HF_HUB_CACHE == str(tmp_path / "hub-cache")

    loaded = load_external("hf-hub:someorg/tiny-clip")
    assert loaded.name == "hf-hub:someorg/tiny-clip"
    assert loaded.identity["model"] == "hf-hub:someorg/tiny-clip" and loaded.identity["sha256"] is None
    assert list(loaded.image_cfg.mean) == [0.5, 0.5, 0.5] and list(loaded.image_cfg.std) == [0.25, 0.25, 0.25]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)
    assert loaded.tokenizer(["effusion"]).input_ids.shape == (1, 16)


def test_local_dir(tmp_path, no_network):
    torch.manual_seed(3)
    model = open_clip.model.CLIP(**tiny_config()).eval()
    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config()}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = load_external(f"open_clip:local-dir:{folder}")
    assert loaded.name == "open_clip:local-dir:my-clip"
    assert loaded.identity["sha256"] == hashlib.sha256((folder / "open_clip_pytorch_model.bin").read_bytes()).hexdigest()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)
    with pytest.raises(UserError, match="not a folder with open_clip_config.json"):
        load_external(f"open_clip:local-dir:{tmp_path / 'nope'}")


def test_a_weights_folder_is_refused_with_a_hint(tmp_path, no_network):
    name = unique_name()
    config, _, _ = write_model(tmp_path, name)
    with pytest.raises(UserError, match="is a folder, not a weights file"):
        load_external(f"open_clip:{name}:{tmp_path}", model_config=str(config))


def test_moves_with_to(tiny):
    *_, loaded = tiny
    moved = loaded.to(torch.float64)
    assert moved.logit_scale.dtype == torch.float64
    batch = moved.tokenizer(["effusion"])
    with torch.no_grad():
        assert moved.embed_text(batch).dtype == torch.float64

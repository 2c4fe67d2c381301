"""The switches that make each mmclip ablation one change, and mrm MRM: what each decoder reads, the
super-resolution target, the prompts of paired rows."""

import pytest
import torch
import torch.nn.functional as F

from bench.core.errors import UserError
from bench.core.results import ResultsStore
from bench.experiment.pretraining import build_corpus, build_method, pretrain
from bench.methods.mrm import MRM
from bench.modeling.masking import IGNORE


def _first_batch(cfg, method):
    corpus, sampler, _ = build_corpus(cfg, 0)
    return method.make_collate()([corpus[i] for i in sampler.batches()[0]])


def _spy(module, name: str, seen: dict, pick):
    """Wrap `module.name` so that each call stores pick(args, kwargs) in seen[name] (the last call wins)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen[name] = pick(args, kwargs)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def _decoder_text(method, batch) -> torch.Tensor | None:
    """The text tokens the image decoder read in one (eval-mode, no-grad) step."""
    seen = {}
    _spy(method.image_decoder, "forward", seen, lambda a, k: a[2] if len(a) > 2 else k.get("text_tokens"))
    with torch.no_grad():
        method.training_step(batch)
    return seen["forward"]


@pytest.mark.parametrize("ablation,decoder_text", [("no-entmlm", "masked"), ("none", "masked"), ("none", "plain")])
def test_what_the_image_decoder_reads_is_the_switch_not_whether_entmlm_trains(tiny_cfg, ablation, decoder_text):
    """Entity words hidden from EntMLM stay hidden from the image decoder, with or without the EntMLM loss,
    unless decoder_text=plain says otherwise."""
    cfg = tiny_cfg("mmclip", ablation, extra=(f"method.image_masking.decoder_text={decoder_text}",))
    method = build_method(cfg, 0).eval()
    assert hasattr(method, "text_decoder") == (ablation == "none")  # no-entmlm builds no MLM modules
    batch = _first_batch(cfg, method)
    assert batch.masked_text is not None  # the text masker runs for the image decoder even without EntMLM
    hidden = batch.mlm_labels != IGNORE
    reports = hidden.any(1).nonzero().squeeze(1)
    assert len(reports) > 4
    assert (batch.masked_text.input_ids[hidden] == method.tokenizer.hf.mask_token_id).all()
    read = _decoder_text(method, batch)
    with torch.no_grad():
        masked, plain = method.text_tower(batch.masked_text)[1], method.text_tower(batch.text)[1]
    expected, other = (masked, plain) if decoder_text == "masked" else (plain, masked)
    assert torch.allclose(read[reports], expected[reports], atol=1e-4)
    assert not torch.allclose(read[reports], other[reports], atol=1e-2)


@pytest.mark.parametrize("decoder_image", ["visible", "full"])
def test_entmlm_reads_the_visible_patches_or_the_whole_image(tiny_cfg, decoder_image):
    cfg = tiny_cfg("mmclip", extra=(f"method.text_masking.decoder_image={decoder_image}",))
    method = build_method(cfg, 0)
    batch = _first_batch(cfg, method)
    seen = {}
    _spy(method.text_decoder, "forward", seen, lambda a, k: a[2])
    method.training_step(batch).loss.backward()
    n = method.image_tower.num_patches
    hidden = round(cfg.method.image_masking.mask_ratio * n)
    assert seen["forward"].shape[1] == (n if decoder_image == "full" else n - hidden)


def test_switches_that_cannot_hold_together_are_refused(tiny_cfg):
    with pytest.raises(UserError, match="decoder_image=visible"):
        tiny_cfg("mmclip", extra=("method.image_masking.enabled=false",))
    assert tiny_cfg("mmclip", "no-attmim").method.text_masking.decoder_image == "full"
    with pytest.raises(UserError, match="prompts.enabled=true"):
        tiny_cfg("mmclip", extra=("method.prompts.paired=true", "method.prompts.enabled=false"))
    for bad in ("method.image_masking.attention_softmax=rows", "method.text_masking.conditioning=concat",
                "method.image_masking.target_scale=0", "method.text_masking.mask_negated=maybe"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            tiny_cfg("mmclip", extra=(bad,))


def test_paired_prompts_are_a_second_caption_of_their_images(tiny_cfg):
    """prompts.paired from the corpus to the loss: every paired image gets one extra, unmasked text row, the
    prompt of its own labels, and the step contrasts the two."""
    cfg = tiny_cfg("mmclip", extra=("method.prompts.paired=true",))
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    items = [corpus[i] for i in sampler.batches()[0]]
    paired = [it for it in items if it.kind == "paired"]
    assert paired and all(it.prompt for it in paired)
    assert not any(it.prompt for it in items if it.kind != "paired")
    labels = corpus.pools["paired"].labels
    assert paired[0].prompt == corpus.prompt(labels.iloc[corpus.locate(sampler.batches()[0][0])[1]].to_dict())
    batch = method.make_collate()(items)
    reports = len(batch.text) - len(paired)
    n_images = batch.images.shape[0]
    assert batch.image_prompt.tolist() == [reports + k for k in range(len(paired))] + \
        [-1] * (n_images - len(paired))
    assert batch.mlm_rows.max() < reports  # prompts are never masked
    assert (batch.mlm_labels[reports:] == IGNORE).all()
    assert torch.equal(batch.masked_text.input_ids[reports:], batch.text.input_ids[reports:])
    assert (batch.text_groups[reports:] >= 0).all()  # equal prompts are one caption
    assert batch.text_image()[reports:].tolist() == list(range(len(paired)))
    out = method.training_step(batch)
    assert {"itc", "itc_prompt", "mim", "mlm"} <= set(out.parts) and float(out.parts["itc_prompt"]) > 0
    assert torch.isclose(out.loss, sum(out.parts[k] for k in ("itc", "itc_prompt", "mim", "mlm")))
    out.loss.backward()
    assert method.text_proj.weight.grad is not None
    default = tiny_cfg("mmclip")
    batch = build_method(default, 0).make_collate()([build_corpus(default, 0)[0][i] for i in sampler.batches()[0]])
    assert batch.image_prompt is None and len(batch.text) == reports


def test_mrm_reconstructs_from_the_image_alone_and_conditions_mlm_on_the_pooled_latent(tiny_cfg):
    cfg = tiny_cfg("mrm")
    method = build_method(cfg, 0).eval()
    assert method.image_decoder.memory is None and not hasattr(method, "text_decoder")
    batch = _first_batch(cfg, method)
    seen, visible = {}, {}
    original = method.image_tower.forward

    def keep_visible(images, keep=None):
        out = original(images, keep=keep)
        if keep is not None:
            visible["tokens"] = out[1]
        return out

    method.image_tower.forward = keep_visible
    _spy(method.image_decoder, "forward", seen, lambda a, k: a[2] if len(a) > 2 else k.get("text_tokens"))
    layers_input = {}

    def record(_module, args, kwargs) -> None:
        layers_input["x"] = args[0] if args else kwargs["hidden_states"]

    handle = method.text_tower.encoder.encoder.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        out = method.training_step(batch)
        handle.remove()
        assert {k for k in out.parts if k in ("itc", "mim", "mlm")} == {"mim", "mlm"}
        assert seen["forward"] is None  # the image decoder read no text
        # the masked report's embeddings plus its image's visible-patch latents, pooled and projected
        latent = method.image_latent.proj(visible["tokens"].mean(1))[batch.text_image()]
        embedded = method.text_tower.encoder.embeddings(input_ids=batch.masked_text.input_ids)
        assert torch.allclose(layers_input["x"], embedded + latent[:, None], atol=1e-5)
        assert latent.abs().sum() > 0


def test_the_super_resolution_target_is_the_large_image(tiny_cfg):
    cfg = tiny_cfg("mrm")  # MRM's own target: twice the tower's resolution
    size, patch = cfg.model.image.image_size, cfg.model.image.patch_size
    one = tiny_cfg("mrm", extra=("method.image_masking.target_scale=1",))
    assert MRM.corpus_image_size(cfg) == 2 * size and MRM.corpus_image_size(one) == size
    method = build_method(cfg, 0)
    assert method.image_decoder.head.out_features == (2 * patch) ** 2
    batch = _first_batch(cfg, method)
    large = F.interpolate(batch.images, size=(2 * size, 2 * size), mode="bilinear", align_corners=False)
    batch.images = F.interpolate(large, size=(size, size), mode="area")
    with pytest.raises(UserError, match="target_scale=2"):
        method.training_step(batch)
    batch.images = large
    seen = {}
    _spy(method.image_tower, "forward", seen, lambda a, k: a[0].shape[-1])
    out = method.training_step(batch)
    assert seen["forward"] == size and torch.isfinite(out.parts["mim"])
    out.loss.backward()


def test_the_corpus_decodes_each_image_at_its_own_size_only(tiny_cfg, tmp_path):
    """MRM's corpus hands over 2x squares: its readability check decodes at that size, not the tower's too."""
    cfg = tiny_cfg("mrm", extra=(f"data.cache_dir={tmp_path / 'cache'}",))
    corpus, _, _ = build_corpus(cfg, 0)
    assert corpus.cache.size == 2 * cfg.model.image.image_size
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{corpus.cache.size}px"]


@pytest.mark.parametrize("method_name,ablation", [("mmclip", "random-image-mask"), ("mmclip", "random-text-mask"),
                                                  ("mmclip", "entmlm-full-image"), ("mmclip", "no-entmlm"),
                                                  ("mmclip", "no-attmim"), ("mmclip", "paired-prompts"),
                                                  ("mrm", "none")])
def test_one_training_step_of_each_changed_configuration(tiny_cfg, tmp_path, method_name, ablation):
    cfg = tiny_cfg(method_name, ablation, extra=("trainer.budget.steps=1", f"results_dir={tmp_path}"))
    _, final = pretrain(cfg, ResultsStore(cfg.results_dir), torch.device("cpu"))
    assert final.exists()


def test_a_record_stores_what_the_ablation_changed_in_this_run(tiny_cfg):
    from bench.experiment.evaluating import Subject, ablation_record

    def record(*extra):
        cfg = tiny_cfg("mmclip", "random-mask", extra=extra)
        return ablation_record(cfg, Subject("mmclip", "random-mask", "h", 0, None, "k"))

    assert record() == {"method.image_masking.strategy": ["attention", "random"],
                        "method.text_masking.strategy": ["entity", "random-matched"]}
    # an override that undoes half of it leaves only the other half on the record
    assert record("method.image_masking.strategy=attention") == {
        "method.text_masking.strategy": ["entity", "random-matched"]}

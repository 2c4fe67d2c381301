"""bench profile, the trainer's speed switches, and the data-path changes made for speed (one-channel corpus
images, reports-only masked text pass)."""
import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.cli import main
from bench.core.errors import UserError
from bench.experiment.config import compose_config
from bench.experiment.pretraining import build_corpus, build_method
from bench.tools.profile.inputs import synthetic_batches
from bench.tools.profile.measure import vendor_bf16_tflops
from bench.train.cost import count_flops
from bench.train.speed import Speed, accelerated_modules, loader_workers

CPU = torch.device("cpu")


def test_profile_prints_one_json_line_per_configuration(data_home, capsys, tmp_path):
    out = tmp_path / "profile.jsonl"
    assert main(["profile", "--methods", "clip,mmclip:no-attmim", "--presets", "tiny", "--inputs", "synthetic,files",
                 "--variants", "trainer,plain", "--steps", "2", "--warmup", "1", "--loader-batches", "2",
                 "--batch-size", "16", "--out", str(out), "data.synthetic.size=tiny"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [(r["method"], r["ablation"], r["input"], r["variant"]) for r in rows] == [
        (m, a, i, v) for m, a in (("clip", "none"), ("mmclip", "no-attmim")) for i in ("synthetic", "files")
        for v in ("trainer", "plain")]
    for r in rows:
        assert r["preset"] == "tiny" and r["batch_size"] == 16 and r["steps"] == 2 and r["step_ms"] > 0
        images = 16 if r["method"] == "clip" else 16 + 8  # MMCLIP's image-only rows come on top of 16 paired
        assert r["images_per_s"] == pytest.approx(images / (r["step_ms"] / 1000))
        assert r["flops_per_step"] > 0 and r["flops_how"] == "counted" and r["peak_memory_mb"] > 0
        assert "mfu" not in r  # no bf16 peak to compare against on a CPU
        assert (r["input"] == "files") == ("loader_images_per_s" in r)
    for first, second in zip(rows[::2], rows[1::2]):  # the variants of one configuration
        assert first["flops_per_step"] == second["flops_per_step"] and second["speedup_vs_plain"] == 1.0
        assert first["speed"] == Speed.resolve(None, CPU).as_dict() and "speed" not in second
    assert "clip tiny synthetic" in captured.err  # the table for people


def test_profile_refuses_unknown_inputs_and_variants(data_home):
    assert main(["profile", "--inputs", "disk", "data.synthetic.size=tiny"]) == 2
    assert main(["profile", "--variants", "fast", "data.synthetic.size=tiny"]) == 2


def test_flops_cover_forward_and_backward(tiny_cfg):
    cfg = tiny_cfg("clip")
    method = build_method(cfg, 0)
    batch = synthetic_batches(cfg, method, 1, seed=0)[0][0]
    forward = FlopCounterMode(display=False)
    with forward, torch.no_grad():
        method(batch)
    flops, how = count_flops(method, batch, None, CPU)
    # backward is about twice the forward: a count that kept only one pass would be far from 3x
    assert how == "counted" and 2.7 < flops / forward.get_total_flops() < 3.1
    assert all(p.grad is None for p in method.parameters())


def test_vendor_peak_by_device_name():
    assert vendor_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert vendor_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert vendor_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert vendor_bf16_tflops("Some Future GPU") is None


def test_speed_auto_is_off_on_cpu_and_bad_values_are_refused():
    assert Speed.resolve({"compile": "auto", "channels_last": "auto"}, CPU) == Speed(fused_optimizer=True)
    assert Speed.resolve({"compile": True}, CPU).compile
    assert not Speed.resolve({"tf32": True, "pin_memory": True}, CPU).tf32  # what only CUDA has stays off
    assert loader_workers("auto", CPU) == 0 and loader_workers(3, CPU) == 3
    for override, message in (("runtime.speed.compile=yes", "runtime.speed.compile='yes' is not valid: expected "
                                                            "true, false or auto"),
                              ("+runtime.speed.flash=true", "unknown setting runtime.speed.flash"),
                              ("runtime.speed.attention=flash", "expected one of fused, math"),
                              ("runtime.num_workers=many", "expected an integer >= 0 or auto")):
        with pytest.raises(UserError, match=re.escape(message)):
            compose_config("clip", overrides=[override])


def _loss_and_grads(method, batch, speed: Speed, seed: int = 0):
    method.zero_grad(set_to_none=True)
    speed.put_on(method)
    try:
        torch.manual_seed(seed)
        with speed.kernels():
            out = method(batch.__class__(**{**vars(batch), "images": speed.images(batch.images)}))
            out.loss.backward()
    finally:
        speed.take_off(method)
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_speed_switches_leave_loss_and_gradients_unchanged(tiny_cfg):
    cfg = tiny_cfg("mmclip")
    method = build_method(cfg, 0)
    batches, corpus = synthetic_batches(cfg, method, 1, seed=0)
    method.prepare(corpus)
    method.train()
    loss, grads = _loss_and_grads(method, batches[0], Speed())
    fast_loss, fast_grads = _loss_and_grads(
        method, batches[0], Speed(grad_checkpointing=True, channels_last=True, attention="math"))
    assert fast_loss == pytest.approx(loss, rel=1e-5) and fast_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(fast_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_compile_is_put_on_for_training_only_and_taken_off(tiny_cfg):
    method = build_method(tiny_cfg("mmclip"), 0)
    keys = list(method.state_dict())
    Speed(compile=True).put_on(method)
    modules = accelerated_modules(method)
    assert {type(m).__name__ for m in modules} == {"VisionTower", "TextTower", "ImageDecoder", "TextDecoder"}
    assert all("forward" in m.__dict__ for m in modules) and list(method.state_dict()) == keys
    method.eval()  # evaluation calls run eager: nothing is compiled here
    with torch.no_grad():
        assert method.encode_image(torch.zeros(2, 3, 96, 96)).shape == (2, 192)
    Speed.take_off(method)
    assert not any("forward" in m.__dict__ for m in modules)


def test_corpus_ships_one_grey_channel_and_the_tower_repeats_it(tiny_cfg):
    cfg = tiny_cfg("clip")
    corpus, _, _ = build_corpus(cfg, 0)
    image = corpus[0][0]
    assert image.shape == (1, 96, 96)
    tower = build_method(cfg, 0).image_tower.eval()
    with torch.no_grad():
        one = tower(image[None])
        three = tower(image[None].expand(-1, 3, -1, -1).contiguous())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, three))


def test_reports_alone_go_through_the_masked_text_pass(tiny_cfg):
    """Prompts are never masked, so encoding only the reports again gives the loss of encoding every row."""
    cfg = tiny_cfg("mmclip")
    method = build_method(cfg, 0)
    batches, corpus = synthetic_batches(cfg, method, 1, seed=0)
    method.prepare(corpus)
    batch = batches[0]
    assert 0 < len(batch.mlm_rows) < len(batch.text)  # this batch has prompts
    method.eval()  # no dropout: the two ways must agree exactly
    losses = []
    for rows in (batch.mlm_rows, None):
        torch.manual_seed(0)
        out = method(batch.__class__(**{**vars(batch), "mlm_rows": rows}))
        losses.append({k: float(v) for k, v in out.parts.items()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)

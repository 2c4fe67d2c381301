"""Progress you can see (bench.core.progress): the display mode from the terminal, CI and `--quiet`; one line
per finished evaluation record with counts and an ETA, and pretraining lines, in logs; nothing when quiet."""
import io
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.cli.parser import build_parser
from bench.core.errors import UserError
from bench.core.progress import BAR, LINES, QUIET, ItemProgress, StepProgress, about, display_mode
from bench.core.results import ResultsStore
from bench.experiment.evaluating import evaluate, random_init_subject
from bench.experiment.pretraining import build_method

CPU = torch.device("cpu")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that moves only when told, so ETAs are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("setting, tty, env, main_process, mode", [
    ("auto", True, {}, True, BAR),
    (True, True, {}, True, BAR),             # the old `progress: true`
    ("auto", False, {}, True, LINES),        # a log file or a pipe keeps no redraws
    ("auto", True, {"CI": "true"}, True, LINES),
    ("auto", True, {"CI": "false"}, True, BAR),
    ("lines", True, {}, True, LINES),
    ("bar", False, {"CI": "1"}, True, BAR),  # asked for explicitly
    ("quiet", True, {}, True, QUIET),
    (False, True, {}, True, QUIET),          # the old `progress: false`
    ("auto", True, {}, False, QUIET),        # torchrun's other ranks
])
def test_display_mode_from_the_terminal_ci_and_the_setting(setting, tty, env, main_process, mode):
    stream = Terminal() if tty else io.StringIO()
    assert display_mode(setting, stream, env, main=main_process) == mode


def test_item_lines_count_done_and_left_with_an_eta_from_the_mean_time():
    out, clock = io.StringIO(), Clock()
    progress = ItemProgress(LINES, 4, stream=out, clock=clock)
    for label, seconds in (("rsna zero-shot 100% seed 0", 10.0), ("rsna linear-probe 10% seed 0", 30.0)):
        progress.begin(label)
        clock.now += seconds
        progress.finish("auc 0.812")
    progress.done_elsewhere()  # another worker wrote one meanwhile
    progress.begin("rsna linear-probe 100% seed 0")
    clock.now += 5.0
    progress.finish()
    progress.close()
    assert out.getvalue().splitlines() == [
        "bench: [1/4] rsna zero-shot 100% seed 0: auc 0.812 (10.0 s; 3 left, ETA ~30 s)",
        "bench: [2/4] rsna linear-probe 10% seed 0: auc 0.812 (30.0 s; 2 left, ETA ~40 s)",
        "bench: [3/3] rsna linear-probe 100% seed 0 (5.0 s; none left)",
    ]
    assert about(45 * 60) == "~45 min" and about(3 * 3600) == "~3.0 h"


def test_bar_mode_draws_a_bar_and_quiet_mode_prints_nothing():
    terminal, silent = Terminal(), io.StringIO()
    for mode, stream in ((BAR, terminal), (QUIET, silent)):
        items = ItemProgress(mode, 2, stream=stream)
        items.begin("rsna zero-shot 100% seed 0")
        items.finish("auc 0.5")
        items.close()
        steps = StepProgress(mode, 20, 0, "clip-run", stream=stream)
        for _ in range(20):
            steps.step(1.0, 16, 0.1)
        steps.close()
    assert "\r" in terminal.getvalue() and "rsna zero-shot 100% seed 0: auc 0.5" in terminal.getvalue()
    assert silent.getvalue() == ""


def test_pretraining_lines_at_every_tenth_without_carriage_returns():
    out, clock = io.StringIO(), Clock()
    steps = StepProgress(LINES, 100, 20, "clip-none-0123456789-seed0", stream=out, clock=clock)
    for _ in range(80):
        clock.now += 0.5
        steps.step(2.0, 32, 0.5)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "bench: pretraining clip-none-0123456789-seed0: 100 steps, resuming at step 20"
    assert len(lines) == 1 + 8  # 30%, 40%, ..., 100%: a line per tenth crossed
    assert lines[1] == ("bench: pretraining clip-none-0123456789-seed0: step 30/100 (30%), loss 2.000, 64 img/s, "
                        "ETA ~35 s")
    assert lines[-1].endswith("step 100/100 (100%), loss 2.000, 64 img/s, done in 40.0 s")


def test_a_real_pretraining_prints_lines(tiny_cfg, capsys):
    from bench.experiment.pretraining import build_corpus
    from bench.train.trainer import Trainer

    cfg = tiny_cfg(extra=("trainer.budget.steps=3",))
    method = build_method(cfg, 0)
    corpus, sampler, _ = build_corpus(cfg, 0)
    method.prepare(corpus)
    assert Trainer(cfg.trainer, Path(cfg.results_dir), CPU, progress=False)._bar(3, 0) is None
    Trainer(cfg.trainer, Path(cfg.results_dir), CPU, progress="lines", flops=False).fit(
        method, corpus, method.make_collate(), sampler, 0)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(": step ")[1].split(" (")[0] for line in err.splitlines() if ": step " in line] == \
        ["1/3", "2/3", "3/3"]


def test_evaluation_prints_one_line_per_finished_record_and_nothing_when_quiet(tiny_cfg, capsys):
    base = ("eval.datasets=[rsna]", "eval.fractions=[0.1,1.0]", "eval.linear_probe.c_grid=[1.0]")
    first = tiny_cfg(extra=(*base, "eval.protocols=[zero-shot]", "runtime.progress=lines"))
    store, method = ResultsStore(first.results_dir), build_method(first, 0)
    evaluate(first, method, random_init_subject(first), store, CPU)
    capsys.readouterr()

    cfg = tiny_cfg(extra=(*base, "eval.protocols=[zero-shot,linear-probe]", "runtime.progress=lines"))
    summary = evaluate(cfg, method, random_init_subject(cfg), store, CPU)
    err = capsys.readouterr().err
    assert len(summary["written"]) == 2 and "\r" not in err
    lines = err.splitlines()
    assert lines[0] == "bench: random-init/clip seed 0: 2 record(s) to evaluate, 1 already there"
    assert lines[1].startswith("bench: [1/2] rsna linear-probe 10% seed 0: auc 0.") and "1 left, ETA ~" in lines[1]
    assert lines[2].startswith("bench: [2/2] rsna linear-probe 100% seed 0: auc 0.") and "none left)" in lines[2]
    assert len(lines) == 3

    evaluate(cfg, method, random_init_subject(cfg), store, CPU)
    assert capsys.readouterr().err == "bench: random-init/clip seed 0: all 3 record(s) already there\n"

    quiet = tiny_cfg(extra=(*base, "eval.protocols=[zero-shot]", "runtime.progress=quiet"))
    assert len(evaluate(quiet, method, random_init_subject(quiet), store, CPU, force=True)["written"]) == 1
    assert capsys.readouterr().err == ""


def test_runtime_progress_is_checked_and_accepts_its_old_values(tiny_cfg):
    assert tiny_cfg(extra=("runtime.progress=true",)).runtime.progress is True
    assert tiny_cfg(extra=("runtime.progress=lines",)).runtime.progress == "lines"
    with pytest.raises(UserError, match=r"runtime.progress='loud' is not valid: expected auto, bar, lines, quiet"):
        tiny_cfg(extra=("runtime.progress=loud",))


def test_quiet_flag_sets_runtime_progress_on_every_verb(data_home, tmp_path, monkeypatch):
    import bench.experiment.chain
    import bench.experiment.checkpoints
    import bench.tools.suite
    import bench.tools.sweep.study

    parser = build_parser()
    for argv in (["run", "--method", "clip"], ["eval", "--checkpoint", "x"], ["suite", "smoke"],
                 ["sweep", "--method", "clip", "--param", "lr=1e-4:1e-3"]):
        assert parser.parse_args([*argv, "--quiet"]).quiet and not parser.parse_args(argv).quiet

    seen = {}
    monkeypatch.setattr(bench.experiment.chain, "run_experiment", lambda cfg, force: seen.setdefault("run", cfg))
    assert main(["run", "--method", "clip", "--quiet", "--no-table", "data.synthetic.size=tiny"]) == 0
    assert seen["run"].runtime.progress == QUIET

    def no_checkpoint(name, overrides, open_clip_config):
        seen["eval"] = overrides
        raise UserError("stop here")

    monkeypatch.setattr(bench.experiment.checkpoints, "load_checkpoint", no_checkpoint)
    assert main(["eval", "--checkpoint", "x", "--quiet"]) == 2 and seen["eval"][-1] == "runtime.progress=quiet"

    monkeypatch.setattr(bench.tools.suite, "run", lambda suite, units, *a: seen.setdefault("suite", units))
    assert main(["suite", "smoke", "--quiet", "--results-dir", str(tmp_path)]) == 0
    assert {u.cfg.runtime.progress for u in seen["suite"]} == {QUIET}

    studies = []
    monkeypatch.setattr(bench.tools.sweep.study, "run_sweep", lambda spec: studies.append(spec) or {"ran": 0})
    for flag in ([], ["--quiet"]):
        assert main(["sweep", "--method", "clip", "--param", "trainer.lr=1e-4,1e-3", "--results-dir", str(tmp_path),
                     "data.synthetic.size=tiny", *flag]) == 0
    assert studies[0].study_name == studies[1].study_name, "--quiet is no part of what the study searches"
    assert [s.config(0).runtime.progress for s in studies] == ["auto", QUIET]


def test_long_data_steps_announce_themselves_unless_quiet(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    import bench.data.images as images
    from bench.core import progress

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(paths[-1])
    monkeypatch.setattr(images, "DECODE_NOTE_AT", 2)
    try:
        progress.set_process_mode(progress.LINES)
        images.usable(images.ImageCache(tmp_path / "cache", 16), paths, "error", "the test split")
        assert capsys.readouterr().err.startswith("bench: decoding 3 images of the test split into the image cache")
        images.usable(images.ImageCache(tmp_path / "cache", 16), paths, "error", "the test split")
        assert capsys.readouterr().err == ""  # all cached: nothing worth a line
        progress.set_process_mode(progress.QUIET)
        images.usable(images.ImageCache(tmp_path / "other", 16), paths, "error", "the test split")
        assert capsys.readouterr().err == ""
    finally:
        progress.set_process_mode(progress.LINES)

"""Every bad input is one line on stderr that names the key or file and what is valid, exit code 2, before any
work starts; an unwritable or full destination is one clear line and loses nothing finished; files in a
results folder that are not records are named and skipped."""
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_FOLDER
from tests_support import bench_cli

from bench.cli import main
from bench.core.results import ResultsStore
from bench.experiment.config import compose_config
from bench.experiment.evaluating import evaluate, random_init_subject
from bench.experiment.pretraining import build_method
from bench.tools.sweep.spec import parse_param

BAD_JSON = {"binary.json": b"\x89PNG\r\n\x1a\n\x00\xff", "empty-object.json": b"{}", "list.json": b"[1, 2]",
            "null.json": b"null"}


def _call(argv: list[str], capsys) -> tuple[int, str, str]:
    """`bench ARGV` in this process (a traceback would fail the test): (exit code, stderr, stdout)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


@pytest.fixture(scope="module")
def finished_run(data_home, tmp_path_factory) -> Path:
    """A pretrained run folder (one epoch, no evaluation) for the `bench eval` cases."""
    results = tmp_path_factory.mktemp("results")
    out = bench_cli("run", "--method", "clip", "--no-table", "--results-dir", str(results), *TINY,
                    "trainer.budget.epochs=1", "eval.protocols=[]", "eval.random_init_baseline=false")
    assert out.returncode == 0, out.stderr
    (run,) = results.glob("runs/*/")
    return run


def _truncated_roots(data_home, tmp_path) -> dict[str, Path]:
    """Copies of the synthetic CheXpert, RSNA and NIH roots with a metadata file cut mid-row or a ragged row."""
    base = data_home / TINY_FOLDER
    roots = {}
    for name, folder, file, cut in (("chexpert", "CheXpert-v1.0-small", "train.csv", "end"),
                                    ("rsna", "rsna-pneumonia-detection-challenge", "stage_2_train_labels.csv",
                                     "middle"),
                                    ("nih", "ChestX-ray14", "test_list.txt", "end")):
        root = tmp_path / f"cut-{name}"
        if not root.exists():
            shutil.copytree(base / folder, root, ignore=shutil.ignore_patterns("*.jpg", "*.png", "*.dcm"))
        lines = (root / file).read_text().splitlines()
        if cut == "end":  # a copy or a download stopped partway through the last row
            text = "\n".join(lines[:-1]) + "\n" + lines[-1][:len(lines[-1]) // 3]
        else:  # a row that lost its last field
            lines[5] = lines[5].rsplit(",", 1)[0]
            text = "\n".join(lines) + "\n"
        (root / file).write_text(text)
        roots[name] = root
    return roots


def test_malformed_input_is_one_line_and_exit_2_before_any_work(finished_run, data_home, tmp_path, capsys):
    results = tmp_path / "results"
    run = ["run", "--method", "clip", "--results-dir", str(results), *TINY]
    ev = ["eval", "--checkpoint", str(finished_run), "--results-dir", str(results)]
    sweep = ["sweep", "--method", "clip", "--results-dir", str(results), "--trials", "2"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cut = _truncated_roots(data_home, tmp_path)
    cases = [
        # values of the wrong type or out of range, whichever command composed them
        (run + ["trainer.budget.epochs=abc"], "trainer.budget.epochs='abc' is not valid: expected an integer >= 1"),
        (run + ["trainer.budget.epochs=1.5"], "trainer.budget.epochs=1.5 is not valid"),
        (run + ["=1"], "malformed override '=1'"),
        (run + ["trainer.budget.epochs"], "malformed override 'trainer.budget.epochs'"),
        (run + ["trainer.budget.epochs=[1"], "bad override"),
        (run + ["eval.batch_size=0"], "eval.batch_size=0 is not valid: expected an integer >= 1"),
        (run + ["eval.batch_size=-3"], "eval.batch_size=-3 is not valid"),
        (run + ["eval.seeds=[x]"], "eval.seeds[0]='x' is not valid: expected an integer >= 0"),
        (run + ["eval.seeds=[1,1]"], "eval.seeds=[1, 1] is not valid: expected a list without repeated entries"),
        (run + ["eval.seeds=[]"], "eval.seeds is empty"),
        (run + ["eval.fractions=[0.1,2]"], "eval.fractions[1]=2 is not valid: expected a number in (0, 1]"),
        (run + ["eval.datasets=[rsna,nope]"], "eval.datasets[1]='nope' is not valid: expected one of chexpert"),
        (run + ["eval.protocols=[probe]"], "eval.protocols[0]='probe' is not valid: expected one of zero-shot"),
        (run + ["eval.zero_shot.prompt_sets=[nope]"], "unknown prompt set 'nope'"),
        (run + ["eval.zero_shot.mode=both"], "eval.zero_shot.mode='both' is not valid: expected one of pos-neg"),
        (run + ["eval.fraction_subsets=some"], "eval.fraction_subsets='some' is not valid"),
        (run + ["eval.bootstrap.confidence=1.5"], "eval.bootstrap.confidence=1.5 is not valid"),
        (run + ["trainer.batch_size=0"], "trainer.batch_size=0 is not valid"),
        (run + ["trainer.batch_size=4096"], "trainer.batch_size=4096: the 87 paired training samples do not fill"),
        (run + ["trainer.lr=-1"], "trainer.lr=-1 is not valid: expected a number > 0"),
        (run + ["trainer.precision=fp8"], "trainer.precision='fp8' is not valid: expected one of auto, bf16, fp32"),
        (run + ["trainer.grad_clip=off"], "trainer.grad_clip='off' is not valid: expected a number > 0 or null"),
        (run + ["runtime.device=gpu"], "runtime.device='gpu' is not valid"),
        (run + ["runtime.num_workers=-1"], "runtime.num_workers=-1 is not valid"),
        (run + ["runtime.speed.compile=maybe"], "runtime.speed.compile='maybe' is not valid"),
        (run + ["data.corrupt_images=ignore"], "data.corrupt_images='ignore' is not valid: expected one of skip"),
        (run + ["data.corpus.paired=[]"], "data.corpus.paired=[] is not valid: expected a non-empty list"),
        (run + ["data.corpus.mix.image_only=-1"], "data.corpus.mix.image_only=-1 is not valid: expected a number >= 0"),
        (run + ["data.corpus.mix.paired=1"], "unknown setting data.corpus.mix.paired"),
        (run + ["data.chexpert.val_fraction=2"], "data.chexpert.val_fraction=2 is not valid: expected a number in"),
        (run + ["data.chexpert.uncertain_policy=maybe"], "data.chexpert.uncertain_policy='maybe' is not valid"),
        (run + ["data.mimic-cxr.labeler=me"], "data.mimic-cxr.labeler='me' is not valid: expected one of chexpert"),
        (run + [f"data.rsna.root={tmp_path}/absent"], f"data.rsna.root: {tmp_path}/absent does not exist"),
        (run + ["method.temperature=warm"], "method.temperature='warm' is not valid: expected a number"),
        (run + ["model.image.layers=two"], "model.image.layers='two' is not valid: expected an integer"),
        (run + ["--ablation", "mask-ratio-1.5"], "unknown ablation 'mask-ratio-1.5' for method 'clip'"),
        (["run", "--method", "mmclip", "--ablation", "mask-ratio-1.5", *TINY],
         "method.image_masking.mask_ratio=1.5 is not valid: expected a number in [0, 1)"),
        (["run", "--method", "mmclip", "method.contrastive=false", *TINY], "it needs method.contrastive=true"),
        (run + ["trainer.betas=[0.9]"], "trainer.betas=[0.9] is not valid: expected a list of 2"),
        (run + ["trainer.lr=inf"], "trainer.lr=inf is not valid"),
        (run + ["data.rsna.val_fraction=0.5", "data.rsna.test_fraction=0.5"], "must sum below 1"),
        (run + ["model=huge"], "valid model options: base, tiny"),
        (["run", "--method", "nope"], "unknown method 'nope'; valid methods: clip"),
        (["run", "--method", "clip", "--ablation", "nope"], "valid ablations: none, fixed-temperature"),
        # unknown keys, with or without Hydra's +
        (run + ["foo="], "unknown setting foo"),
        (run + ["+foo=1"], "unknown setting foo"),
        (run + ["eval.seed=3"], "unknown setting eval.seed; did you mean eval.seeds?"),
        (run + ["+trainer.budget.epoch=3"], "unknown setting trainer.budget.epoch; did you mean trainer.budget.epochs?"),
        # the command line itself
        (["run"], "the following arguments are required: --method"),
        (run + ["--bogus"], "unrecognized argument(s): --bogus"),
        (run + ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (run + ["trainer.budget.epochs=2", "--seed", "1", "eval.seeds=[x]"], "eval.seeds[0]='x'"),  # overrides between flags
        (["table", "trainer.budget.epochs=2"], "unrecognized argument(s): trainer.budget.epochs=2"),
        (["data", "synth", "--size", "huge"], "argument --size: invalid choice: 'huge'"),
        (["profile", "--steps", "0"], "argument --steps: invalid positive integer value: '0'"),
        # destinations that cannot be written
        (["run", "--method", "clip", "--results-dir", str(a_file / "results"), *TINY], "is not writable"),
        (["run", "--method", "clip", "--results-dir", "/sys/medvlp-results", *TINY], "is not writable"),
        (run + ["data.splits_dir=/sys/medvlp-splits"], "data.splits_dir: cannot write /sys/medvlp-splits/mimic-cxr/"),
        # bench eval takes eval/data/runtime settings only, checked like run's
        (ev + ["eval.seed=3"], "unknown setting eval.seed; did you mean eval.seeds?"),
        (ev + ["foo="], "'foo=': bench eval sets only eval.*, data.*, runtime.* and results_dir"),
        (ev + ["trainer.budget.epochs=abc"], "'trainer.budget.epochs=abc': bench eval sets only eval.*"),
        (ev + ["eval.batch_size=0"], "eval.batch_size=0 is not valid"),
        (ev + ["--fractions", "0.1,abc"], "--fractions '0.1,abc': expected comma-separated label fractions"),
        (ev + ["--seeds", "1,x"], "--seeds '1,x': expected comma-separated integers"),
        (ev + ["--dataset", "nope"], "eval.datasets[0]='nope' is not valid"),
        (["eval", "--checkpoint", str(tmp_path / "absent")], "not a run folder"),
        # suites and sweeps check every run's configuration before the first one starts
        (["suite", "smoke", "--results-dir", str(results), "trainer.budget.epochs=abc"], "trainer.budget.epochs='abc'"),
        (["suite", "smoke", "--worker", "3/2"], "--worker '3/2'"),
        (["suite", "nope"], "no suite 'nope'"),
        (sweep + ["--param", "trainer.budget.epochs=1,x"], "--param trainer.budget.epochs: trainer.budget.epochs='x' is not valid"),
        (sweep + ["--param", "mask_ratio=0.3:0.9"], "--param mask_ratio: no such setting"),
        (sweep + ["--param", "trainer.budget.epochs=1:4"], "trainer.budget.epochs is a whole number; search it with "
                                                    "trainer.budget.epochs=1:4:int"),
        (sweep + ["--method", "mmclip", "--param", "mask_ratio=0.5:1.5"],
         "--param mask_ratio: method.image_masking.mask_ratio=1.5 is not valid: expected a number in [0, 1)"),
        (sweep + ["--param", "trainer.lr=1e-4:1e-2:log", "eval.batch_size=0"], "eval.batch_size=0 is not valid"),
        (sweep + ["--param", "trainer.lr=1e-4:1e-2:log", "--objective", "rsna:probe:auc"], "unknown protocol"),
        # data on disk
        (["data", "inspect", "chexpert", "--root", str(cut["chexpert"])], "train.csv: line"),
        (["data", "inspect", "rsna", "--root", str(cut["rsna"])],
         "stage_2_train_labels.csv: line 6: 5 field(s) where the header has 6; the file is cut short"),
        (["data", "inspect", "nih", "--root", str(cut["nih"])], "test_list.txt: line"),
        (["data", "inspect", "nih", "--root", str(tmp_path / "absent")], "does not exist"),
        (["data", "inspect", "rsna", "--root", str(cut["rsna"]), "--set", "nope=1"], "no setting 'nope'"),
        (["table", "--results-dir", str(tmp_path / "empty")], "no results records"),
        (["mask", "--report", "No effusion.", "eval.batch_size=0"], "eval.batch_size=0 is not valid"),
    ]
    failures = []
    for argv, expected in cases:
        code, err, _ = _call(argv, capsys)
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or expected not in err or "Traceback" in err:
            failures.append(f"{' '.join(argv[:1] + argv[-2:])}: exit {code}, stderr {err.strip()!r}, "
                            f"wanted {expected!r}")
    assert not failures, "\n".join(failures)
    assert not list(results.glob("runs/*")) and not (results / "records").exists(), "no work was started"


def test_legitimate_settings_pass_the_checks(tmp_path):
    """What the checks must not refuse: nulls a preset allows, open mappings, per-channel statistics, a
    switch on auto, sweep values written as numbers."""
    for method, overrides in (("clip", ["model=base", "model.text.pretrained=null", "model.image.pretrained=null"]),
                              ("mmclip", ["+model.text.config.hidden_dropout_prob=0.0",
                                          "model.image.mean=[0.5,0.5,0.5]", "runtime.speed.grad_checkpointing=auto",
                                          "trainer.grad_clip=null",
                                          "+method.prompts.names.Edema=fluid", f"data.rsna.root={tmp_path}"]),
                              ("mrm", ["eval.protocols=[]", "eval.seeds=[]", "trainer.budget.steps=3"])):
        compose_config(method, overrides=overrides)
    assert parse_param("trainer.lr=1e-4,1e-3", compose_config("clip")).choices == (1e-4, 1e-3)


def test_the_console_script_says_it_in_one_line_too(tmp_path):
    out = bench_cli("run", "--method", "clip", "--results-dir", str(tmp_path), "trainer.budget.epochs=abc")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "bench: error: trainer.budget.epochs='abc' is not valid: expected an integer >= 1"]


def test_table_names_and_skips_files_that_are_not_records(tiny_cfg, capsys):
    cfg = tiny_cfg(extra=("eval.datasets=[rsna]", "eval.protocols=[zero-shot]"))
    (path,) = evaluate(cfg, build_method(cfg, 0), random_init_subject(cfg), ResultsStore(cfg.results_dir),
                       torch.device("cpu"))["written"]
    for name, content in BAD_JSON.items():
        (path.parent / name).write_bytes(content)
    code, err, out = _call(["table", "--results-dir", cfg.results_dir], capsys)
    auc = json.loads(path.read_text())["metrics"]["auc"]
    assert code == 0 and f"| random-init | clip       | {auc:.3f} (n=1)" in out
    skipped = [line for line in err.splitlines() if line.startswith("bench: skipped")]
    assert len(skipped) == len(BAD_JSON) and all(str(path.parent / n) in err for n in BAD_JSON)
    for reason in ("not JSON, or cut short", "a JSON list, not an object", "a JSON NoneType, not an object",
                   "no schema, method, ablation ..."):
        assert reason in err, reason


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_destination_is_one_line_and_the_same_command_then_finishes(data_home, tmp_path):
    """The file-size limit stands in for a full disk: the checkpoint (tens of MB) cannot be written."""
    results = tmp_path / "results"
    args = [str(Path(sys.executable).with_name("bench")), "run", "--method", "clip", "--no-table",
            "--results-dir", str(results), *TINY, "trainer.budget.epochs=1", "eval.datasets=[rsna]",
            "eval.protocols=[zero-shot]"]
    full = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(4 << 20), timeout=600)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert "bench: error: cannot write" in lines[-1] and "File too large" in lines[-1], lines
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")], "no half-written file is left"
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(list(results.glob("records/*/*.json"))) == 2

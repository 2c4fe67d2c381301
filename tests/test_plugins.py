"""A protocol and a dataset are plug-ins: registering one is all it takes for `bench run`, `bench table`,
`bench sweep`, the config and the synthetic benchmark to use it."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_FOLDER

from bench.cli import main
from bench.core.checks import number
from bench.core.errors import UserError
from bench.core.registry import DATASETS, PROTOCOLS, register_adapter, register_protocol
from bench.core.results import ResultsStore
from bench.data.adapter import Synthetic, finding_task
from bench.data.loading import load_dataset
from bench.data.synth import MARKER, ensure_synthetic
from bench.datasets.rsna import Rsna
from bench.evaluation.prompt_sets import get_prompt_set
from bench.evaluation.protocol import Protocol
from bench.experiment.config import compose_config

FAST = [*TINY, "trainer.budget.steps=2", "eval.datasets=[rsna]", "eval.random_init_baseline=false"]


class FeatureMean(Protocol):
    """A toy protocol: each class scored by the mean of the frozen image features, times `scale`."""

    order = 5
    frozen = True
    defaults = {"scale": 1.0}
    setting_checks = {"scale": number(0, low_open=True)}
    runs = 0

    @classmethod
    def run(cls, ctx, fraction, seed, folder):
        from bench.evaluation.result import ProtocolResult

        cls.runs += 1
        rows, features = ctx.features.get(ctx.method, ctx.data, ctx.report_split)
        y = rows[ctx.data.task.labels].to_numpy(float)
        score = float(ctx.cfg.eval.feature_mean.scale) * features.mean(1, keepdims=True)
        return ProtocolResult(ctx.data.task, rows, y, np.repeat(score, y.shape[1], 1), None, {"scale": 1.0})


@pytest.fixture()
def toy_protocol():
    register_protocol("feature-mean")(FeatureMean)
    yield FeatureMean
    PROTOCOLS.unregister("feature-mean")


def test_a_registered_protocol_runs_from_bench_run_shows_in_the_table_and_serves_a_sweep(data_home, tmp_path, capsys,
                                                                                       toy_protocol):
    results = tmp_path / "results"
    assert main(["run", "--method", "clip", "--results-dir", str(results), "--no-table", *FAST,
                 "eval.protocols=[zero-shot,feature-mean]"]) == 0
    records = {r["protocol"]: r for r in ResultsStore(results).records()}
    assert set(records) == {"zero-shot", "feature-mean"}
    mean = records["feature-mean"]
    assert mean["config"]["eval"]["feature_mean"] == {"scale": 1.0} and 0 <= mean["metrics"]["auc"] <= 1
    assert (mean["fraction"], mean["eval_seed"]) == (1.0, 0)  # fits no labels: one record

    capsys.readouterr()
    assert main(["table", "--results-dir", str(results), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert table.index("zero-shot") < table.index("feature-mean")  # columns in the protocols' order
    # its settings are checked like any other
    with pytest.raises(UserError, match="eval.feature_mean.scale=-1"):
        compose_config("clip", overrides=[*FAST, "eval.feature_mean.scale=-1"])

    runs = toy_protocol.runs
    assert main(["sweep", "--method", "clip", "--param", "temperature=0.05,0.07", "--sampler", "grid", "--trials", "1",
                 "--objective", "rsna:feature-mean:auc", "--results-dir", str(results), *FAST]) == 0
    (best,) = results.glob("sweeps/*/best.json")
    assert json.loads(best.read_text())["objective"] == "rsna:feature-mean:auc:1"
    assert toy_protocol.runs > runs  # scored on validation after every epoch and at the end


@register_adapter
class ToyOpacity(Rsna):
    """RSNA's files under another name, with a label no shipped prompt set has."""

    name = "toy-opacity"
    description = "a toy dataset plug-in for the tests"
    task = finding_task(["Toy Opacity"])
    defaults = {**Rsna.defaults, "val_fraction": 0.2}
    synthetic = Synthetic("toy-opacity", {"tiny": 20, "small": 20, "medium": 20},
                          "bench.data.synth.dicom_writers:write_rsna")
    prompts = {"chexzero": {"Toy Opacity": {"positive": ["toy opacity"], "negative": ["no toy opacity"]}}}

    def read(self, with_reports: bool = True):
        return super().read(with_reports).rename(columns={"Pneumonia": "Toy Opacity"})


DATASETS.unregister("toy-opacity")  # registered only inside the test below


def test_a_registered_dataset_gets_its_settings_its_synthetic_copy_and_its_prompts(data_home, tmp_path):
    root = tmp_path / TINY_FOLDER
    shutil.copytree(data_home / TINY_FOLDER, root)
    before = {p.name for p in root.iterdir()}
    register_adapter(ToyOpacity)
    try:
        cfg = compose_config("clip", overrides=[*FAST, f"data.synthetic.root={root}", "eval.datasets=[toy-opacity]"])
        assert cfg.data["toy-opacity"].root is None and cfg.data["toy-opacity"].val_fraction == 0.2
        with pytest.raises(UserError, match="data.toy-opacity.val_fraction"):
            compose_config("clip", overrides=[*FAST, "data.toy-opacity.val_fraction=2"])
        data = load_dataset(cfg, "toy-opacity")  # its copy is added to the existing benchmark on first use
        assert {p.name for p in root.iterdir()} == before | {"toy-opacity"}
        assert json.loads((root / MARKER).read_text())["counts"]["toy-opacity"] == 20
        assert data.task.labels == ["Toy Opacity"] and len(data.manifest) > 0
        assert ensure_synthetic(root, "tiny", 0) == root  # nothing more to add
        chexzero = get_prompt_set("chexzero")
        assert chexzero.for_task("toy-opacity", ["Toy Opacity"])["Toy Opacity"].positive == ("toy opacity",)
        plain = get_prompt_set(str(Path(chexzero.path)))  # by path: the same set, the same blocks
        assert plain.sha256 == chexzero.sha256
    finally:
        DATASETS.unregister("toy-opacity")
    without = get_prompt_set("chexzero")
    assert "toy-opacity" not in without.datasets and without.sha256 != chexzero.sha256

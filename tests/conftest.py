import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# every test run uses the tiny synthetic benchmark and the tiny model, on few steps
TINY = ["data.synthetic.size=tiny", "trainer.budget.epochs=2", "trainer.batch_size=16", "trainer.checkpoint_every=2",
        "runtime.progress=false", "eval.batch_size=64", "eval.protocols=[zero-shot,linear-probe]",
        "eval.fractions=[1.0]", "eval.bootstrap.resamples=200", "eval.fine_tune.epochs=2",
        "eval.fine_tune.batch_size=16"]


TINY_FOLDER = "synthetic-v7-standard-tiny-0"  # the default root's folder for the tiny size (configs/data/default.yaml)


@pytest.fixture(scope="session")
def data_home(tmp_path_factory) -> Path:
    """One tiny synthetic benchmark for the whole session (MEDVLP_BENCH_DATA points at it)."""
    home = tmp_path_factory.mktemp("data")
    os.environ["MEDVLP_BENCH_DATA"] = str(home)
    from bench.data.synth import ensure_synthetic

    ensure_synthetic(home / TINY_FOLDER, "tiny", 0)
    return home


@pytest.fixture()
def tiny_cfg(data_home, tmp_path):
    from bench.experiment.config import compose_config

    def make(method: str = "clip", ablation: str = "none", seed: int = 0, extra: tuple[str, ...] = ()):
        return compose_config(method, ablation, seed, [*TINY, f"results_dir={tmp_path / 'results'}", *extra])

    return make


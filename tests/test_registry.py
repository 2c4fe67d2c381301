import os
import subprocess
import sys
import textwrap

import pytest

from bench.core.errors import UserError
from bench.core.registry import METHODS, register_method


def test_builtin_methods_register_themselves():
    assert "clip" in METHODS.names()
    assert METHODS.get("clip").name == "clip"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid methods: .*clip"):
        METHODS.get("does-not-exist")


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="registered twice"):
        @register_method("clip")
        class Impostor:  # noqa: F841
            pass


def test_third_party_method_via_entry_point(tmp_path):
    """A package installed elsewhere registers a method and its config; `bench list` and composition see it."""
    (tmp_path / "toyplugin.py").write_text(textwrap.dedent("""
        from hydra.core.config_store import ConfigStore
        from bench.core.registry import register_method
        from bench.methods.clip import CLIP

        @register_method("toy")
        class Toy(CLIP):
            pass

        cs = ConfigStore.instance()
        cs.store(group="method", name="toy", node={"name": "toy", "temperature": 0.1, "learn_temperature": True,
                                                   "max_logit_scale": 100, "freeze_text": False})
        cs.store(group="ablation/toy", name="cold", node={"method": {"temperature": 0.01}}, package="_global_")
    """))
    dist = tmp_path / "toyplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medvlp_bench.methods]\ntoy = toyplugin\n")
    code = ("from bench.cli import main; main(['list']);"
            "from bench.experiment.config import compose_config; c = compose_config('toy', 'cold');"
            "print('temperature', c.method.temperature)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "toy: none, cold" in out.stdout
    assert "temperature 0.01" in out.stdout

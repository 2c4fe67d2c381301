import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_configs_and_keeps_datasets_inside_bench(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("medvlp_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {f"bench/{p.relative_to(REPO / 'bench')}" for p in (REPO / "bench").rglob("*.py")}
    shipped |= {f"bench/{folder}/{p.relative_to(REPO / folder)}" for folder in ("methods", "datasets", "configs")
                for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml")}
    shipped |= {f"bench/{p.relative_to(REPO / 'bench')}" for p in (REPO / "bench").rglob("*.yaml")}
    missing = sorted(shipped - set(names))  # every module and config of the checkout, e.g. a package left out
    assert missing == [] and "bench/configs/config.yaml" in names and "bench/tools/sweep/study.py" in names, missing
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"datasets", "methods", "configs"}, top_level


def test_import_datasets_is_not_ours(tmp_path):
    code = "import importlib.util as u; s = u.find_spec('datasets'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    origin = out.stdout.strip()
    assert origin == "None" or str(REPO) not in origin, origin

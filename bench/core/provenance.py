"""Where a number came from: code version, libraries, device."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = ("medvlp-bench", "torch", "transformers", "open_clip_torch", "scikit-learn", "numpy", "pandas",
             "hydra-core", "optuna")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """Commit and dirty flag of the harness's source checkout (editable installs), else of the working
    directory if that is a checkout (a researcher's experiment repository); `None` where neither is. Read once
    per process (`bench.experiment.setup.start` reads it first): the code a process runs is the code it
    imported, so a commit made while a long suite runs must not be credited with its later records."""
    return dict(_git_state())


@functools.lru_cache(maxsize=1)
def _git_state() -> dict:
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _git(["rev-parse", "HEAD"], where)
        if commit:
            dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], where))
            return {"commit": commit, "dirty": dirty, "repo": _git(["rev-parse", "--show-toplevel"], where)}
    return {"commit": None, "dirty": None, "repo": None}


def library_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info

"""CPU seconds the `bench` command spends before it answers, per command (user + system time of the child
process, the median of --repeat runs), and the heavy modules each one imported.

    .venv/bin/python scripts/cli_startup.py [--repeat 5] [--bench .venv/bin/bench]

A benchmark, not a test: timings depend on the machine. Issue 15's target is under 0.5 s for `--help` and
`list`; every other command should import only what it uses.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("torch", "pandas", "transformers", "open_clip", "hydra", "sklearn", "scipy", "matplotlib", "optuna",
         "omegaconf", "numpy", "pydicom", "PIL")
COMMANDS = {
    "--help": ["--help"],
    "list": ["list"],
    "run --help": ["run", "--help"],
    "table (empty folder)": ["table", "--results-dir", "{tmp}"],
    "mask --report": ["mask", "--report", "Small right pleural effusion. No pneumothorax.", "--json"],
}
# what a command imported: run it with -X importtime and read the top-level modules from stderr
PROBE = "import sys, runpy; sys.argv = ['bench', *sys.argv[1:]]; runpy.run_module('bench.cli', run_name='__main__')"


def cpu_seconds(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heavy_imports(python: str, args: list[str]) -> list[str]:
    out = subprocess.run([python, "-X", "importtime", "-c", PROBE, *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()
             if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--bench", default=str(Path(sys.executable).with_name("bench")))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'command':<22} {'CPU s (median)':>14}  heavy imports")
        for name, template in COMMANDS.items():
            argv = [a.replace("{tmp}", tmp) for a in template]
            times = [cpu_seconds([args.bench, *argv]) for _ in range(args.repeat)]
            print(f"{name:<22} {statistics.median(times):>14.3f}  {', '.join(heavy_imports(sys.executable, argv))}")


if __name__ == "__main__":
    main()

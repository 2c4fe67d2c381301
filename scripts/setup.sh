#!/usr/bin/env bash
# Creates ./.venv and installs medvlp-bench with its test extra. Needs only python3 (>= 3.10).
# On CPU-only machines torch/torchvision are pinned by constraints-cpu.txt (see the comment there);
# set MEDVLP_NO_CPU_PIN=1 to keep an environment's own torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
constraints=(-c constraints-cpu.txt)
[ "${MEDVLP_NO_CPU_PIN:-0}" = 1 ] && constraints=()
.venv/bin/python -m pip install -qq "${constraints[@]}" ".[test]"
.venv/bin/bench --help >/dev/null  # fails loudly if the install did not work

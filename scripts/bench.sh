#!/usr/bin/env bash
# Run the benchmark suite (the main job). Creates $VENV (default .venv) when missing, installs torch
# (CPU build pinned by TORCH_VERSION unless a torch is already there), builds the extension and runs
# `python -m coconut_kernels.bench` with the arguments given (default: the embedded CPU default, or the GPU when
# there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
pip install -q setuptools wheel ninja
pip install -q --no-build-isolation -e ".[bench]"
exec python -m coconut_kernels.bench "$@"

#!/usr/bin/env bash
# Run the test suite. Creates the virtual environment $VENV (default .venv) when it is missing, installs
# torch (the CPU build, pinned by TORCH_VERSION; any release in pyproject's range works), builds the
# extension against it and runs pytest with the arguments given (Triton kernels run in the CPU interpreter
# when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
pip install -q setuptools wheel ninja
pip install -q --no-build-isolation -e ".[test]"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"

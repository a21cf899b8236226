#!/usr/bin/env bash
# The tests that touch transformers (the reference path, interop, HF export, the official comparisons, the
# benchmarks' transformers rows) against the lowest transformers that pyproject declares: a fresh virtual
# environment $VENV with torch $TORCH_VERSION (CPU), transformers==4.46.* and the tokenizers and
# huggingface-hub it pins, and the test tools. The compiled extension is the one in coconut_kernels/ that
# scripts/test.sh built (against the same torch), used through PYTHONPATH; built here when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:?set VENV to the folder of the virtual environment to create}
"${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q "transformers==4.46.*" pytest hypothesis expecttest pyyaml safetensors tqdm pytest-benchmark \
  matplotlib setuptools wheel ninja
python -c "import transformers, tokenizers, huggingface_hub; print('transformers', transformers.__version__, \
'tokenizers', tokenizers.__version__, 'huggingface_hub', huggingface_hub.__version__)"
if ! ls coconut_kernels/_C*.so >/dev/null 2>&1; then
  python setup.py -q build_ext --inplace
fi
PYTHONPATH="$PWD" python -m pytest tests/test_latent.py tests/test_models.py tests/test_interop.py \
  tests/test_interop_export.py tests/test_interop_official.py tests/test_latent_jacobi.py tests/test_benchmarks.py \
  tests/test_train.py::test_init_from_a_hugging_face_folder_adds_the_latent_markers \
  tests/test_train.py::test_dropout_key_overrides_the_checkpoints \
  tests/test_train_cli.py::test_truncated_hugging_face_files_are_named "$@"

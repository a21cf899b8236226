#!/usr/bin/env bash
# Compile and link the CUDA extension without a GPU (FORCE_CUDA=1) into a fresh virtual environment with
# the CUDA build of torch, then load it to prove that every symbol resolves and that the CUDA kernels
# registered. Usage: scripts/build_cuda.sh [WORKDIR]. Needs nvcc (CUDA 13.x) on PATH or CUDA_HOME set.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
# torch derives CUDA_HOME from the nvcc on PATH; where that is a wrapper outside the toolkit, linking
# cannot find libcudart, so name the toolkit root (the folder with bin/nvcc, include/ and lib64/).
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0 "$(dirname "$(dirname "$(command -v nvcc)")")"; do
    if [ -x "$d/bin/nvcc" ] && [ -d "$d/include" ]; then CUDA_HOME=$d; break; fi
  done
fi
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==${CUDA_TORCH_VERSION:-2.14.1}" numpy setuptools wheel ninja
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# ATen/cuda/CUDAContext.h includes cusparse.h, which the wheel's dependencies install here.
for inc in "$site"/nvidia/cu13/include "$site"/nvidia/*/include; do
  [ -d "$inc" ] && export CPLUS_INCLUDE_PATH="$inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
done
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-2}
"$work/venv/bin/python" setup.py build_ext --build-lib "$work/lib" --build-temp "$work/tmp"
so=$(find "$work/lib" -name '_C*.so' | head -1)
echo "built $so"
# Loading the library resolves every symbol; the registrations say which CUDA kernels it carries.
"$work/venv/bin/python" - "$so" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
expected = ("latent_feedback_", "latent_feedback_backward", "kv_cache_append_", "latent_attention_fwd",
            "latent_attention_bwd")
missing = [n for n in expected if not torch._C._dispatch_has_kernel_for_dispatch_key(f"coconut::{n}", "CUDA")]
print("CUDA kernels registered:", ", ".join(n for n in expected if n not in missing))
if missing:
    sys.exit(f"no CUDA kernel registered for {missing}")
PY

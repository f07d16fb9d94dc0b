#!/usr/bin/env bash
# Creates a virtual environment with torch and dsv3's build tools, then builds and installs dsv3 into it.
#   tools/bootstrap.sh [VENV_DIR]          (default .venv)
#   DSV3_TORCH=cpu  (default) torch 2.13.0 CPU build; dsv3 builds its CPU kernels only
#   DSV3_TORCH=cuda torch 2.14.1 CUDA 13 build; dsv3 also builds its sm_90a kernels (needs nvcc >= 12.8)
#   DSV3_EXTRAS=test,bench   optional dependency groups to install as well
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
flavor=${DSV3_TORCH:-cpu}
case "$flavor" in
  cpu) torch_spec="torch==2.13.0"; cuda_mode=${DSV3_CUDA:-auto} ;;
  cuda) torch_spec="torch==2.14.1"; cuda_mode=${DSV3_CUDA:-on}
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; export PATH="$CUDA_HOME/bin:$PATH" ;;
  *) echo "DSV3_TORCH must be cpu or cuda, got '$flavor'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "$torch_spec" numpy safetensors "tokenizers>=0.20" "scikit-build-core>=0.10" ninja "cmake>=3.26"
extras=${DSV3_EXTRAS:+[$DSV3_EXTRAS]}
DSV3_CUDA=$cuda_mode "${pip[@]}" install --no-build-isolation ".$extras"
"$venv/bin/dsv3" info

#!/usr/bin/env bash
# The one prepared check for a lent Hopper GPU (under 8 minutes on one H200): environment, build with the CUDA
# kernels, SASS audit, GPU tests (quantization, FP8 GEMM and MLA decode, the latter two on the WGMMA kernels and
# on their ATen fallbacks; the quantization and FP8 GEMM tests once more under compute-sanitizer memcheck),
# timings (quantization, the FP8 GEMM at the V3 shapes beside DeepGEMM and MLA decode beside FlashMLA when
# importable), the trainer on the GPU and its training-step benchmark, and the EP benchmark when >= 2 GPUs.
#   benchmarks/gpu_check.sh        logs and results go to $OUT when set, else build/gpu_check/
# Every step is timed and bounded, and all of them together by GPU_CHECK_BUDGET_S (default 470 s); a failed step
# is recorded and the rest still run (a failed build stops). Exit status: 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

results=${OUT:-build/gpu_check}
mkdir -p "$results"
log=$results/gpu_check.log
summary=$results/gpu_check_summary.txt
: >"$log"
: >"$summary"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-470}))
failed=0
export PYTHONUNBUFFERED=1 py=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

note() { echo "$*" | tee -a "$log" "$summary"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND (a program or an exported function) under `timeout`, bounded by the
# time left as well, appends its output to the log and records the outcome in the summary.
step() {
  local name=$1 limit=$2 start=$SECONDS status=0 outcome=ok
  shift 2
  local left=$((deadline - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    note "$(printf '%-26s %s' "$name" "SKIPPED (time budget spent)")"
    failed=$((failed + 1))
    return 1
  fi
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log" || status=$?
  [ "$status" -eq 0 ] || outcome="FAILED($status)"
  [ "$status" -ne 124 ] || outcome="TIMED OUT"
  note "$(printf '%-26s %-12s %5ds' "$name" "$outcome" $((SECONDS - start)))"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
  return "$status"
}

finish() {
  echo "=== summary: $failed failed, $SECONDS s"
  cat "$summary"
  exit $((failed > 0))
}

environment() {
  nvidia-smi
  nvcc --version
  "$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print("torch", torch.__version__, "cuda",
    torch.version.cuda, "|", p.name, torch.cuda.get_device_capability(), p.multi_processor_count, "SMs")'
  command -v cuobjdump compute-sanitizer c++filt || true
}

build() {
  DSV3_CUDA=on CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$py" -m pip install --no-build-isolation --no-deps --disable-pip-version-check .
}

memcheck_quant_tests() {
  # One cudaMalloc per tensor, so an access past a tensor's end leaves its allocation, which memcheck sees.
  local filter=()
  if compute-sanitizer --help 2>/dev/null | grep -- '--kernel-name ' >/dev/null; then
    filter=(--kernel-name kns=quantize_)  # instrument the quantization kernels only; torch's run at full speed
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 "${filter[@]}" \
    "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/cuda/test_quant_cuda.py
}

memcheck_gemm_tests() {
  # The WGMMA kernels only (TMA loads and stores): the tail, strided-output, small cluster and masked tests, on
  # the kernel path (the fallback runs torch's and the quantization kernels, checked above).
  local filter=() tests="kernel and (tails or strided or masked or (cluster and 1100))"
  if compute-sanitizer --help 2>/dev/null | grep -- '--kernel-name ' >/dev/null; then
    filter=(--kernel-name kns=fp8_gemm)
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 "${filter[@]}" \
    "$py" -m pytest -q -p no:cacheprovider -m "not slow" -k "$tests" tests/cuda/test_fp8_gemm_cuda.py
}

has_bench_main() {
  "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("dsv3.bench.__main__") is None)'
}

export -f environment build memcheck_quant_tests memcheck_gemm_tests

step environment 30 environment || true
step build 240 build || finish
step sass_audit 45 "$py" tools/sass_audit.py --json "$results/sass_audit.json" || true
step pytest_cuda 220 "$py" -m pytest -q -p no:cacheprovider --ignore=tests/cuda/test_train_cuda.py tests/cuda \
  tests/test_sass_audit.py || true
if command -v compute-sanitizer >/dev/null; then
  step memcheck_quant 60 memcheck_quant_tests || true
  step memcheck_gemm 75 memcheck_gemm_tests || true
else
  note "compute-sanitizer not found: memcheck skipped"
fi
step bench_quant 60 "$py" benchmarks/gpu_bench.py --json "$results/gpu_bench.json" || true
step bench_gemm_v3 90 "$py" benchmarks/gpu_bench.py --gemm --iters 20 --json "$results/gpu_bench_gemm.json" || true
step bench_mla 50 "$py" benchmarks/gpu_bench.py --mla --iters 10 --json "$results/gpu_bench_mla.json" || true
if has_bench_main; then
  step bench_gemm 60 "$py" -m dsv3.bench gemm --device cuda || true
else
  note "dsv3.bench has no __main__: GEMM timings skipped"
fi
# The trainer on the GPU (FP8 and BF16 runs, CPU agreement, resume), then the training-step benchmark (SPEC §8:
# dsv3's FP8 step against transformers' fwd+bwd on the same weights; transformers rows only where installed).
step pytest_train 100 "$py" -m pytest -q -p no:cacheprovider tests/cuda/test_train_cuda.py || true
step bench_train 75 "$py" -m dsv3.bench train --device cuda --json "$results/bench_train.json" || true
# Intranode EP (nvlink backend vs torch/NCCL): needs 2, 4 or 8 GPUs; its correctness tests ran in pytest_cuda.
num_gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$num_gpus" -ge 2 ]; then
  step bench_ep_nvlink 90 "$py" benchmarks/ep_gpu_bench.py --iters 10 --json "$results/ep_gpu_bench.json" || true
else
  note "fewer than 2 GPUs ($num_gpus): EP nvlink benchmark skipped"
fi
finish

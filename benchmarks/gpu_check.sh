#!/usr/bin/env bash
# Every GPU path of mbdl, then its GPU figures, in a few minutes on one CUDA GPU:
#   1. the GPU-marked tests (AMP fp16 with a GradScaler, bf16, one-process NCCL under torchrun,
#      kNN / k-means / metrics on the GPU, pinned-memory loading) and the GPU kNN test;
#   2. benchmarks/gpu_check.py: trainer vs network alone (ResNet-50, 224 px, bf16; in-memory
#      images, a JPEG folder, GPU JPEG decoding), the losses at B = 4096, kNN at N = 1,000,000.
# Results go to $OUT (or ./gpu_check_out): gpu_tests.log, gpu_check.json, gpu_check.md; publish
# them with `python benchmarks/gpu_check.py --publish gpu_check.json`.
#
#   PYTHONPATH=src bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MBDL_CACHE="${MBDL_CACHE:-$(mktemp -d)}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    "tests/test_knn.py::test_knn_on_gpu_equals_cpu" 2>&1 | tee "$out/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
summary=$(grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1)

python3 benchmarks/gpu_check.py --out "$out" --tests "${summary:-no summary} (exit $tests_status)"
bench_status=$?
exit $(( tests_status != 0 || bench_status != 0 ))

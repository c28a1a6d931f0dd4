#!/usr/bin/env bash
# Every GPU path of mbdl, then its GPU figures, in a few minutes on one CUDA GPU:
#   1. the GPU-marked tests (AMP fp16 with a GradScaler, bf16, one-process NCCL under torchrun,
#      kNN / k-means / metrics on the GPU, pinned-memory loading, batched nvJPEG decoding, the
#      fast embedding path, training from the disk cache) and the GPU kNN test;
#   2. benchmarks/gpu_check.py: trainer vs network alone (ResNet-50, 224 px, bf16) from (a)
#      in-memory images, (b) a folder of 500 x 375 JPEGs decoded every epoch, (c) the same
#      folder through the disk cache, and GPU JPEG decoding; embed throughput against the
#      network alone; the losses at B = 4096; kNN at N = 1,000,000;
#   3. benchmarks/jpeg_path.py on this machine's CPU: the JPEG path alone, images/s per core;
#   4. benchmarks/image_commands.py: `embed --images` and `index build --images` throughput
#      (ResNet-50, 224 px, 500 x 375 JPEGs, the CPUs but one as loader workers), the per-image
#      PIL path against the fast path, both against the network alone.
# Results go to $OUT (or ./gpu_check_out): gpu_tests.log, gpu_check.json, gpu_check.md,
# jpeg_path.json, image_commands.json/.md; publish them with
# `python benchmarks/gpu_check.py --publish gpu_check.json`.
#
#   PYTHONPATH=src bash benchmarks/gpu_check.sh            # on a CUDA machine
#   PYTHONPATH=src bash benchmarks/gpu_check.sh --smoke    # toy sizes on any machine (no tests)
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=""
if [[ "${1:-}" == "--smoke" ]]; then smoke="--smoke"; fi
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MBDL_CACHE="${MBDL_CACHE:-$(mktemp -d)}"
python=${PYTHON:-python3}
tests_status=0
if [[ -z "$smoke" ]]; then
    $python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    $python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fastpath.py \
        tests/test_fast_image_commands.py "tests/test_knn.py::test_knn_on_gpu_equals_cpu" \
        2>&1 | tee "$out/gpu_tests.log"
    tests_status=${PIPESTATUS[0]}
    summary=$(grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 1)
else
    summary="not run (--smoke)"
fi

$python benchmarks/gpu_check.py $smoke --out "$out" --tests "${summary:-no summary} (exit $tests_status)"
bench_status=$?
$python benchmarks/jpeg_path.py $smoke --out "$out"
jpeg_status=$?
if [[ -z "$smoke" ]]; then
    workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
    $python benchmarks/image_commands.py --backbone resnet50 --images 2000 --batch-size 256 \
        --workers "$workers" --repeats 2 --out "$out"
else
    $python benchmarks/image_commands.py --smoke --out "$out"
fi
commands_status=$?
exit $(( tests_status != 0 || bench_status != 0 || jpeg_status != 0 || commands_status != 0 ))

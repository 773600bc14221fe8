#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (torch preinstalled, no network):
#   bash bench/gpu_checks.sh OUT_DIR
# Needs the wheels of open_clip_torch, webdataset, zarr (+ deps) in .whl/ (see bench/RESULTS.md).
# NO_TESTS=1 skips the CUDA tests; PRECOMPUTE=1 adds the precompute bench (measured 2026-11-26 on an H200); WORKERS sets distill's workers.
# Writes OUT_DIR/gpu.log and OUT_DIR/*.jsonl; results go into bench/RESULTS.md by hand, with the card's name.
# SECTIONS="tests distill teacher precompute compile decode precision" (default: all) picks sections, so a 10-minute call can
# run part of it; each section has its own timeout.
set -uo pipefail
OUT=${1:?usage: bench/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SECTIONS=${SECTIONS:-tests distill teacher precompute compile decode precision}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  if [ -z "${NO_TESTS:-}" ] && on tests; then
    echo "== GPU tests"
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_views.py tests/test_losses.py 2>&1 | tail -5
  fi
  on distill && {
  echo "== distill ratios: ViT-B-16 student, ViT-H-14-378 teacher, bf16, ImageNet-sized JPEGs"
  timeout ${DISTILL_TIMEOUT:-300} python3 bench/bench_distill.py --student ViT-B-16-quickgelu --teacher ViT-H-14-378-quickgelu \
      --device cuda --precision bf16 --batch-size 128 --steps 60 --workers ${WORKERS:-8} --images 8192 --views 1 --classes 1000 \
      --teacher-batch-size 256 --results "$OUT/distill.jsonl" 2>&1 | grep -v "^step \|^precompute-teacher\|^prepare\|^split"
  }
  on teacher && {
  echo "== teacher forward: eager vs torch.compile, fp16, MFU against the dense peak (PEAK_TFLOPS, default 989: H100/H200)"
  timeout ${TEACHER_TIMEOUT:-240} python3 bench/bench_teacher.py --model ViT-H-14-378-quickgelu --device cuda --precision fp16 \
      --batch-size 128 --warmup 3 --iters 10 --peak-tflops ${PEAK_TFLOPS:-989} --results "$OUT/teacher.jsonl"
  }
  on precompute && {
  echo "== precompute-teacher / bare teacher, ViT-H-14-378, fp16, compiled (the CUDA default) in both"
  timeout ${PRECOMPUTE_TIMEOUT:-420} python3 bench/bench_precompute.py --model ViT-H-14-378-quickgelu --device cuda --precision fp16 \
      --compile --batch-size 256 --images ${PRECOMPUTE_IMAGES:-8192} --views 2 --workers ${WORKERS:-8} --classes 1000 --shard-size 512
  }
  on compile && {
  echo "== student step and distill with --compile (ViT-B-16 student, bf16), MFU of the student-only step"
  timeout ${COMPILE_TIMEOUT:-300} python3 bench/bench_distill.py --student ViT-B-16-quickgelu --teacher ViT-H-14-378-quickgelu \
      --device cuda --precision bf16 --batch-size 128 --steps 60 --workers ${WORKERS:-8} --images 8192 --views 1 --classes 1000 \
      --teacher-batch-size 256 --compile --peak-tflops ${PEAK_TFLOPS:-989} --results "$OUT/distill.jsonl" 2>&1 \
      | grep -v "^step \|^precompute-teacher\|^prepare\|^split"
  }
  on decode && {
  echo "== the same with --decode gpu (nvJPEG in batches; workers only read bytes and cache rows)"
  timeout ${COMPILE_TIMEOUT:-300} python3 bench/bench_distill.py --student ViT-B-16-quickgelu --teacher ViT-H-14-378-quickgelu \
      --device cuda --precision bf16 --batch-size 128 --steps 60 --workers ${WORKERS:-8} --images 8192 --views 1 --classes 1000 \
      --teacher-batch-size 256 --compile --decode gpu --peak-tflops ${PEAK_TFLOPS:-989} --results "$OUT/distill.jsonl" 2>&1 \
      | grep -v "^step \|^precompute-teacher\|^prepare\|^split"
  }
  on precision && {
  echo "== teacher precision: fp16 and bf16 probabilities against fp32 (ViT-H-14-378-quickgelu, random init)"
  timeout 120 python3 bench/teacher_precision.py --model ViT-H-14-378-quickgelu --pretrained none --device cuda \
      --images 256 --classes 1000 --batch-size 64 --results "$OUT/precision.jsonl"
  }
  if [ -n "${PRECOMPUTE:-}" ]; then
    echo "== precompute efficiency: ViT-H-14-378-quickgelu, random init, bf16"
    timeout 200 python3 bench/bench_precompute.py --model ViT-H-14-378-quickgelu --device cuda --precision bf16 \
        --batch-size 128 --images 1024 --views 1 --workers 14 --classes 1000 --shard-size 128 --topk 0 2>&1 | grep -v "^precompute-teacher\|^prepare\|^index"
  fi
} 2>&1 | tee "$OUT/gpu.log"

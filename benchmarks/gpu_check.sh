#!/usr/bin/env bash
# One short GPU check for a lent GPU machine (about 2 minutes). From the repository root:
#   STUDENT=runs/distill-XXXX benchmarks/gpu_check.sh
# The data must be reachable: $KDEDGE_DATA/fashion-mnist (e.g. a carried .data/fashion-mnist).
# Results go to ${OUT:-.}/gpu_check.json and the log to ${OUT:-.}/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}"
STUDENT="${STUDENT:-$(ls -d runs/distill-* 2>/dev/null | tail -n 1)}"
[ -n "$STUDENT" ] || { echo "gpu_check: no student; set STUDENT=RUN_DIR (make demo writes one)" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import torch, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
  "$PY" benchmarks/gpu_check.py --student "$STUDENT" --out "$OUT_DIR/gpu_check.json" "$@"
  # The harness itself on the GPU: torch eager FP32/FP16 with CUDA events, teacher vs student.
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    rm -rf "$OUT_DIR/bench-cuda"
    "$PY" -m kdedge bench "$STUDENT" --teacher resnet --targets torch-cuda --batch-sizes 1,32,256,1024 --min-s 0.5 --out "$OUT_DIR/bench-cuda"
    sed -n '/## Teacher vs student/,$p' "$OUT_DIR/bench-cuda/report.md"
  fi
} 2>&1 | tee "$OUT_DIR/gpu_check.log"

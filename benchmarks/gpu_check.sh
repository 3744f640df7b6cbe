#!/usr/bin/env bash
# One short GPU check for a lent GPU machine (about 4 minutes on an H100). From the repository root:
#   STUDENT=runs/distill-XXXX benchmarks/gpu_check.sh
# The data must be reachable: $KDEDGE_DATA/fashion-mnist (e.g. a carried .data/fashion-mnist).
# pytest, if the machine lacks it, can be carried as a folder of pure-Python packages in .gpu-py/.
# Results go under ${OUT:-.}: gpu_check.json, scale-cuda.json, bench-cuda/, bundle/, and the log gpu_check.log.
# Each step runs even when an earlier one failed; the failures are listed at the end (exit 1). SKIP_SCALE=1 leaves out scale.py (2 min).
# The CPU path (no GPU visible) runs only gpu_check.py, and takes about 15 minutes on a 2-core machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STUDENT="${STUDENT:-$(ls -d runs/distill-* 2>/dev/null | tail -n 1)}"
if [ -z "$STUDENT" ]; then  # none carried: distill the default student here (about 30 s on an H100), and bring it back under $OUT
  echo "gpu_check: no student given; distilling the default one into $OUT_DIR/student"
  rm -rf "$OUT_DIR/student"
  "$PY" -m kdedge distill --quiet --out "$OUT_DIR/student" || { echo "gpu_check: the distillation failed" >&2; exit 2; }
  STUDENT="$OUT_DIR/student"
fi
FAILED=()
step() {  # step NAME COMMAND...: run, time and record a failure without stopping
  local name="$1"; shift
  echo "== $name"
  local t0=$SECONDS
  "$@" || FAILED+=("$name (rc $?)")
  echo "== $name: $((SECONDS - t0)) s"
}
has_cuda() { "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import torch, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
  # Exporters and FP16 parity on CUDA, CUDA-event latency of teacher vs student (and an engine build if tensorrt imports).
  step gpu_check.py "$PY" benchmarks/gpu_check.py --student "$STUDENT" --out "$OUT_DIR/gpu_check.json" "$@"
  if has_cuda; then
    # The harness itself on the GPU: torch eager FP32/FP16 with CUDA events, teacher vs student.
    rm -rf "$OUT_DIR/bench-cuda"
    step bench "$PY" -m kdedge bench "$STUDENT" --teacher resnet --targets torch-cuda --batch-sizes 1,32,256,1024 --min-s 0.5 --out "$OUT_DIR/bench-cuda"
    [ -f "$OUT_DIR/bench-cuda/report.md" ] && sed -n '/## Teacher vs student/,$p' "$OUT_DIR/bench-cuda/report.md"
    # Mixed precision and channels-last on CUDA: student training and teacher forward throughput.
    [ -n "${SKIP_SCALE:-}" ] || step scale "$PY" benchmarks/scale.py --device cuda --train-limit 30000 --teacher-samples 10000 --out "$OUT_DIR/scale-cuda.json"
    # kdedge search timed on the GPU (issue 27): candidates at FP16 on torch-cuda, batch 256, a short search.
    rm -rf "$OUT_DIR/search-cuda"
    step search-cuda "$PY" -m kdedge search --quiet --target torch-cuda --target-precision fp16 --target-batch 256 --latency-budget "${SEARCH_BUDGET_MS:-0.5}" \
      --time-budget 2 --candidates 12 --generations 1 --children 4 --finalists 1 --epochs 5 --out "$OUT_DIR/search-cuda"
    # The whole pipeline with a GPU visible: formats/targets auto add ONNX FP16 and torch-cuda.
    rm -rf "$OUT_DIR/bundle"
    step compress-and-export "$PY" -m kdedge compress-and-export --quiet --out "$OUT_DIR/bundle"
    step verify "$PY" -m kdedge verify "$OUT_DIR/bundle"
    [ -f "$OUT_DIR/bundle/report.md" ] && head -n 40 "$OUT_DIR/bundle/report.md"
    # CUDA-only tests: fp16/bf16 training, exact resume with a gradient scaler and CUDA RNG state.
    step pytest-gpu env PYTHONPATH="$PWD/.gpu-py:$PYTHONPATH" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
  else
    echo "gpu_check: no CUDA GPU visible; ran the CPU path of gpu_check.py only"
  fi
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  if [ ${#FAILED[@]} -gt 0 ]; then echo "gpu_check: failed steps: ${FAILED[*]}"; else echo "gpu_check: all steps passed"; fi
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
grep -q "all steps passed" "$OUT_DIR/gpu_check.log"

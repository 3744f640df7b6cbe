#!/usr/bin/env bash
# Train the shipped teacher on a lent GPU machine, then run kd_vs_scratch there for a quick
# signal on the student recipe (the README's numbers come from the CPU run, not this one).
# Needs the Fashion-MNIST IDX files in $KDEDGE_DATA/fashion-mnist. Writes into ${OUT:-gpu-out}.
set -euo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 KDEDGE_CACHE=${KDEDGE_CACHE:-/tmp/kdedge-cache}
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 scripts/train_teacher.py --device cuda --epochs "${TEACHER_EPOCHS:-40}" --run-dir /tmp/teacher-run 2>&1 | tee "$OUT/teacher.log"
cp kdedge/models/weights/resnet-fashion-mnist.safetensors "$OUT/"
cp /tmp/teacher-run/metrics.json "$OUT/teacher_metrics.json"
sweep() {  # name, then kd_vs_scratch arguments
  local name=$1; shift
  python3 benchmarks/kd_vs_scratch.py --device cuda --cache memory "$@" > "/tmp/sweep-$name.md" 2>&1 || echo "FAILED $name" >> "/tmp/sweep-$name.md"
}
sweep e15-a0.9-T4 --epochs 15 --alpha 0.9 --temperature 4 &
sweep e15-a0.5-T4 --epochs 15 --alpha 0.5 --temperature 4 &
sweep e15-a0.9-T8 --epochs 15 --alpha 0.9 --temperature 8 &
sweep e15-a0.9-T4-lr0.1 --epochs 15 --alpha 0.9 --temperature 4 --lr 0.1 &
sweep e25-a0.9-T4 --epochs 25 --alpha 0.9 --temperature 4 &
wait
for f in /tmp/sweep-*.md; do echo "=== $f"; cat "$f"; done | tee "$OUT/sweeps.md"

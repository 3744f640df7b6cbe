"""Teacher vs a student, each at its own best onnxruntime settings, timed side by side.

    python benchmarks/best_settings.py RUN_DIR [RUN_DIR ...]     # e.g. a search's OUT/student

Each model (the shipped teacher, then every student checkpoint given) is exported to ONNX FP32 and
tuned (`kdedge.bench.tuning.tune_onnx`: intra-op threads 1..cores, graph optimization level,
execution mode); then all of them run at their best settings in one interleaved measurement
(`measure_interleaved`, 20 rounds), and each student's speedup over the teacher is that run's ratio.
Prints a table and the CPU flags; writes benchmarks/results/best_settings.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.bench.timing import measure_interleaved
from kdedge.bench.tuning import settings_call, tune_onnx
from kdedge.exporters.onnx import export_onnx
from kdedge.models import load_checkpoint


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    env = capture_environment()
    print(f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | cores {env['cpu'].get('usable_cores')} | "
          f"onnxruntime {env['versions'].get('onnxruntime')}")
    data = kdedge.load_dataset("fashion-mnist", train_limit=1000, test_limit=100)
    x1 = data.test.inputs(slice(0, 1)).numpy()
    work = Path(tempfile.mkdtemp(prefix="kdedge-best-"))
    models = {"teacher (resnet)": kdedge.resolve_teacher("resnet", data.spec).model}
    accuracy = {}
    for ref in argv:
        ckpt = load_checkpoint(ref)
        models[ckpt.spec.name] = ckpt.model
        metrics = Path(ref) / "metrics.json"
        if metrics.is_file():
            accuracy[ckpt.spec.name] = json.loads(metrics.read_text())["test"]["accuracy"]
    paths, tuned = {}, {}
    for i, (name, model) in enumerate(models.items()):
        paths[name] = work / f"{i}.onnx"
        export_onnx(model.eval(), paths[name], input_shape=tuple(x1.shape[1:]))
        tuned[name] = tune_onnx(paths[name], x1)
    side = measure_interleaved({n: settings_call(paths[n], x1, tuned[n].best) for n in models}, rounds=20, block_s=0.1)
    teacher = next(iter(models))
    print("\n| model | best settings (threads, graph opt, mode) | tuned p50 µs | side-by-side p50 µs | speedup vs teacher | test acc |")
    print("|---|---|---:|---:|---:|---:|")
    for n in models:
        b = tuned[n].best
        acc = f"{accuracy[n]:.4f}" if n in accuracy else "—"
        print(f"| {n} | {b['intra_op_threads']}, {b['graph_optimization_level']}, {b['execution_mode']} | {1e3 * tuned[n].p50_ms:.1f} | "
              f"{1e3 * side[n].p50_ms:.1f} | {side[teacher].p50_ms / side[n].p50_ms:.1f}x | {acc} |")
    out = Path(__file__).resolve().parent / "results" / "best_settings.json"
    out.write_text(json.dumps({"env": env, "models": {n: {"tuning": tuned[n].to_dict(), "side_by_side_p50_ms": side[n].p50_ms,
                                                          "speedup_vs_teacher": side[teacher].p50_ms / side[n].p50_ms,
                                                          "test_accuracy": accuracy.get(n)} for n in models}}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

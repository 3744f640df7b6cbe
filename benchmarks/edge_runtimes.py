"""Teacher and student on every runtime: the README's edge-runtime table, measured in one run on this CPU.

    python benchmarks/edge_runtimes.py [--out DIR] [--min-s 1.0] [--json benchmarks/results/edge_runtimes.json]

1. `kdedge compress-and-export --edge` (the embedded default, whose formats and targets `auto` then
   take every installed edge runtime, FP32 and INT8), timed, and the plain default (ONNX only)
   right after it, so the edge formats' cost is measured in one run.
2. The shipped teacher exported to every runtime's FP32 (parity vs PyTorch on 1,000 test images,
   accuracy on the 10,000 through each runtime).
3. `benchmark()` of teacher and student on torch-cpu, ort-cpu, executorch-cpu, litert-cpu,
   openvino-cpu and ort-mobile-cpu, at batch 1 and 32, with 1 and then 2 threads.

Prints the table (p50, throughput, accuracy, bytes, max |Δ| vs PyTorch per artifact) and the
runtime the bundle recommends per target, and writes everything to --json. Timing on this machine
drifts ±25 % over seconds: compare rows within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.bench.env import capture_environment
from kdedge.bench.harness import benchmark, resolve_bench_model
from kdedge.bundle import compress_and_export, installed_edge_formats
from kdedge.config import BenchConfig, CompressConfig, ExportConfig
from kdedge.data import load_dataset
from kdedge.exporters import export_model
from kdedge.exporters.edge import EDGE_FORMATS
from kdedge.models.zoo import load_checkpoint, pretrained_path


def _log(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="Directory for the bundles and exports (default: a temporary one).")
    ap.add_argument("--min-s", type=float, default=1.0, help="Timed seconds per measurement.")
    ap.add_argument("--json", default="benchmarks/results/edge_runtimes.json")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kdedge-edge-"))
    edge = installed_edge_formats()
    print(f"edge runtimes installed: {', '.join(edge)}", flush=True)
    result: dict = {"env": capture_environment(None), "edge_formats": list(edge)}

    # 1. The default bundle with and without the edge formats.
    builds = {}
    for name, overrides in (("edge", {"edge": True}), ("default", {})):
        start = time.perf_counter()
        bundle = compress_and_export(CompressConfig(out=str(out / f"bundle-{name}"), **overrides), log=_log)
        wall = time.perf_counter() - start
        m = bundle.manifest
        builds[name] = {"wall_s": wall, "timings_s": m["timings_s"], "formats": m["resolved"]["formats"], "targets": m["resolved"]["targets"],
                        "recommended": {t: {k: r.get(k) for k in ("variant", "p50_ms", "accuracy", "tuned_p50_ms")} for t, r in m["recommended"].items()},
                        "fastest": m.get("fastest")}
        _log(f"bundle {name}: {wall:.1f} s wall; " + ", ".join(f"{k} {v:.1f} s" for k, v in m["timings_s"].items()))
    result["bundles"] = builds
    bundle_dir = out / "bundle-edge"

    # 2. The teacher on every runtime (FP32), parity-checked and scored through each.
    data = load_dataset("fashion-mnist")
    teacher_ckpt = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist"))
    formats = ("onnx", *edge)
    start = time.perf_counter()
    teacher_export = export_model(teacher_ckpt.model, out / "teacher-export", data=data, config=ExportConfig(formats=formats), model_name="resnet",
                                  source_sha256=teacher_ckpt.sha256, log=_log)
    result["teacher_export_s"] = time.perf_counter() - start
    result["teacher_export_seconds"] = teacher_export.manifest["seconds"]

    # 3. Teacher and student on every target, 1 and 2 threads, batch 1 and 32.
    teacher = resolve_bench_model("resnet", role="teacher")
    teacher.artifacts = resolve_bench_model(str(out / "teacher-export")).artifacts
    student = resolve_bench_model(str(bundle_dir / "student.safetensors"), role="student")
    student.artifacts = resolve_bench_model(str(bundle_dir / "models")).artifacts
    targets = ("torch-cpu", "ort-cpu", *(EDGE_FORMATS[name].target for name in edge))
    artifacts = {("teacher", a["path"]): a for a in teacher_export.manifest["artifacts"]}
    artifacts |= {("student", a["path"]): a for a in json.loads((bundle_dir / "models" / "export.json").read_text())["artifacts"]}
    rows = []
    for threads in (1, 2):
        config = BenchConfig(targets=targets, batch_sizes=(1, 32), threads=threads, min_s=args.min_s, accuracy=False, export_variants=("fp32",), plots=False)
        report = benchmark([teacher, student], data, config, log=_log)
        rows += report["rows"]
    result["rows"] = rows
    result["artifacts"] = {f"{role}/{path}": {"format": a["format"], "precision": a["precision"], "bytes": a["bytes"],
                                               "max_abs_diff_vs_torch": a["parity"]["outputs"][0]["max_abs_diff"],
                                               "argmax_agreement": a["parity"]["outputs"][0]["argmax_agreement"],
                                               "accuracy": (a.get("accuracy") or {}).get("accuracy"), "runtime": (a.get("details") or {}).get("runtime")}
                           for (role, path), a in artifacts.items()}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    result["torch_accuracy"] = {"teacher": manifest["teacher"]["test_accuracy"], "student": manifest["student"]["test_accuracy"]}

    _print_tables(result, teacher, student)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}; bundles and exports in {out}")
    return 0


def _print_tables(result: dict, teacher, student) -> None:
    env = result["env"]
    cpu = env["cpu"]
    print(f"\n{cpu['model']}, {cpu.get('usable_cores')} cores ({' '.join(cpu.get('flags', []))}); "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    files = {"teacher": teacher.artifacts, "student": student.artifacts}
    by_path = {}
    for key, a in result["artifacts"].items():
        by_path[key] = a
    print("\n| model | variant @ target | threads | p50 b1 (µs) | p50 b32 (µs) | samples/s b32 | test acc | bytes | max abs diff vs torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    index = {(r["role"], r["variant"], r["target"], r["threads"], r["batch"]): r for r in result["rows"]}
    for (role, variant, target, threads, batch), r in index.items():
        if batch != 1:
            continue
        b32 = index.get((role, variant, target, threads, 32))
        path = files[role].get(variant)
        a = by_path.get(f"{role}/{path.name}") if path is not None else None
        acc = a["accuracy"] if a else result["torch_accuracy"][role]
        diff = f"{a['max_abs_diff_vs_torch']:.1e}" if a else "(reference)"
        size = r["bytes"]
        print(f"| {r['model']} ({role}) | {variant} @ {target} | {threads} | {1e3 * r['latency_ms']['p50_ms']:,.1f} | "
              f"{1e3 * b32['latency_ms']['p50_ms']:,.1f} | {b32['throughput_per_s']:,.0f} | {100 * acc:.2f} % | {size / 1024:,.0f} KiB | {diff} |"
              if b32 else f"| {r['model']} ({role}) | {variant} @ {target} | {threads} | {1e3 * r['latency_ms']['p50_ms']:,.1f} | — | — | {100 * acc:.2f} % | "
              f"{size / 1024:,.0f} KiB | {diff} |")
    print("\n| bundle | wall (s) | export (s) | bench (s) | tune (s) | formats |")
    print("|---|---:|---:|---:|---:|---|")
    for name, b in result["bundles"].items():
        t = b["timings_s"]
        print(f"| {name} | {b['wall_s']:.0f} | {t.get('export', 0):.0f} | {t.get('bench', 0):.0f} | {t.get('tune', 0):.0f} | {', '.join(b['formats'])} |")
    print("\nrecommended by the default bundle (batch-1 p50 on each target, within the INT8 accuracy gate):")
    for target, rec in result["bundles"]["edge"]["recommended"].items():
        print(f"  {target}: {rec['variant']} p50 {1e3 * rec['p50_ms']:.1f} µs")
    if result["bundles"]["edge"].get("fastest"):
        f = result["bundles"]["edge"]["fastest"]
        print(f"  fastest: {f['target']} ({f['variant']})")


if __name__ == "__main__":
    raise SystemExit(main())

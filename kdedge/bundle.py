"""Deployment bundles: distill -> export -> benchmark -> gate -> one verifiable directory.

A bundle is built in a temporary sibling directory and renamed into place only when every gate
passes, so a run killed at any moment leaves either a whole bundle or none. A run that fails a
gate keeps its candidate under ``<out>.rejected`` for inspection and publishes nothing.

Layout::

    BUNDLE/
      manifest.json        what a deployment pipeline verifies (see README for every key)
      models/              model.onnx, model.int8.onnx[, model.fp16.onnx, model.<p>.plan], export.json
      student.safetensors  the distilled student (weights + model and dataset specs)
      config.yaml          the resolved config; `kdedge build --config` repeats the run
      report.json, report.md, plots/   the benchmark
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from kdedge._version import __version__
from kdedge._fs import file_sha256, new_dir, umask
from kdedge.config import BenchConfig, CompressConfig, DistillConfig, ExportConfig, config_to_yaml
from kdedge.errors import ConfigError, KdedgeError

__all__ = ["MANIFEST_SCHEMA", "GateFailure", "VerifyError", "BundleResult", "compress_and_export", "resolve_auto", "verify_bundle", "recommend", "evaluate_gates"]

MANIFEST_SCHEMA = 1


class GateFailure(KdedgeError):
    """The candidate bundle missed a gate; nothing was published (the CLI exits with 3)."""

    exit_code = 3


class VerifyError(KdedgeError):
    """A bundle does not match its manifest."""


@dataclass
class BundleResult:
    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    archive: Path | None = None



def _artifact_variant(a: dict[str, Any]) -> str:
    return ("trt-" if a["format"] == "tensorrt" else "onnx-") + a["precision"]


def recommend(rows: list[dict[str, Any]], artifacts: list[dict[str, Any]], *, max_quant_drop: float) -> dict[str, dict[str, Any]]:
    """Per target, the fastest student artifact (batch-1 p50) whose accuracy is within the gate of FP32.

    INT8 is not always faster — on a ~100 k-parameter CNN it can be slower — so this is decided
    by the measured rows, never by precision alone.
    """
    fp32_acc = next((a["accuracy"]["accuracy"] for a in artifacts if a["format"] == "onnx" and a["precision"] == "fp32" and a.get("accuracy")), None)
    by_variant = {_artifact_variant(a): a for a in artifacts if a.get("details", {}).get("for") != "tensorrt"}
    smallest = min((r["batch"] for r in rows), default=1)
    out: dict[str, dict[str, Any]] = {}
    for target in sorted({r["target"] for r in rows if r["role"] == "student" and r["variant"] in by_variant}):
        candidates = []
        for r in rows:
            if r["role"] != "student" or r["target"] != target or r["batch"] != smallest or r["variant"] not in by_variant:
                continue
            acc = (r.get("accuracy") or {}).get("top1")
            drop = None if acc is None or fp32_acc is None else 100 * (fp32_acc - acc)
            ok = drop is None or drop <= max_quant_drop
            candidates.append((r["latency_ms"]["p50_ms"], r["variant"], acc, drop, ok))
        passing = sorted(c for c in candidates if c[4])
        if not passing:
            continue
        p50, variant, acc, drop, _ = passing[0]
        out[target] = {
            "artifact": f"models/{by_variant[variant]['path']}",
            "variant": variant,
            "batch": smallest,
            "p50_ms": p50,
            "accuracy": acc,
            "why": "fastest at batch %d among variants within %.2g pt of FP32: %s" % (
                smallest, max_quant_drop, ", ".join(f"{v} {t:.4f} ms{'' if ok else ' (fails accuracy)'}" for t, v, _, _, ok in sorted(candidates))),
        }
    return out


def evaluate_gates(*, student_acc: float, teacher_acc: float, artifacts: list[dict[str, Any]], recommended: dict[str, dict[str, Any]],
                   rows: list[dict[str, Any]], config: CompressConfig) -> dict[str, dict[str, Any]]:
    """Every gate with its measured value, its limit and whether it passed."""
    gates: dict[str, dict[str, Any]] = {}
    retention = student_acc / teacher_acc if teacher_acc else 0.0
    gates["min_retention"] = {"value": retention, "limit": config.min_retention, "passed": retention >= config.min_retention,
                              "detail": f"student {student_acc:.4f} / teacher {teacher_acc:.4f}"}
    drops = [a["accuracy"]["drop_vs_fp32_pt"] for a in artifacts if a["precision"] == "int8" and a.get("accuracy") and "drop_vs_fp32_pt" in a["accuracy"]]
    if drops:
        worst = max(drops)
        gates["max_quant_drop"] = {"value": worst, "limit": config.max_quant_drop, "passed": worst <= config.max_quant_drop, "detail": "INT8 accuracy drop vs FP32, points"}
    if config.min_speedup is not None:
        eager = {r["batch"]: r for r in rows if r["role"] == "teacher" and r["target"] == "torch-cpu" and r["variant"] == "torch-fp32"}
        best = None
        for target, rec in recommended.items():
            base = eager.get(rec["batch"])
            if base is not None:
                speedup = base["latency_ms"]["p50_ms"] / rec["p50_ms"]
                best = max(best or 0.0, speedup)
        gates["min_speedup"] = {"value": best, "limit": config.min_speedup, "passed": best is not None and best >= config.min_speedup,
                                "detail": "recommended artifact's batch-1 p50 vs the teacher in eager PyTorch on the CPU"}
    return gates


#: Files whose bytes carry timings or timestamps; every other file is reproducible bit for bit.
_TIMING_FILES = ("models/export.json", "report.json", "report.md", "plots/")


def _files_entry(root: Path, skip: set[str]) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        deterministic = not any(rel == t or (t.endswith("/") and rel.startswith(t)) for t in _TIMING_FILES)
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": file_sha256(path), "deterministic": deterministic})
    return files


def _rejected_path(out: Path) -> Path:
    candidate = out.with_name(out.name + ".rejected")
    if candidate.exists():
        candidate = out.with_name(f"{out.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}")
    return candidate


def _write_archive(bundle: Path) -> Path:
    """``<bundle>.tar.gz`` with the bundle directory as its single top-level entry, written atomically."""
    archive = bundle.with_name(bundle.name + ".tar.gz")
    tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(bundle, arcname=bundle.name, filter=lambda ti: ti if not ti.name.endswith(".tmp") else None)
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)
    return archive


def resolve_auto(config: CompressConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The formats and targets ``auto`` means on this machine (see :class:`CompressConfig`)."""
    import importlib.util

    cuda = torch.cuda.is_available()
    trt = cuda and importlib.util.find_spec("tensorrt") is not None
    formats = config.formats
    if formats == ("auto",):
        formats = ("onnx", "onnx-int8") + (("onnx-fp16",) if cuda else ()) + (("tensorrt",) if trt else ())
    targets = config.targets
    if targets == ("auto",):
        targets = ("torch-cpu", "ort-cpu") + (("torch-cuda",) if cuda else ()) + (("trt",) if trt else ())
    return formats, targets


def compress_and_export(config: CompressConfig | None = None, *, progress: bool = False, log: Callable[[str], None] | None = None) -> BundleResult:
    """The main job: distill the teacher into the student, export, benchmark, gate and bundle.

    Raises:
        GateFailure: A gate failed; the candidate is kept at ``<out>.rejected`` and no bundle is published.
        KdedgeError: Bad input anywhere along the way (one line each).
    """
    from kdedge.bench.harness import BenchModel, benchmark
    from kdedge.bench.report import write_report_files
    from kdedge.data import load_dataset
    from kdedge.exporters import export_model
    from kdedge.models.zoo import count_flops, count_parameters, save_checkpoint, state_dict_sha256
    from kdedge.resolve import resolve_student, resolve_teacher
    from kdedge.runs import distill

    config = config or CompressConfig()
    log = log or (lambda _line: None)
    out = new_dir(config.out, "bundle")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    formats, targets = resolve_auto(config)

    data = load_dataset(config.data, train_limit=config.train_limit, test_limit=config.test_limit)
    teacher, teacher_spec, teacher_name = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights)
    student, student_spec = resolve_student(config.student, data.spec, config.seed, weights=config.student_weights, flops_budget=config.flops_budget)
    log(f"distilling {teacher_name} -> {student_spec.name} on {data.spec.name} ({len(data.train)} train / {len(data.test)} test, {config.epochs} epochs)")
    start = time.perf_counter()
    distill_cfg = DistillConfig(**{k: v for k, v in config.to_dict().items() if k in DistillConfig.__dataclass_fields__} | {"out": None})
    result = distill(student, teacher, data.train, data.test, config=distill_cfg, student_spec=student_spec, teacher_name=teacher_name, progress=progress)
    timings["distill"] = time.perf_counter() - start
    student_acc, teacher_acc = result.test.accuracy, result.teacher_test.accuracy
    log(f"student {student_acc:.4f}, teacher {teacher_acc:.4f} (retention {student_acc / teacher_acc:.4f})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a published bundle follows the umask
    try:
        save_checkpoint(tmp / "student.safetensors", result.model, student_spec, data.spec, extra={"kdedge_version": __version__, "test_accuracy": student_acc})
        # Without `out`, so `kdedge build --config BUNDLE/config.yaml --out NEW` repeats the run and the file is reproducible.
        (tmp / "config.yaml").write_text(config_to_yaml(CompressConfig(**(config.to_dict() | {"out": None}))))
        start = time.perf_counter()
        export_cfg = ExportConfig(formats=formats, calibration_samples=config.calibration_samples, calibration_method=config.calibration_method,
                                  parity_samples=config.parity_samples)
        student_sha256 = file_sha256(tmp / "student.safetensors")
        exported = export_model(result.model, tmp / "models", data=data, config=export_cfg, model_name=student_spec.name,
                                source_sha256=student_sha256)
        timings["export"] = time.perf_counter() - start
        log("exported " + ", ".join(a.path for a in exported.artifacts) + (f" (skipped: {', '.join(exported.skipped)})" if exported.skipped else ""))

        start = time.perf_counter()
        artifacts = exported.manifest["artifacts"]
        student_bm = BenchModel(student_spec.name, role="student", module=result.model, params=count_parameters(result.model),
                                flops=count_flops(result.model, tuple(data.spec.input_shape)), bytes=(tmp / "student.safetensors").stat().st_size,
                                artifacts={_artifact_variant(a): tmp / "models" / a["path"] for a in artifacts if a.get("details", {}).get("for") != "tensorrt"})
        teacher_bm = BenchModel(teacher_spec.name, role="teacher", module=teacher, params=count_parameters(teacher),
                                flops=count_flops(teacher, tuple(data.spec.input_shape)), source=teacher_name)
        bench_cfg = BenchConfig(data=config.data, targets=targets, batch_sizes=config.batch_sizes, min_s=config.bench_min_s,
                                threads=config.bench_threads, export_variants=("fp32", "int8"), warmup_s=0.1, min_iters=20)
        report = benchmark([teacher_bm, student_bm], data, bench_cfg, log=log)
        write_report_files(report, tmp)
        timings["bench"] = time.perf_counter() - start

        recommended = recommend(report["rows"], artifacts, max_quant_drop=config.max_quant_drop)
        gates = evaluate_gates(student_acc=student_acc, teacher_acc=teacher_acc, artifacts=artifacts, recommended=recommended, rows=report["rows"], config=config)
        timings["total"] = time.perf_counter() - t_start
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "kdedge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "teacher": {"name": teacher_name, "model": teacher_spec.name, "sha256": state_dict_sha256(teacher), "params": teacher_bm.params,
                        "flops": teacher_bm.flops, "test_accuracy": teacher_acc},
            "student": {"model": student_spec.to_dict(), "weights": "student.safetensors", "sha256": student_sha256,
                        "params": student_bm.params, "flops": student_bm.flops, "test_accuracy": student_acc,
                        "test_macro_f1": result.test.macro_f1},
            "data": {"name": data.spec.name, "train_fingerprint": data.train.fingerprint(), "test_fingerprint": data.test.fingerprint(),
                     "train_samples": len(data.train), "test_samples": len(data.test), "files": data.spec.files},
            "input": exported.manifest["input"],
            "preprocessing": exported.manifest["preprocessing"],
            "labels": list(data.spec.labels),
            "artifacts": [
                {"path": f"models/{a['path']}", "format": a["format"], "precision": a["precision"], "bytes": a["bytes"], "sha256": a["sha256"],
                 "parity": {"passed": a["parity"]["passed"], "samples": a["parity"]["samples"],
                            "max_abs_diff": a["parity"]["outputs"][0]["max_abs_diff"], "argmax_agreement": a["parity"]["outputs"][0]["argmax_agreement"]},
                 "accuracy": (a.get("accuracy") or {}).get("accuracy"), "for": a.get("details", {}).get("for", "any")}
                for a in artifacts
            ],
            "skipped": exported.skipped,
            "gates": gates,
            "recommended": recommended,
            "performance": {"rows": len(report["rows"]), "comparison": [c for c in report["comparison"] if c["batch"] == min(config.batch_sizes)]},
            "resolved": {"formats": list(formats), "targets": list(targets)},
            "reproducibility": {"seed": config.seed, "torch": torch.__version__, "numpy": np.__version__, "device": distill_cfg.device},
            "timings_s": timings,
        }
        manifest["files"] = _files_entry(tmp, skip={"manifest.json"})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        failed = {k: g for k, g in gates.items() if not g["passed"]}
        if failed:
            rejected = _rejected_path(out)
            os.rename(tmp, rejected)
            summary = "; ".join(f"{k}: {g['value'] if g['value'] is None else round(g['value'], 4)} vs limit {g['limit']} ({g['detail']})" for k, g in failed.items())
            raise GateFailure(f"gate failed, no bundle published: {summary}; the candidate is in {rejected}")
        os.rename(tmp, out)  # fails if out appeared meanwhile: never merge into another bundle
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    archive = _write_archive(out) if config.archive else None
    log(f"bundle {out} ({timings['total']:.0f} s)")
    return BundleResult(out=out, manifest=manifest, report=report, archive=archive)


def _smoke_inputs(manifest: dict[str, Any], batch: int = 2) -> np.ndarray:
    shape = [batch] + [int(d) for d in manifest["input"]["shape"][1:]]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=shape).astype(np.float32) * manifest["preprocessing"]["scale"]
    mean = np.asarray(manifest["preprocessing"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest["preprocessing"]["std"], np.float32).reshape(1, -1, 1, 1)
    return (pixels - mean) / std


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a bundle archive holding only regular files and directories below one folder.

    Stricter than tarfile's ``data`` filter, and independent of the Python patch level: any
    absolute path, ``..`` component, link (symbolic or hard), device or FIFO is refused before it
    is written, and no member may overwrite another.
    """
    root = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # streamed: members are judged one by one, in order
            parts = PurePosixPath(member.name).parts
            kind = "file" if member.isfile() else "directory" if member.isdir() else "symbolic link" if member.issym() else \
                "hard link" if member.islnk() else "device or FIFO"
            if not parts or member.name.startswith("/") or ".." in parts or kind not in ("file", "directory"):
                raise VerifyError(
                    f"{archive}: refusing archive member {member.name!r} ({kind}); a bundle archive holds only regular files "
                    "and directories inside one folder — it was not written by kdedge or was tampered with"
                )
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):
                raise VerifyError(f"{archive}: archive member {member.name!r} would land outside the extraction folder")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a body
            with source, open(target, "xb") as out:  # "x": a duplicate member cannot overwrite an earlier one
                shutil.copyfileobj(source, out, 1 << 20)


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Recompute every sha256 in the manifest and run each ONNX artifact on a smoke batch.

    Args:
        path: A bundle directory or a ``.tar.gz`` written with ``--archive``.

    Returns:
        A summary: files checked, ONNX models run.

    Raises:
        VerifyError: Naming every mismatch (missing files, wrong size or hash, models that fail).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix="kdedge-verify-") as tmp:
            try:
                _safe_extract(path, Path(tmp))
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise VerifyError(f"{path}: not a readable .tar.gz bundle ({exc})") from None
            roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if len(roots) != 1:
                raise VerifyError(f"{path}: expected one bundle directory inside the archive, found {len(roots)}")
            return verify_bundle(roots[0])
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise VerifyError(f"{path}: no manifest.json; expected a bundle directory or .tar.gz written by kdedge compress-and-export")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise VerifyError(f"{manifest_path}: schema {manifest.get('schema')!r}, this kdedge reads schema {MANIFEST_SCHEMA}")
    problems: list[str] = []
    listed = {f["path"]: f for f in manifest.get("files", [])}
    for a in manifest.get("artifacts", []):
        if a["path"] not in listed:
            problems.append(f"{a['path']}: an artifact missing from the manifest's file list")
        elif a["sha256"] != listed[a["path"]]["sha256"]:
            problems.append(f"{a['path']}: artifact and file entries disagree on the sha256")
    for rel, entry in listed.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        if f.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        if file_sha256(f) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    onnx_run = 0
    bad_hash = {p.split(":")[0] for p in problems}
    for a in manifest.get("artifacts", []):
        if a["format"] != "onnx" or a["path"] in bad_hash or not (path / a["path"]).is_file():
            continue
        try:
            from kdedge.ort import ort_session

            session = ort_session(path / a["path"])
            out = session.run(None, {session.get_inputs()[0].name: _smoke_inputs(manifest)})[0]
            if out.shape != (2, len(manifest["labels"])) or not np.isfinite(out).all():
                problems.append(f"{a['path']}: smoke batch gave shape {out.shape} (finite: {bool(np.isfinite(out).all())}), expected (2, {len(manifest['labels'])})")
            onnx_run += 1
        except KdedgeError as exc:
            problems.append(f"{a['path']}: {exc}")
    if problems:
        raise VerifyError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    return {"bundle": str(path), "files": len(listed), "onnx_models_run": onnx_run}

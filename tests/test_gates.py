"""Golden tests of the bundle's decisions: which artifact is recommended, and which gates pass.

Every input is built by hand and every expected value is computed by hand. The accuracies are
binary fractions (0.875, 0.8671875, ...) so that the values "exactly at the limit" are exact in
floating point too: 100 · (0.875 − 0.8671875) is exactly 0.78125, 0.9140625 / 0.9375 is exactly
the double nearest 0.975, and 4.0 / 0.5 is exactly 8.0.
"""

from __future__ import annotations

import pytest

from kdedge.bundle import evaluate_gates, recommend
from kdedge.config import CompressConfig

FP32_ACC = 0.875  # the student's ONNX FP32 test accuracy


def _row(variant: str, target: str, p50_ms: float, top1: float | None, *, role: str = "student", batch: int = 1) -> dict:
    """One benchmark row, with only the keys the decisions read (the harness writes many more)."""
    return {"model": role, "role": role, "variant": variant, "target": target, "batch": batch,
            "latency_ms": {"p50_ms": p50_ms}, "accuracy": None if top1 is None else {"top1": top1}, "threads_used": 2}


def _artifact(path: str, precision: str, accuracy: float, *, fmt: str = "onnx", drop: float | None = None, details: dict | None = None) -> dict:
    acc = {"accuracy": accuracy} | ({} if drop is None else {"drop_vs_fp32_pt": drop})
    return {"path": path, "format": fmt, "precision": precision, "accuracy": acc, "details": details or {}}


ARTIFACTS = [
    _artifact("model.onnx", "fp32", FP32_ACC),
    _artifact("model.int8.onnx", "int8", 0.8671875, drop=0.78125),  # 100 · (0.875 − 0.8671875) = 0.78125 pt exactly
    _artifact("model.fp16.onnx", "fp16", 0.875),
    # The symmetric INT8 graph made for TensorRT is an "onnx-int8" too; it must never shadow the onnxruntime one.
    _artifact("model.int8.trt.onnx", "int8", 0.8671875, drop=0.78125, details={"for": "tensorrt"}),
]


def _rows() -> list[dict]:
    return [
        # ort-cpu: INT8 is the fastest at batch 1 but loses 0.78125 pt; FP32 is faster than FP16.
        _row("onnx-int8", "ort-cpu", 0.050, 0.8671875),
        _row("onnx-fp32", "ort-cpu", 0.100, 0.875),
        _row("onnx-fp16", "ort-cpu", 0.300, 0.875),
        _row("onnx-int8", "ort-cpu", 0.001, 0.8671875, batch=32),  # a larger batch never decides
        _row("onnx-fp32", "ort-cpu", 0.002, 0.875, batch=32),
        _row("onnx-fp32", "ort-cpu", 0.010, 0.9375, role="teacher"),  # the teacher is never a candidate
        # ort-cuda: the only student variant is INT8, so with a strict gate no variant passes.
        _row("onnx-int8", "ort-cuda", 0.020, 0.8671875),
        # torch-cpu: the student in eager PyTorch is not a bundle artifact; the eager teacher is the speedup's baseline.
        _row("torch-fp32", "torch-cpu", 0.400, 0.875),
        _row("torch-fp32", "torch-cpu", 4.000, 0.9375, role="teacher"),
        _row("torch-fp32", "torch-cpu", 9.000, 0.9375, role="teacher", batch=32),
    ]


WHY_STRICT = "fastest at batch 1 among variants within 0.5 pt of FP32: onnx-int8 0.0500 ms (fails accuracy), onnx-fp32 0.1000 ms, onnx-fp16 0.3000 ms"


def test_recommend_skips_a_faster_variant_beyond_the_quant_drop():
    assert recommend(_rows(), ARTIFACTS, max_quant_drop=0.5) == {
        # INT8 is faster but 0.78125 pt below FP32 (> 0.5): the fastest *passing* variant is FP32.
        "ort-cpu": {"artifact": "models/model.onnx", "variant": "onnx-fp32", "batch": 1, "p50_ms": 0.100, "threads": 2, "accuracy": 0.875,
                    "why": WHY_STRICT},
        # ort-cuda: its only variant fails the accuracy limit, so the target has no recommendation at all.
        # torch-cpu: no artifact variant was measured there, so it is absent too.
    }


@pytest.mark.parametrize("max_quant_drop, expected", [
    (0.78125, "onnx-int8"),  # exactly at the limit: passes (drop <= limit)
    (0.79, "onnx-int8"),  # above the drop: passes
    (0.78, "onnx-fp32"),  # just below the drop: INT8 fails, FP32 is the fastest left
    (0.0, "onnx-fp32"),  # FP32 and FP16 (drop 0) always pass
])
def test_recommend_at_above_and_below_the_quant_drop(max_quant_drop, expected):
    rec = recommend(_rows(), ARTIFACTS, max_quant_drop=max_quant_drop)
    path = {"onnx-int8": "models/model.int8.onnx", "onnx-fp32": "models/model.onnx"}[expected]
    assert rec["ort-cpu"]["variant"] == expected and rec["ort-cpu"]["artifact"] == path
    assert rec["ort-cpu"]["p50_ms"] == {"onnx-int8": 0.050, "onnx-fp32": 0.100}[expected]
    # ort-cuda has a recommendation exactly when its INT8 passes.
    assert ("ort-cuda" in rec) == (expected == "onnx-int8")
    if expected == "onnx-int8":
        assert rec["ort-cuda"] == {"artifact": "models/model.int8.onnx", "variant": "onnx-int8", "batch": 1, "p50_ms": 0.020, "threads": 2,
                                   "accuracy": 0.8671875,
                                   "why": f"fastest at batch 1 among variants within {max_quant_drop:.2g} pt of FP32: onnx-int8 0.0200 ms"}
    assert "torch-cpu" not in rec


def test_recommend_picks_the_fastest_passing_variant_whatever_its_precision():
    rows = [_row("onnx-fp32", "ort-cpu", 0.300, 0.875), _row("onnx-fp16", "ort-cpu", 0.200, 0.875), _row("onnx-int8", "ort-cpu", 0.250, 0.8671875)]
    assert recommend(rows, ARTIFACTS, max_quant_drop=1.0)["ort-cpu"]["variant"] == "onnx-fp16"
    assert recommend(rows[:1], ARTIFACTS, max_quant_drop=1.0)["ort-cpu"]["variant"] == "onnx-fp32"
    assert recommend([], ARTIFACTS, max_quant_drop=1.0) == {}


def _config(**kw) -> CompressConfig:
    return CompressConfig(**({"min_retention": 0.975, "max_quant_drop": 0.78125, "min_speedup": None} | kw))


def _recommended(p50_ms: float = 0.5, *, target: str = "ort-cpu", batch: int = 1) -> dict:
    return {target: {"artifact": "models/model.onnx", "variant": "onnx-fp32", "batch": batch, "p50_ms": p50_ms, "accuracy": 0.875}}


def _gates(config: CompressConfig, *, student_acc: float = 0.9140625, teacher_acc: float = 0.9375, artifacts=ARTIFACTS, recommended=None, rows=None):
    return evaluate_gates(student_acc=student_acc, teacher_acc=teacher_acc, artifacts=artifacts,
                          recommended=_recommended() if recommended is None else recommended, rows=_rows() if rows is None else rows, config=config)


def test_gates_golden_values():
    gates = _gates(_config(min_speedup=8.0))
    assert set(gates) == {"min_retention", "max_quant_drop", "min_speedup"}
    assert gates["min_retention"] == {"value": 0.975, "limit": 0.975, "passed": True, "detail": "student 0.9141 / teacher 0.9375 (test accuracy)"}
    # The worst INT8 drop over every INT8 artifact, the TensorRT one included (both 0.78125 here).
    assert gates["max_quant_drop"] == {"value": 0.78125, "limit": 0.78125, "passed": True, "detail": "worst INT8 accuracy drop vs FP32, points (test accuracy): model.int8.onnx"}
    # The eager teacher's batch-1 p50 (4.0 ms) over the recommended artifact's (0.5 ms): 8.0.
    assert gates["min_speedup"] == {"value": 8.0, "limit": 8.0, "passed": True,
                                    "detail": "recommended artifact's batch-1 p50 vs the teacher in eager PyTorch on the CPU"}


@pytest.mark.parametrize("limit, passed", [(0.975, True), (0.97, True), (0.976, False)])
def test_retention_gate_at_above_and_below_its_limit(limit, passed):
    gate = _gates(_config(min_retention=limit))["min_retention"]
    assert (gate["value"], gate["passed"]) == (0.975, passed)


@pytest.mark.parametrize("limit, passed", [(0.78125, True), (0.79, True), (0.78, False)])
def test_quant_drop_gate_at_above_and_below_its_limit(limit, passed):
    gate = _gates(_config(max_quant_drop=limit))["max_quant_drop"]
    assert (gate["value"], gate["passed"]) == (0.78125, passed)


def test_quant_drop_gate_takes_the_worst_int8_and_is_absent_without_int8():
    artifacts = [ARTIFACTS[0], _artifact("a.int8.onnx", "int8", 0.87, drop=0.5), _artifact("b.int8.onnx", "int8", 0.86, drop=1.5)]
    gate = _gates(_config(max_quant_drop=1.0), artifacts=artifacts)["max_quant_drop"]
    assert (gate["value"], gate["passed"]) == (1.5, False)
    assert "max_quant_drop" not in _gates(_config(), artifacts=[ARTIFACTS[0], ARTIFACTS[2]])


@pytest.mark.parametrize("limit, passed", [(8.0, True), (7.5, True), (8.5, False)])
def test_speedup_gate_at_above_and_below_its_limit(limit, passed):
    gate = _gates(_config(min_speedup=limit))["min_speedup"]
    assert (gate["value"], gate["passed"]) == (8.0, passed)


def test_speedup_gate_takes_the_best_target_and_matches_batches():
    recommended = _recommended(0.5) | _recommended(0.25, target="ort-cuda")  # 4.0 / 0.25 = 16.0
    assert _gates(_config(min_speedup=10.0), recommended=recommended)["min_speedup"]["value"] == 16.0
    # A recommendation at batch 32 is compared with the teacher at batch 32 (9.0 ms): 9.0 / 0.5 = 18.0.
    assert _gates(_config(min_speedup=10.0), recommended=_recommended(0.5, batch=32))["min_speedup"]["value"] == 18.0


def test_no_speedup_limit_means_no_speedup_gate():
    gates = _gates(_config(min_speedup=None))
    assert set(gates) == {"min_retention", "max_quant_drop"}


def test_speedup_gate_fails_without_an_eager_teacher_row():
    no_eager_teacher = [r for r in _rows() if not (r["role"] == "teacher" and r["target"] == "torch-cpu")]
    gate = _gates(_config(min_speedup=1.0), rows=no_eager_teacher)["min_speedup"]
    assert gate["value"] is None and gate["passed"] is False
    # Nor does a recommendation without any target pass it.
    gate = _gates(_config(min_speedup=1.0), recommended={})["min_speedup"]
    assert gate["value"] is None and gate["passed"] is False


def test_with_a_validation_split_the_gates_judge_validation_numbers():
    """The INT8 gate reads the validation drop when the run has a validation split, not the test drop."""
    artifacts = [dict(a, accuracy=dict(a["accuracy"], val_drop_vs_fp32_pt=2.5)) if a.get("accuracy") and "drop_vs_fp32_pt" in a["accuracy"] else a
                 for a in ARTIFACTS]
    gates = evaluate_gates(student_acc=0.9, teacher_acc=0.95, artifacts=artifacts, recommended=_recommended(), rows=_rows(),
                           config=_config(), split="validation")
    assert gates["max_quant_drop"]["value"] == 2.5 and not gates["max_quant_drop"]["passed"]
    assert gates["min_retention"]["detail"] == "student 0.9000 / teacher 0.9500 (validation accuracy)"


def test_recommend_chooses_on_validation_when_there_is_a_validation_split():
    """INT8 loses 2 pt on test but 0.1 on validation: with a validation split, validation decides (the test split only reports)."""
    from kdedge.bundle import recommend

    arts = [
        {"path": "model.onnx", "format": "onnx", "precision": "fp32", "accuracy": {"accuracy": 0.90, "val_accuracy": 0.91}},
        {"path": "model.int8.onnx", "format": "onnx", "precision": "int8",
         "accuracy": {"accuracy": 0.88, "drop_vs_fp32_pt": 2.0, "val_accuracy": 0.909, "val_drop_vs_fp32_pt": 0.1}},
    ]
    rows = [{"role": "student", "target": "ort-cpu", "batch": 1, "variant": v, "latency_ms": {"p50_ms": t}, "accuracy": {"top1": a}}
            for v, t, a in (("onnx-fp32", 1.0, 0.90), ("onnx-int8", 0.5, 0.88))]
    assert recommend(rows, arts, max_quant_drop=0.5)["ort-cpu"]["variant"] == "onnx-int8"
    test_only = [{**a, "accuracy": {k: v for k, v in a["accuracy"].items() if not k.startswith("val")}} for a in arts]
    assert recommend(rows, test_only, max_quant_drop=0.5)["ort-cpu"]["variant"] == "onnx-fp32"

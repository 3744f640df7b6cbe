"""The benchmark harness: statistics vs numpy, the timing policy, the report schema, plots, --compare."""

from __future__ import annotations

import contextlib
import json
import mmap
import time

import numpy as np
import pytest
import torch

from kdedge.bench import (
    REPORT_SCHEMA,
    BenchModel,
    LatencyStats,
    TimingPolicy,
    benchmark,
    compare_reports,
    measure,
    pareto_front,
    write_report,
)
from kdedge.bench.env import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from kdedge.cli import main
from kdedge.config import BenchConfig
from kdedge.data import load_dataset
from kdedge.errors import BackendUnavailable, ConfigError
from kdedge.models.zoo import ModelSpec, create_model, load_checkpoint, pretrained_path

from conftest import TinyNet, make_idx_dir


def test_latency_stats_match_numpy_on_known_samples():
    samples = np.arange(1, 101, dtype=np.float64)  # 1..100 ms
    s = LatencyStats.from_samples(samples)
    assert s.n == 100 and s.min_ms == 1 and s.max_ms == 100
    assert s.mean_ms == pytest.approx(50.5)
    assert s.std_ms == pytest.approx(29.011491975882016)  # sample std (ddof=1)
    assert (s.p50_ms, s.p90_ms, s.p95_ms, s.p99_ms) == pytest.approx((50.5, 90.1, 95.05, 99.01))
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 0.5, 1000)
    s = LatencyStats.from_samples(x)
    assert s.p90_ms == pytest.approx(np.percentile(x, 90)) and s.std_ms == pytest.approx(np.std(x, ddof=1))
    assert LatencyStats.from_samples([2.0]).std_ms == 0.0
    assert LatencyStats.from_samples(np.arange(1, 101)).drift == pytest.approx(95.5 / 5.5 - 1)  # chunk medians 5.5 .. 95.5
    steady = np.tile([1.0, 1.1], 100)
    assert LatencyStats.from_samples(steady).drift == pytest.approx(0.0)
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_measure_honours_warmup_and_both_minimums():
    calls = []

    def fn():
        calls.append(time.perf_counter())

    start = time.perf_counter()
    s = measure(fn, TimingPolicy(warmup_iters=7, warmup_s=0.0, min_iters=25, min_s=0.0))
    assert s.n == 25 and len(calls) == 32  # 7 warm-up calls are not samples
    calls.clear()
    start = time.perf_counter()
    # A call of a few µs: 0.05 s is thousands of calls, far from the 100k cap on any machine.
    s = measure(lambda: time.sleep(1e-6), TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=3, min_s=0.05))
    assert 3 < s.n < 100_000 and time.perf_counter() - start >= 0.05  # ran on until the duration was reached
    capped = measure(fn, TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=3, min_s=60.0, max_iters=500))
    assert capped.n == 500  # max_iters bounds a run whose duration is not reached
    slow = measure(lambda: time.sleep(0.002), TimingPolicy(warmup_iters=1, warmup_s=0, min_iters=5, min_s=0))
    assert 1.9 <= slow.p50_ms <= 20


def test_pareto_front():
    pts = [(1.0, 90.0), (2.0, 95.0), (1.5, 89.0), (0.5, 85.0), (3.0, 94.0), (2.0, 96.0)]
    assert pareto_front(pts) == [3, 0, 5]


@pytest.fixture(scope="module")
def small_report(fmnist, tmp_path_factory):
    torch.manual_seed(0)
    student = create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)))
    teacher = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
    models = [BenchModel("resnet", role="teacher", module=teacher, params=714_602, flops=51_750_000, bytes=2_900_000),
              BenchModel("tiny_cnn", role="student", module=student, params=105_914, flops=2_234_112, bytes=430_000)]
    config = BenchConfig(batch_sizes=(1, 4), warmup_iters=1, warmup_s=0, min_iters=5, min_s=0, export_variants=("fp32",), threads=2)
    report = benchmark(models, fmnist.limit(train=256, test=200), config)
    out = write_report(report, tmp_path_factory.mktemp("bench") / "report")
    return report, out


_ROW_SCHEMA = {"model": str, "role": str, "variant": str, "target": str, "runtime": str, "device": str, "precision": str, "batch": int,
               "latency_ms": dict, "throughput_per_s": float, "accuracy": dict, "memory": dict, "timing": str}


def test_report_schema(small_report):
    report, out = small_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema"] == REPORT_SCHEMA == 1
    assert {"kdedge_version", "created", "env", "config", "data", "models", "rows", "comparison"} <= on_disk.keys()
    assert {"cpu", "versions", "threads"} <= on_disk["env"].keys() and on_disk["env"]["threads"]["requested"] == 2
    assert len(on_disk["rows"]) == 2 * 2 * 2  # models x (torch, onnx fp32) x batch sizes
    for row in on_disk["rows"]:
        for key, typ in _ROW_SCHEMA.items():
            assert isinstance(row[key], typ), (key, row[key])
        assert set(row["latency_ms"]) == {"n", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "drift"}
        assert row["latency_ms"]["min_ms"] <= row["latency_ms"]["p50_ms"] <= row["latency_ms"]["max_ms"]
        assert row["throughput_per_s"] == pytest.approx(row["batch"] * 1000 / row["latency_ms"]["p50_ms"])
        assert row["memory"]["peak_rss_bytes"] > 50 * 2**20  # python + torch are resident
    # Accuracy through onnxruntime equals accuracy through torch for the same FP32 weights.
    acc = {(r["model"], r["variant"]): r["accuracy"]["top1"] for r in on_disk["rows"]}
    assert acc[("resnet", "onnx-fp32")] == acc[("resnet", "torch-fp32")] > 0.9
    assert acc[("tiny_cnn", "onnx-fp32")] == acc[("tiny_cnn", "torch-fp32")]
    md = (out / "report.md").read_text()
    assert "## Teacher vs student" in md and "| tiny_cnn | student | onnx-fp32 | ort-cpu |" in md


MIB = 2**20


def _require_peak_reset() -> None:
    if current_rss_bytes() is None:
        pytest.skip("no /proc/self/status here: the current RSS cannot be read")
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs 5): peaks are since process start")


@contextlib.contextmanager
def _resident(nbytes: int):
    """``nbytes`` made resident and given back to the kernel afterwards, whatever the allocator.

    An anonymous mmap, written page by page, is resident while it lives and returned by munmap;
    a malloc'd buffer would depend on the allocator (glibc's mmap threshold, jemalloc, tcmalloc).
    """
    block = mmap.mmap(-1, nbytes)
    try:
        block.write(b"\x01" * nbytes)
        yield
    finally:
        block.close()


def test_peak_rss_sees_a_known_buffer_and_resets():
    """The probes behind every row's ``memory``: a 200 MiB buffer written inside the measured region
    raises the peak by >= 190 MiB, and a reset without the buffer forgets that peak."""
    _require_peak_reset()
    before = current_rss_bytes()
    with _resident(200 * MIB):
        with_buffer = peak_rss_bytes()
    assert with_buffer - before >= 190 * MIB
    assert reset_peak_rss()
    without = peak_rss_bytes()
    assert without <= with_buffer - 150 * MIB, f"the peak after a reset ({without / MIB:.0f} MiB) still holds the buffer ({with_buffer / MIB:.0f} MiB)"


class _Hog(torch.nn.Module):
    """TinyNet that writes a 200 MiB buffer on every call: a known amount of peak memory."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(num_classes=3)

    def forward(self, x):
        with _resident(200 * MIB):
            return self.net(x)


def test_benchmark_rows_record_each_models_own_peak_rss(tmp_path):
    """The harness resets the peak before each model: the hog's rows carry its 200 MiB, the
    small model benchmarked after it does not."""
    _require_peak_reset()
    data = load_dataset(str(make_idx_dir(tmp_path / "data", n_train=20, n_test=16)))
    torch.manual_seed(0)
    models = [BenchModel("hog", role="teacher", module=_Hog()), BenchModel("small", role="student", module=TinyNet(num_classes=3))]
    config = BenchConfig(targets=("torch-cpu",), batch_sizes=(1, 4), warmup_iters=1, warmup_s=0, min_iters=3, min_s=0, plots=False)
    rows = benchmark(models, data, config)["rows"]
    memory = {r["model"]: r["memory"] for r in rows}
    assert len(rows) == 4 and set(memory) == {"hog", "small"}
    assert memory["hog"]["peak_rss_bytes"] - memory["hog"]["rss_before_bytes"] >= 190 * MIB
    assert memory["small"]["peak_rss_bytes"] <= memory["hog"]["peak_rss_bytes"] - 150 * MIB


def test_teacher_vs_student_ratios(small_report):
    report, _ = small_report
    comp = {(c["student_variant"], c["teacher_variant"], c["batch"]): c for c in report["comparison"]}
    c = comp[("onnx-fp32", "torch-fp32", 1)]  # student in onnxruntime vs teacher in eager PyTorch
    rows = {(r["model"], r["variant"], r["batch"]): r for r in report["rows"]}
    expected = rows[("resnet", "torch-fp32", 1)]["latency_ms"]["p50_ms"] / rows[("tiny_cnn", "onnx-fp32", 1)]["latency_ms"]["p50_ms"]
    assert c["latency_speedup"] == pytest.approx(expected)
    assert c["params_ratio"] == pytest.approx(714_602 / 105_914) and c["flops_ratio"] == pytest.approx(51_750_000 / 2_234_112)
    assert c["accuracy_retention"] == pytest.approx(rows[("tiny_cnn", "onnx-fp32", 1)]["accuracy"]["top1"] / rows[("resnet", "torch-fp32", 1)]["accuracy"]["top1"])
    assert ("onnx-fp32", "onnx-fp32", 4) in comp and ("torch-fp32", "torch-fp32", 1) in comp


def test_plots_are_written_and_not_blank(small_report):
    import matplotlib.image

    _, out = small_report
    for name in ("accuracy_vs_latency.png", "throughput_vs_batch.png"):
        path = out / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # lines, markers and text, not an empty canvas
        assert (img[..., :3] < 0.5).mean() > 0.005  # some dark pixels: axes and labels were drawn


def _synthetic(rows):
    return {"schema": 1, "rows": [{"model": m, "variant": v, "target": "ort-cpu", "batch": 1, "throughput_per_s": 1000 / p50,
                                   "latency_ms": {"p50_ms": p50, "p90_ms": p90}, "accuracy": {"top1": acc}} for m, v, p50, p90, acc in rows]}


def test_compare_flags_changes_beyond_noise(tmp_path, capsys):
    a = _synthetic([("s", "onnx-fp32", 1.0, 1.02, 0.9), ("s", "onnx-int8", 1.0, 1.02, 0.9), ("t", "onnx-fp32", 1.0, 1.3, 0.95), ("t", "torch-fp32", 1.0, 1.01, 0.95)])
    b = _synthetic([("s", "onnx-fp32", 2.0, 2.04, 0.9), ("s", "onnx-int8", 1.03, 1.05, 0.9), ("t", "onnx-fp32", 1.2, 1.5, 0.95), ("t", "torch-fp32", 0.5, 0.51, 0.93)])
    diffs = {d["model"] + d["variant"]: d for d in compare_reports(a, b)}
    assert diffs["sonnx-fp32"]["flag"] == "slower" and diffs["sonnx-fp32"]["latency_ratio"] == pytest.approx(2.0)
    assert diffs["sonnx-int8"]["flag"] == ""  # 3 %: inside the 5 % floor
    b["rows"][0]["latency_ms"]["drift"] = 1.5  # B drifted by 150 % while it ran: a 2x change is within its noise
    assert compare_reports(a, b)[0]["flag"] == "" and compare_reports(a, b)[0]["noise_threshold"] == pytest.approx(1.5)
    del b["rows"][0]["latency_ms"]["drift"]
    assert diffs["tonnx-fp32"]["flag"] == "" and diffs["tonnx-fp32"]["noise_threshold"] == pytest.approx(0.3)  # 20 % within a 30 % spread
    assert diffs["ttorch-fp32"]["flag"] == "faster, accuracy changed" and diffs["ttorch-fp32"]["accuracy_delta_pt"] == pytest.approx(-2.0)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "faster, accuracy changed" in out and "2.00" in out


def test_bench_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "garbage.onnx").write_text("not onnx")
    (tmp_path / "bad.json").write_text("{")
    cases = [
        (["bench", str(tmp_path / "garbage.onnx"), "--no-plots", "--out", str(tmp_path / "o1")], "onnxruntime cannot load it"),
        (["bench", "runs/none", "--targets", "ort-cuda", "--out", str(tmp_path / "o2")], "needs a CUDA GPU"),
        (["bench", "tiny-thing", "--out", str(tmp_path / "o3")], "no such file or directory, nor a shipped model name"),
        (["bench", "--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")], "not a readable JSON report"),
        (["bench", "resnet", "--targets", "torch-cpu,tpu", "--out", str(tmp_path / "o4")], "targets must be one or more of"),
        (["bench", "resnet", "--batch-sizes", "0,4", "--out", str(tmp_path / "o5")], "batch_sizes must be positive"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kdedge: error: ") and message in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "garbage.onnx"]


def test_fixed_batch_onnx_rejects_other_batch_sizes(fmnist, tmp_path):
    model = create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))).eval()
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(tmp_path / "fixed.onnx"), dynamo=True, external_data=False, verbose=False)
    config = BenchConfig(targets=("ort-cpu",), batch_sizes=(1, 2), min_iters=1, min_s=0, warmup_iters=0, warmup_s=0)
    with pytest.raises(ConfigError, match="fixed batch size of 2; batch 1 is not allowed"):
        benchmark([BenchModel("fixed", artifacts={"onnx-fp32": tmp_path / "fixed.onnx"})], fmnist.limit(test=8), config)


def test_missing_runtime_names_the_package():
    from kdedge.bench.runners import target_available

    assert target_available("trt") is not None
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            benchmark([], None, BenchConfig(targets=("torch-cuda",)))  # type: ignore[arg-type]
    assert target_available("torch-cpu") is None and target_available("ort-cpu") is None
    assert "unknown target" in target_available("tpu")

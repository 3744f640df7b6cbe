"""`kdedge bench` scores a model on the dataset recorded with it; a mismatch is one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import make_idx_dir
from kdedge.bench.harness import run_bench
from kdedge.cli import main
from kdedge.config import BenchConfig, ExportConfig, TrainConfig
from kdedge.models.zoo import ModelSpec, create_model, save_checkpoint

N_TEST = 37  # an odd test-split size no built-in dataset has
FAST = ["--targets", "torch-cpu", "--batch-sizes", "1", "--warmup-iters", "0", "--min-iters", "1", "--min-s", "0", "--no-plots"]


def _train(data_dir, out):
    from kdedge.runs import run_train

    config = TrainConfig(model="mlp@0.25", data=str(data_dir), epochs=2, batch_size=32, optimizer="adamw", lr=1e-2, device="cpu", out=str(out))
    run_train(config, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on two different 1x8x8 IDX datasets (not Fashion-MNIST)."""
    root = tmp_path_factory.mktemp("bench-data")
    a = make_idx_dir(root / "data-a", n_train=120, n_test=N_TEST, seed=0)
    b = make_idx_dir(root / "data-b", n_train=120, n_test=N_TEST + 2, seed=1)
    return {"root": root, "data_a": a, "data_b": b, "run_a": _train(a, root / "run-a"), "run_b": _train(b, root / "run-b")}


def _one_line_error(capsys, argv):
    code = main([str(v) for v in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdedge: error: ") and "Traceback" not in err, (code, err)
    return lines[0]


def test_bench_without_data_scores_a_checkpoint_on_its_recorded_dataset(runs, tmp_path, capsys):
    assert main(["bench", str(runs["run_a"]), *FAST, "--out", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["data"] == {"name": str(runs["data_a"]), "test_samples": N_TEST}
    assert report["config"]["data"] is None
    assert {r["accuracy"]["samples"] for r in report["rows"]} == {N_TEST}


def test_bench_export_dir_and_onnx_use_their_recorded_dataset(runs, tmp_path):
    from kdedge.exporters import export_checkpoint

    export_checkpoint(runs["run_a"], ExportConfig(formats=("onnx",), parity_samples=16, evaluate=False, out=str(tmp_path / "export")))
    config = dict(targets=("ort-cpu",), batch_sizes=(1,), warmup_iters=0, warmup_s=0, min_iters=1, min_s=0, plots=False)
    for i, ref in enumerate((tmp_path / "export", tmp_path / "export" / "model.onnx")):
        report, _ = run_bench([str(ref)], config=BenchConfig(**config, out=str(tmp_path / f"r{i}")))
        assert report["data"] == {"name": str(runs["data_a"]), "test_samples": N_TEST}, ref


def test_bench_data_other_than_the_recorded_one_is_one_line(runs, tmp_path, capsys):
    run_a = str(runs["run_a"])
    line = _one_line_error(capsys, ["bench", run_a, "--data", "fashion-mnist", *FAST, "--out", tmp_path / "o1"])
    assert "--data 'fashion-mnist' is not the dataset the models were trained on" in line
    assert f"{run_a}/model.safetensors records {str(runs['data_a'])!r}" in line and "omit --data" in line
    line = _one_line_error(capsys, ["bench", run_a, "--data", runs["data_b"], *FAST, "--out", tmp_path / "o2"])
    assert f"records {str(runs['data_a'])!r}" in line and "--data NAME_OR_PATH" in line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_models_recording_different_datasets_are_one_line(runs, tmp_path, capsys):
    line = _one_line_error(capsys, ["bench", runs["run_a"], "--teacher", runs["run_b"], *FAST, "--out", tmp_path / "o"])
    assert "the models were trained on different datasets" in line
    assert f"teacher {runs['run_b']}/model.safetensors records {str(runs['data_b'])!r}" in line
    assert f"{runs['run_a']}/model.safetensors records {str(runs['data_a'])!r}" in line


def test_a_copy_of_the_recorded_data_elsewhere_is_the_same_data(runs, tmp_path, capsys):
    copy = shutil.copytree(runs["data_a"], tmp_path / "moved")  # same files, another path: their sha256s match
    assert main(["bench", str(runs["run_a"]), "--data", str(copy), *FAST, "--out", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "report" / "report.json").read_text())["data"] == {"name": str(copy), "test_samples": N_TEST}


def test_nothing_recorded_asks_for_data_and_checks_the_shape(runs, tmp_path, capsys):
    torch.manual_seed(0)
    spec = ModelSpec("mlp", 0.25, 3, (1, 8, 8))
    save_checkpoint(tmp_path / "bare.safetensors", create_model(spec), spec, None)  # no dataset spec recorded
    line = _one_line_error(capsys, ["bench", tmp_path / "bare.safetensors", *FAST, "--out", tmp_path / "o1"])
    assert f"no dataset is recorded with {tmp_path / 'bare.safetensors'}; pass --data NAME_OR_PATH (the dataset it was trained on)" in line
    wide = make_idx_dir(tmp_path / "wide", n_test=5, size=10)
    line = _one_line_error(capsys, ["bench", tmp_path / "bare.safetensors", "--data", wide, *FAST, "--out", tmp_path / "o2"])
    assert f"data {str(wide)!r} has inputs (1, 10, 10) and 3 classes, but" in line and "takes inputs (1, 8, 8) with 3 classes" in line
    assert main(["bench", str(tmp_path / "bare.safetensors"), "--data", str(runs["data_b"]), *FAST, "--out", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["data"]["test_samples"] == N_TEST + 2

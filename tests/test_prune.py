"""Structured pruning: recorded widths that rebuild without pickle, the latency-aware plan, the loop, and its bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdedge
from conftest import make_idx_dir
from kdedge.cli import main
from kdedge.config import CompressConfig, PruneConfig, load_config
from kdedge.errors import ConfigError, ModelError
from kdedge.models import ModelSpec, create_model, load_checkpoint, save_checkpoint
from kdedge.models.pruned import narrowed_layers

pytest.importorskip("torch_pruning")

from kdedge.pruning import prune  # noqa: E402
from kdedge.pruning.graph import ChannelGraph  # noqa: E402
from kdedge.pruning.run import _plan, _settle  # noqa: E402


def _pruned(spec: ModelSpec, fraction: float = 0.5, seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    """``spec``'s model with every group cut to ``fraction`` (lowest magnitude first), and its pruned spec."""
    torch.manual_seed(seed)
    base = create_model(spec).eval()
    model = copy.deepcopy(base)
    graph = ChannelGraph(model, spec.input_shape)
    scores = graph.importance("magnitude")
    graph.remove({n: torch.argsort(scores[n])[: int(g.channels * (1 - fraction))].tolist() for n, g in graph.groups.items()})
    return model, spec.with_layers(narrowed_layers(base, model))


@pytest.mark.parametrize("name,shape", [("resnet", (1, 28, 28)), ("mobilenet_v2@0.5", (3, 32, 32)), ("tiny_cnn", (1, 28, 28)),
                                        ("net:c16k3s1p-d24k3s2-fc32", (1, 28, 28))])
def test_a_pruned_checkpoint_reloads_by_name_with_the_same_outputs(name, shape, tmp_path):
    arch, width = kdedge.models.zoo.parse_model_name(name)
    model, spec = _pruned(ModelSpec(arch, width, 10, shape))
    assert spec.pruned and spec.name.startswith(f"{name}-pruned-")
    assert kdedge.count_parameters(model) < kdedge.count_parameters(create_model(spec.with_layers(None)))
    save_checkpoint(tmp_path / "m.safetensors", model, spec)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")  # no trust_code: the base is a zoo name or a genome, the widths are integers
    assert ckpt.spec == spec
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.eval()(x), model(x), rtol=0, atol=0)


def test_an_unpruned_spec_is_written_as_before():
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))
    assert spec.to_dict() == {"arch": "tiny_cnn", "width": 1.0, "num_classes": 10, "input_shape": [1, 28, 28]}
    assert spec.name == "tiny_cnn" and ModelSpec.from_dict(spec.to_dict()) == spec


def test_a_pruned_factory_checkpoint_still_needs_trust_code(tmp_path):
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def make(num_classes, input_shape):\n"
        "    return nn.Sequential(nn.Conv2d(input_shape[0], 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(16, num_classes))\n")
    ref = f"{tmp_path / 'nets.py'}:make"
    model, spec = _pruned(ModelSpec(ref, 1.0, 10, (1, 12, 12)))
    assert dict(spec.layers)["0"] == (8, 1, 1)
    save_checkpoint(tmp_path / "m.safetensors", model, spec)
    with pytest.raises(ModelError, match="--trust-code"):
        load_checkpoint(tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors", trust_code=True).spec == spec


def test_a_spec_that_narrows_a_missing_layer_is_refused(tmp_path):
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)).with_layers({"features.9": (8, 1, 1)})
    with pytest.raises(ModelError, match="narrows layer 'features.9', but the base architecture has no such layer"):
        create_model(spec)


class _Two(nn.Module):
    """Two prunable convolutions (groups "a" and "b") and a classifier head: the smallest graph a plan orders."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(1, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1), nn.Linear(b, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


def test_the_plan_removes_what_costs_least_accuracy_per_measured_microsecond():
    """Golden: group a's channels matter little but save little time; b's matter more but save 10× more per channel."""

    graph = ChannelGraph(_Two(16, 16), (1, 8, 8))
    assert set(graph.groups) == {"a", "b"} and graph.head == "head"
    scores = {"a": torch.full((16,), 0.5), "b": torch.arange(16, dtype=torch.float32) + 1.0}
    slopes = {"a": 0.1, "b": 1.0}  # cost units per channel
    # a's 8-channel chunk: importance 4.0 for 0.8 saved (5.0 per unit); b's first chunk (importance 1..8 = 36) saves 8.0 (4.5 per unit):
    # b's goes first, then a's; both then sit at round_to (8) channels, the narrowest a group is cut to.
    assert _plan(graph, scores, slopes, q=8) == [("b", list(range(8))), ("a", list(range(8)))]
    assert _plan(graph, scores, {"a": 1.0, "b": 1.0}, q=8) == [("a", list(range(8))), ("b", list(range(8)))]


def test_the_uniform_plan_narrows_every_group_by_the_same_share_whatever_the_slopes():
    graph = ChannelGraph(_Two(16, 32), (1, 8, 8))
    scores = {"a": torch.arange(16, dtype=torch.float32), "b": torch.arange(32, dtype=torch.float32).flip(0)}
    chunks = _plan(graph, scores, {"a": 100.0, "b": 0.01}, q=8, allocation="uniform")  # slopes that the latency plan would follow
    # shares after each chunk: b 8/32, a 8/16 (b 16/32 ties with it: importance breaks the tie), then b 24/32
    assert [(n, len(c)) for n, c in chunks] == [("b", 8), ("a", 8), ("b", 8), ("b", 8)]
    assert chunks[0][1] == list(range(31, 23, -1))  # lowest importance first within a group
    assert _plan(graph, scores, {"a": 100.0, "b": 0.01}, q=8)[0][0] == "a"  # the latency plan goes where time is saved first


@pytest.mark.parametrize("noisy,reading", [(6, 75.0), (5, 68.0)])
def test_the_step_settles_on_the_fewest_removals_that_meet_the_target_when_one_timing_lies(noisy, reading):
    # true cost 100 - 5k: the fewest of 16 removals within 70 is 6. One timing reads wrong once (slow at 6: plain
    # bisection stops at 7, past the budget; fast at 5: it stops at 5, over it); the re-timed neighbours correct both.
    lied = []

    def cost_of(k: int) -> float:
        if k == noisy and not lied:
            lied.append(k)
            return reading
        return 100.0 - 5 * k

    assert _settle(cost_of, 70.0, 16) == 6 and lied == [noisy]
    assert _settle(lambda k: 100.0 - 5 * k, 70.0, 16) == 6
    assert _settle(lambda k: 100.0 - 5 * k, 20.0, 16) == 16  # only the narrowest meets it


def test_a_layer_the_pruner_cannot_record_is_named_with_the_flag_that_keeps_it():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ModelError, match=r"layer '1' \(GroupNorm\) would be narrowed with '0'.*--ignore-layers 0"):
        ChannelGraph(model, (1, 8, 8))
    graph = ChannelGraph(model, (1, 8, 8), ignore=["0"])
    assert set(graph.groups) == {"3"}


def test_nothing_to_prune_and_unknown_ignored_layers_are_one_line():
    with pytest.raises(ModelError, match="nothing to prune"):
        ChannelGraph(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), (1, 8, 8))
    with pytest.raises(ModelError, match="--ignore-layers names no layer of the model: stem.9"):
        ChannelGraph(create_model(ModelSpec("resnet", 1.0, 10, (1, 28, 28))), (1, 28, 28), ignore=["stem.9"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_idx_dir(tmp_path_factory.mktemp("d") / "data", n_train=300, n_test=60, size=12, classes=3)
    data = kdedge.load_dataset(str(root))
    torch.manual_seed(0)
    teacher = create_model(ModelSpec("resnet", 1.0, 3, (1, 12, 12)))
    kdedge.train(teacher, data.train, config=kdedge.TrainConfig(epochs=3, batch_size=32, lr=0.05), progress=False)
    return data, teacher


def test_an_unreachable_budget_fails_before_training_with_the_best_reached(tiny):
    data, teacher = tiny
    cfg = PruneConfig(flops_ratio=0.001, epochs=1, batch_size=32)
    with pytest.raises(ConfigError, match=r"the budget cannot be reached: it asks for [0-9,]+ FLOPs .* the narrowest model this pruner makes .* runs at [0-9,]+ FLOPs"):
        prune(teacher, data, config=cfg, spec=ModelSpec("resnet", 1.0, 3, (1, 12, 12)), progress=False)


def test_prune_meets_a_flops_budget_records_how_and_the_run_reloads_and_exports(tiny, tmp_path):
    data, teacher = tiny
    spec = ModelSpec("resnet", 1.0, 3, (1, 12, 12))
    lines: list[str] = []
    cfg = PruneConfig(flops_ratio=0.3, steps=2, step_epochs=1, epochs=2, batch_size=32, criterion="auto", criterion_samples=100,
                      sanity_checks=False, test_limit=None)
    result = prune(teacher, data, config=cfg, spec=spec, out=tmp_path / "run", progress=False, log=lines.append)
    rec = result.record
    assert rec["criterion"] in ("magnitude", "bn_scale", "taylor") and rec["allocation"] in ("latency", "uniform")
    best = max(("magnitude", "bn_scale", "taylor"), key=lambda n: rec["criteria"][n])  # the first on ties, as chosen
    assert set(rec["criteria"]) == {"magnitude", "bn_scale", "taylor", f"{best}+uniform"}  # the best criterion also tried uniformly
    chosen = rec["criterion"] + ("+uniform" if rec["allocation"] == "uniform" else "")
    assert rec["criteria"][chosen] == max(rec["criteria"].values())
    assert rec["result"]["flops"] <= 0.3 * rec["result"]["original_flops"] * 1.0001 and rec["result"]["met"]
    assert [r["step"] for r in rec["steps"]] == [1, 2] and rec["layers"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["pruning"]["criterion"] == rec["criterion"] and metrics["model"]["name"] == result.spec.name
    assert kdedge.count_parameters(teacher) == kdedge.count_parameters(create_model(spec))  # the input model is not modified
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.spec == result.spec and ckpt.spec.pruned
    exported = kdedge.export_checkpoint(tmp_path / "run", kdedge.ExportConfig(formats=("onnx",), evaluate=False, out=str(tmp_path / "export")))
    assert exported.artifacts[0].parity["passed"]
    assert (tmp_path / "export" / "model.onnx").stat().st_size < 0.5 * sum(p.numel() for p in teacher.parameters()) * 4


def test_prune_resumes_after_its_last_finished_step(tiny, tmp_path, monkeypatch):
    import kdedge.pruning.run as run_mod

    data, teacher = tiny
    spec = ModelSpec("resnet", 1.0, 3, (1, 12, 12))
    cfg = PruneConfig(flops_ratio=0.4, steps=2, step_epochs=1, epochs=1, batch_size=32, criterion="magnitude", allocation="latency", sanity_checks=False,
                      out=str(tmp_path / "run"))
    real = run_mod.distill
    calls = []

    def fail_on_final(*args, **kwargs):
        calls.append(kwargs.get("out"))
        if kwargs.get("out") is not None:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "distill", fail_on_final)
    with pytest.raises(KeyboardInterrupt):
        prune(teacher, data, config=cfg, spec=spec, progress=False)
    assert (tmp_path / "run.partial" / run_mod.STATE_FILE).is_file() and not (tmp_path / "run").exists()
    kept = load_checkpoint(tmp_path / "run.partial" / run_mod.STATE_FILE).spec  # pruned, not yet recovered: the resume recovers this one
    monkeypatch.setattr(run_mod, "distill", real)
    lines: list[str] = []
    import dataclasses

    result = prune(teacher, data, config=dataclasses.replace(cfg, resume=True), spec=spec, progress=False, log=lines.append)
    assert any("resuming after step 2 of 2" in line and line.endswith("(pruned; its final recovery goes on)") for line in lines), lines
    assert [r["step"] for r in result.record["steps"]] == [1, 2] and load_checkpoint(tmp_path / "run").spec == kept == result.spec
    assert not (tmp_path / "run.partial").exists()


def test_resume_from_a_step_file_that_is_not_pruned_is_one_line(tiny, tmp_path):
    import kdedge.pruning.run as run_mod

    data, teacher = tiny
    (tmp_path / "run.partial").mkdir()
    save_checkpoint(tmp_path / "run.partial" / run_mod.STATE_FILE, teacher, ModelSpec("resnet", 1.0, 3, (1, 12, 12)))
    cfg = PruneConfig(flops_ratio=0.4, steps=2, resume=True, out=str(tmp_path / "run"))
    with pytest.raises(ModelError, match="is not a pruned checkpoint from a kdedge prune step"):
        prune(teacher, data, config=cfg, spec=ModelSpec("resnet", 1.0, 3, (1, 12, 12)), progress=False)


def test_prune_to_a_measured_speedup_on_onnxruntime(tiny):
    """The latency path: the meter times the model and one probe per group on ort-cpu; the result is re-timed head to head.

    tiny_cnn (3 groups) keeps the probes few; it is untrained, so this checks the timing, not the accuracy.
    """
    data, _ = tiny
    spec = ModelSpec("tiny_cnn", 2.0, 3, (1, 12, 12))
    torch.manual_seed(0)
    model = create_model(spec)
    # 1.25x, not 1.5x: the narrowest model this pruner makes measured only 1.47x under a loaded CI worker, and the run then (rightly)
    # refused the budget as unreachable.
    cfg = PruneConfig(speedup=1.25, steps=1, epochs=1, batch_size=32, criterion="magnitude", allocation="latency", sanity_checks=False)
    result = prune(model, data, config=cfg, spec=spec, progress=False)
    r, record = result.record["result"], result.record
    assert result.spec.pruned and r["flops"] < r["original_flops"]
    # The report: one head-to-head set on the shipped export, its speedup the ratio of its two p50s, "met" judged on it. A 20 µs
    # model under a loaded CI worker re-times anywhere from 1.08x (measured in CI) to 1.6x, so only "faster" is asserted.
    assert r["kind"] == "latency" and r["speedup"] == pytest.approx(r["original_p50_ms"] / r["p50_ms"]) and r["speedup"] > 1.0
    assert r["met"] == (record["steps"][-1]["cost"] <= record["target_cost"] * 1.02)


@pytest.mark.parametrize("name", ["resnet", "net:c16k5s1p-d24k3s2-fc32"])  # the genome has depthwise blocks
def test_the_trial_export_computes_what_the_shipped_export_computes(name, tmp_path):
    """Searches and pruning time TorchScript's export: it must be the same network in onnxruntime, pruned or not, as torch.export's."""
    from kdedge._dynamo import torchscript_export
    from kdedge.exporters.onnx import export_onnx
    from kdedge.ort import ort_predict, ort_session

    shape = (3, 16, 16)
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, 1.0, 5, shape)).eval()
    graph = ChannelGraph(model, shape)
    graph.remove({n: list(range(g.channels // 3)) for n, g in graph.groups.items()})
    assert torchscript_export(model, tmp_path / "trial.onnx", shape)
    export_onnx(model, tmp_path / "shipped.onnx", input_shape=shape)
    x = torch.randn(4, *shape).numpy()
    trial, shipped = (ort_predict(ort_session(tmp_path / f), x) for f in ("trial.onnx", "shipped.onnx"))
    np.testing.assert_allclose(trial, shipped, rtol=1e-4, atol=1e-5)


def test_config_checks_the_budget_and_the_yaml_prune_block(tmp_path):
    with pytest.raises(ConfigError, match="give exactly one budget"):
        PruneConfig()
    with pytest.raises(ConfigError, match="got speedup 2.0, flops_ratio 0.5"):
        PruneConfig(speedup=2.0, flops_ratio=0.5)
    with pytest.raises(ConfigError, match=r"flops_ratio must be in \(0, 1\)"):
        PruneConfig(flops_ratio=4.0)
    (tmp_path / "c.yaml").write_text("prune:\n  speedup: 4\n  criterion: taylor\n  steps: 2\n")
    cfg = load_config(CompressConfig, tmp_path / "c.yaml")
    assert (cfg.prune, cfg.prune_criterion, cfg.prune_steps) == (4.0, "taylor", 2)
    (tmp_path / "d.yaml").write_text("prune:\n  speedup: 4\n  ratio: 2\n")
    with pytest.raises(ConfigError, match="the prune block takes"):
        load_config(CompressConfig, tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="prune and latency_budget both choose the student"):
        CompressConfig(prune=4.0, latency_budget=0.02)


def test_cli_prune_bad_input_is_one_line(tmp_path, capsys):
    assert main(["prune", "resnet", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give exactly one budget" in err[0]
    onnx = tmp_path / "m.onnx"
    from kdedge.exporters.onnx import export_onnx

    export_onnx(create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))).eval(), onnx, input_shape=(1, 28, 28))
    assert main(["prune", str(onnx), "--speedup", "2", "--test-limit", "50", "--train-limit", "100", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an ONNX file cannot be pruned" in err[0]
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_compress_and_export_with_prune_bundles_the_pruned_teacher_and_says_how(tmp_path):
    """--prune: the student is the shipped teacher pruned to a measured speedup; the manifest records how, and verify runs it."""
    from conftest import SMALL_BUNDLE
    from kdedge.bundle import compress_and_export, verify_bundle

    config = CompressConfig(**(SMALL_BUNDLE | {"batch_sizes": (1,), "targets": ("ort-cpu",), "formats": ("onnx",), "tune_runtime": False,
                                               "prune": 2.0, "prune_steps": 1, "prune_criterion": "magnitude", "prune_allocation": "latency", "prune_round_to": 16,
                                               "out": str(tmp_path / "b")}))
    result = compress_and_export(config)
    m = result.manifest
    pruned = m["student"]["pruned"]
    assert pruned["criterion"] == "magnitude" and pruned["budget"]["speedup"] == 2.0 and pruned["layers"]
    assert pruned["result"]["speedup"] > 1.5 and pruned["result"]["flops"] < pruned["result"]["original_flops"]
    assert m["student"]["model"]["arch"] == "resnet" and m["student"]["model"]["layers"]
    assert load_checkpoint(result.out / "student.safetensors").spec.pruned
    assert verify_bundle(result.out)["onnx_models_run"] >= 1


def test_a_model_trained_on_another_normalization_is_refused(tiny):
    """The pruned model is fed the data's inputs: a model trained on pixels/255 (mean 0, std 1) is refused here, one trained on the data's is not."""
    from kdedge.data.normalization import Normalization
    from kdedge.pruning import check_input
    from kdedge.resolve import ResolvedTeacher

    data, teacher = tiny
    spec = ModelSpec("resnet", 1.0, 3, (1, 12, 12))
    with pytest.raises(ConfigError, match="was trained on inputs normalized with mean"):
        check_input(ResolvedTeacher(teacher, spec, "t", input=Normalization((0.0,), (1.0,))), data.spec)
    check_input(ResolvedTeacher(teacher, spec, "t", input=Normalization(tuple(data.spec.mean), tuple(data.spec.std), data.spec.scale)), data.spec)
    check_input(ResolvedTeacher(teacher, spec, "t"), data.spec)

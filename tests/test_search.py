"""kdedge search: the architecture grammar, the search space, latency measurement and its cache, and a real search end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import _DataDependent
from kdedge.bench.timing import measure_interleaved
from kdedge.config import SearchConfig
from kdedge.errors import ConfigError, ModelError
from kdedge.models import ModelSpec, count_parameters, create_model, load_checkpoint, save_checkpoint
from kdedge.models.genome import Block, Genome, parse_genome
from kdedge.models.zoo import parse_model_name
from kdedge.search import LatencyCache, sample_genomes, search, spearman, time_candidates
from kdedge.search.latency import LatencyMeter, environment_key
from kdedge.search.space import mutate


# --- the grammar -----------------------------------------------------------------------------

def test_residual_inverted_residual_and_squeeze_excitation_blocks():
    """r, i and q: the names round-trip, the networks are what the names say (identity shortcuts where the shape holds, a
    projection where it changes; an inverted residual's expansion; one gate per q), and they export to ONNX with parity."""
    from kdedge.exporters.onnx import export_onnx
    from kdedge.models.genome import InvertedResidual, Residual, SqueezeExcite
    from kdedge.ort import ort_predict, ort_session

    name = "net:c16k3s2-r16k3s1-r24k3s2q-i24k3s1e4q-i32k5s2e2-d32k3s1qp-gap"
    assert str(parse_genome(name)) == name
    torch.manual_seed(0)
    m = create_model(ModelSpec(name, 1.0, 10, (1, 28, 28))).eval()
    res = [b for b in m.modules() if isinstance(b, Residual)]
    inv = [b for b in m.modules() if isinstance(b, InvertedResidual)]
    assert [isinstance(r.shortcut, nn.Identity) for r in res] == [True, False]  # 16 -> 16 at stride 1; 16 -> 24 at stride 2
    assert [i.residual for i in inv] == [True, False] and inv[0].block[0][0].out_channels == 96  # 24 x e4; the stride-2 block adds nothing
    assert sum(isinstance(b, SqueezeExcite) for b in m.modules()) == 3
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        m.features[1].relu = nn.Identity()  # without the last ReLU the block is body + input: the identity shortcut
        x0 = m.features[0](x)
        torch.testing.assert_close(m.features[1](x0) - m.features[1].body(x0), x0)
        m.features[1].relu = nn.ReLU(inplace=True)
        ref = m(x).numpy()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(m, Path(d) / "m.onnx", input_shape=(1, 28, 28)).path
        np.testing.assert_allclose(ort_predict(ort_session(path), x.numpy()), ref, atol=1e-4)
    assert count_parameters(create_model(ModelSpec("net:c8k3s2-r8k3s1-fc", 1.0, 10, (1, 28, 28)))) == 72 + 16 + 2 * (576 + 16) + 1568 * 10 + 10


def test_the_search_space_draws_the_richer_blocks_only_when_asked():
    import random

    from kdedge.models.genome import KINDS
    from kdedge.search.space import SearchSpace

    # The default space draws dense and depthwise blocks only, the same candidates as every recorded search (golden: seed 3)
    assert [str(g) for g in sample_genomes(3, (1, 28, 28), seed=3)] == ["net:c32k3s2p-c64k5s1p-fc", "net:c32k3s2p-c32k5s2-fc", "net:c8k5s2p-d12k5s2-fc64"]
    rng = random.Random(5)  # and the same mutations (golden: the commit before the richer blocks)
    assert [str(mutate(g, rng, (1, 28, 28))) for g in sample_genomes(3, (1, 28, 28), seed=3)] == [
        "net:c32k3s2p-c64k5s1p-c64k3s1-fc", "net:c32k3s2p-d32k5s2-fc", "net:c8k3s2p-d12k5s2-fc64"]
    with pytest.raises(ModelError, match="takes an expansion 1..8"):
        Block("i", 16, 3, 1)
    rich = SearchSpace(kinds=KINDS, se=0.5)
    genomes = sample_genomes(40, (1, 28, 28), seed=0, space=rich)
    names = " ".join(map(str, genomes))
    assert all(k in names for k in ("-r", "-i", "q-", "-d", "-c")), names
    rng = random.Random(0)
    children = [mutate(g, rng, (1, 28, 28), rich) for g in genomes]
    for g in genomes[:8] + [c for c in children if c is not None][:8]:
        assert str(parse_genome(str(g))) == str(g)
        assert create_model(ModelSpec(str(g), 1.0, 10, (1, 28, 28)))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="kinds must be some of c, d, r, i"):
        SearchSpace(kinds=("x",))
    with pytest.raises(ConfigError, match="block_kinds must be some of c"):
        SearchConfig(latency_budget=1.0, block_kinds=("c", "x"))
    with pytest.raises(ConfigError, match="squeeze_excite must be a probability"):
        SearchConfig(latency_budget=1.0, squeeze_excite=2.0)

def test_genome_round_trip_and_golden_parameter_count():
    g = parse_genome("net:c16k3s2-d32k3s2-fc")
    assert g == Genome((Block("c", 16, 3, 2), Block("d", 32, 3, 2)), "fc")
    assert str(g) == "net:c16k3s2-d32k3s2-fc"
    model = create_model(ModelSpec(str(g), 1.0, 10, (1, 28, 28)))
    # conv 1->16 3x3 (144) + BN (32); depthwise 16 3x3 (144) + BN (32); pointwise 16->32 (512) + BN (64); linear 32*7*7 -> 10 (15,690)
    assert count_parameters(model) == 144 + 32 + 144 + 32 + 512 + 64 + 32 * 7 * 7 * 10 + 10 == 16618
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_genome_heads_pools_and_width():
    m = create_model(ModelSpec("net:c8k5s1p-c16k3s2-fc32", 1.0, 4, (3, 32, 32)))
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert m.head[1].in_features == 16 * 8 * 8 and m.head[1].out_features == 32  # 32 -pool-> 16 -stride-> 8
    gap = create_model(ModelSpec("net:c8k3s2-gap", 0.5, 3, (1, 9, 9)))
    assert gap.head[-1].in_features == 4  # 8 channels at width 0.5
    assert parse_model_name("net:c8k3s2-gap@0.5") == ("net:c8k3s2-gap", 0.5)


@pytest.mark.parametrize("name, fragment", [
    ("net:c16k4s2-fc", "kernel 1, 3, 5 or 7"),
    ("net:x-gap", "'x' is not a block"),
    ("net:c16k3s2-fcx", "head 'fcx'"),
    ("net:gap", "at least one block"),
    ("net:c16k3s3-fc", "stride 1 or 2"),
    ("net:i24k3s1-fc", r"an inverted residual \(i\) takes an expansion e1\.\.e8"),
    ("net:r24k3s1e2-fc", "and only it does"),
])
def test_bad_genomes_are_one_clear_error(name, fragment):
    with pytest.raises(ModelError, match=fragment):
        parse_model_name(name)


def test_downsampling_below_one_pixel_is_refused():
    with pytest.raises(ModelError, match="below 1x1"):
        create_model(ModelSpec("net:c8k3s2p-c8k3s2p-c8k3s2p-fc", 1.0, 10, (1, 16, 16)))


def test_searched_checkpoint_rebuilds_by_name(tmp_path):
    spec = ModelSpec("net:c8k3s2-d16k3s2-fc", 1.0, 10, (1, 28, 28))
    torch.manual_seed(0)
    model = create_model(spec).eval()
    save_checkpoint(tmp_path / "m.safetensors", model, spec)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 28, 28)
    assert ckpt.spec == spec
    torch.testing.assert_close(ckpt.model.eval()(x), model(x), rtol=0, atol=0)


# --- the space --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 96, 96)])
def test_sampled_genomes_are_seeded_distinct_and_buildable(shape):
    a = sample_genomes(20, shape, seed=3)
    assert [str(g) for g in a] == [str(g) for g in sample_genomes(20, shape, seed=3)]
    assert len({str(g) for g in a}) == len(a) == 20
    assert [str(g) for g in a] != [str(g) for g in sample_genomes(20, shape, seed=4)]
    for g in a:
        fh, fw = g.feature_size(*shape[1:])
        assert 1 <= min(fh, fw) <= 8, (g, fh)  # downsampled to a small map, never below 1x1
        assert create_model(ModelSpec(str(g), 1.0, 10, shape))(torch.zeros(1, *shape)).shape == (1, 10)


def test_mutations_are_valid_neighbours():
    import random

    rng = random.Random(0)
    parent = parse_genome("net:c16k3s2-d32k3s2-c32k3s1-fc")
    children = [mutate(parent, rng, (1, 28, 28)) for _ in range(60)]
    assert all(c is not None for c in children)
    names = {str(c) for c in children}
    assert str(parent) not in names and len(names) > 15
    for c in children:
        assert create_model(ModelSpec(str(c), 1.0, 10, (1, 28, 28)))(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        changed = sum(a != b for a, b in zip(c.blocks, parent.blocks)) + abs(len(c.blocks) - len(parent.blocks)) + (c.head != parent.head)
        assert changed >= 1


# --- measuring ---------------------------------------------------------------------------------

def test_interleaved_timing_gives_every_function_its_blocks():
    calls = {"a": 0, "b": 0}

    def make(k):
        def fn():
            calls[k] += 1
        return fn

    stats = measure_interleaved({"a": make("a"), "b": make("b")}, rounds=3, block_iters=10, block_s=0.0, warmup_iters=2, block_warmup_s=0.0)
    assert calls == {"a": 2 + 3 * (1 + 10), "b": 35} and stats["a"].n == stats["b"].n == 30  # warm-up, then per block: one settling call + 10 timed
    assert stats["a"].min_ms <= stats["a"].p50_ms <= stats["a"].max_ms


def test_spearman_golden():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) vs (1.5, 1.5, 3, 4): Pearson of the ranks
    assert spearman([1, 2, 3, 4], [5, 5, 6, 7]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1])
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [1, 1, 1]) is None


def test_latency_cache_real_onnxruntime(tmp_path):
    specs = {n: ModelSpec(*parse_model_name(n), 10, (1, 28, 28)) for n in ("net:c8k3s2-c16k3s2-fc", "mlp@0.5")}
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    cache = LatencyCache.open("ort-cpu", 1, 1)
    first = time_candidates(specs, x, cache=cache, rounds=2)
    assert all(not v["cached"] and 0 < v["p50_ms"] <= v["p90_ms"] for v in first.values())
    again = time_candidates(specs, x, cache=LatencyCache.open("ort-cpu", 1, 1), rounds=2)
    assert all(v["cached"] for v in again.values())
    # Kept as ratios to the anchor timed in the same group: a second run rescales them by its own anchor measurement.
    assert {k: v["ratio"] for k, v in again.items()} == {k: v["ratio"] for k, v in first.items()}
    for v in again.values():
        assert v["p50_ms"] / v["ratio"] == pytest.approx(next(iter(again.values()))["p50_ms"] / next(iter(again.values()))["ratio"])
    other = LatencyCache.open("ort-cpu", 2, 1)  # another thread count is another measurement
    assert other.path != cache.path and other.get(LatencyCache.key("mlp@0.5", 10, (1, 28, 28))) is None


def test_latency_cache_writers_merge_instead_of_overwriting(tmp_path):
    """Issue 24, item 8: each search read the file once and rewrote it whole, so the last writer erased the others' entries."""
    facts = {"format": 3}
    a, b = LatencyCache(tmp_path / "c.json", facts), LatencyCache(tmp_path / "c.json", facts)  # both opened before either saved
    a.put("mlp|10|1x28x28", {"ratio": 1.5})
    b.put("tiny_cnn|10|1x28x28", {"ratio": 1.0})
    a.save()
    b.save()
    saved = json.loads((tmp_path / "c.json").read_text())["entries"]
    assert saved == {"mlp|10|1x28x28": {"ratio": 1.5}, "tiny_cnn|10|1x28x28": {"ratio": 1.0}}
    assert b.get("mlp|10|1x28x28") == {"ratio": 1.5}  # and a writer learns what the others measured
    assert LatencyCache(tmp_path / "c.json", {"format": 2}).entries == {}  # another environment's file is not this one's


# --- a real search -------------------------------------------------------------------------------

@pytest.fixture
def small(fmnist):
    return fmnist.limit(train=1500, test=300)


@pytest.fixture(scope="module")
def latency_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture
def shared_latency_cache(latency_cache_dir, monkeypatch):
    """One kdedge cache for this module's searches, as a user's machine has: a later search reads the zoo's latencies an earlier one
    measured (their ratios to the anchor), as kdedge search does on a second run."""
    monkeypatch.setenv("KDEDGE_CACHE", str(latency_cache_dir))


def _config(**kw):
    base = dict(latency_budget=1.0, candidates=2, include_zoo=True, proxy_epochs=1, proxy_samples=500, finalists=2, epochs=1, val_split=0.2,
                generations=1, children=1)
    return SearchConfig(**(base | kw))


@pytest.mark.slow
def test_search_end_to_end_and_resume(small, tmp_path, shared_latency_cache):
    from kdedge.resolve import resolve_teacher

    teacher = resolve_teacher("resnet", small.spec)
    config = _config()
    result = search(teacher.model, small, config=config, out=tmp_path / "s", teacher_name=teacher.name, teacher_input=teacher.input)
    rec = json.loads((tmp_path / "s" / "search.json").read_text())
    assert rec["winner"] == result.winner and rec["within_budget"]
    cands = rec["candidates"]
    assert len(cands) == 2 + 6 + 1  # sampled + the zoo's students + one generation of one child
    evolved = [c for c in cands.values() if c["origin"] == "evolved"]
    assert [c["name"] for c in evolved] == rec["generations"][0] and all(c["parent"] in cands and c["generation"] == 1 for c in evolved)
    for c in cands.values():
        assert c["p50_ms"] > 0 and c["params"] > 0 and c["flops"] > 0
        if c["origin"] != "zoo":
            assert ("proxy_val_accuracy" in c) != ("dropped" in c)  # ranked, or dropped with the reason
        else:
            assert "proxy_val_accuracy" in c  # the zoo is ranked over budget too, for comparison
    assert len(rec["finalists"]) == 2 and result.winner in rec["finalists"]
    best = max(rec["finalists"], key=lambda n: rec["finalists"][n]["val_accuracy"])
    assert rec["finalists"][best]["val_accuracy"] == rec["finalists"][result.winner]["val_accuracy"]
    assert rec["teacher"]["p50_ms"] > 0 and rec["teacher"]["val_accuracy"] > 0.8
    # The finalists were re-timed head to head before the pick: the winner's recorded p50 is that measurement.
    h2h = rec["head_to_head"]
    assert set(h2h["models"]) == set(rec["finalists"]) and h2h["rounds"] == 15 and h2h["pick_by_validation"] == result.winner
    assert rec["winner_p50_ms"] == h2h["models"][result.winner]["p50_ms"] and rec["within_budget"]
    for c in cands.values():
        assert c["latency_spread"] >= 0
    student = load_checkpoint(tmp_path / "s" / "student")
    assert student.spec.name == result.winner
    assert (tmp_path / "s" / "accuracy_vs_latency.png").stat().st_size > 10_000
    ranked = [n for n in cands if "proxy_val_accuracy" in cands[n]]
    front = [n for n in ranked if cands[n]["pareto"]]
    for n in ranked:  # nothing ranked beats a Pareto point on both axes
        for f in front:
            assert not (cands[n]["p50_ms"] < cands[f]["p50_ms"] and cands[n]["proxy_val_accuracy"] > cands[f]["proxy_val_accuracy"])

    # Resumed: everything comes from search.json and the cache; nothing is trained again.
    record = json.loads((tmp_path / "s" / "search.json").read_text())
    for key in ("block_kinds", "squeeze_excite"):  # as a search recorded before the richer blocks existed: it resumes the same
        del record["config"][key]
    (tmp_path / "s" / "search.json").write_text(json.dumps(record))
    again = search(teacher.model, small, config=_config(resume=True), out=tmp_path / "s")
    assert again.winner == result.winner and again.student is None
    assert json.loads((tmp_path / "s" / "search.json").read_text())["timing_cache_hits"] == 9
    with pytest.raises(ConfigError, match=r"ran with other settings \(target: .*latency_budget_ms': 1.0.* -> .*0.5"):
        search(teacher.model, small, config=_config(resume=True, latency_budget=0.5), out=tmp_path / "s")


@pytest.mark.slow
def test_budget_drops_slow_candidates(small, tmp_path, shared_latency_cache):
    from kdedge.resolve import resolve_teacher

    teacher = resolve_teacher("resnet", small.spec)
    cache = LatencyCache.open("ort-cpu", 1, 1)
    specs = {n: ModelSpec(*parse_model_name(n), 10, (1, 28, 28)) for n in ("mlp@0.5", "tiny_cnn")}
    lat = time_candidates(specs, small.test.inputs(slice(0, 1)).numpy(), cache=cache)
    # The search times again, and a 0.03 ms model under a loaded CI worker moves by ±50 %: the budget sits at the geometric middle
    # and the gap must leave at least 1.58x (the root of 2.5) on either side (measured: mlp@0.5 is 0.27-0.39x tiny_cnn on AVX-512 and AVX2 EPYCs).
    fast, slow = lat["mlp@0.5"]["p50_ms"], lat["tiny_cnn"]["p50_ms"]
    if slow < 2.5 * fast:
        pytest.skip(f"mlp@0.5 is not 2.5x faster than tiny_cnn on this machine ({fast:.4f} vs {slow:.4f} ms)")
    budget = (fast * slow) ** 0.5
    config = _config(latency_budget=budget, candidates=1, finalists=1, generations=0, proxy_samples=300)
    result = search(teacher.model, small, config=config, out=tmp_path / "s")
    cands = result.record["candidates"]
    assert "over budget" in cands["tiny_cnn"]["dropped"] and "proxy_val_accuracy" in cands["tiny_cnn"]
    assert cands[result.winner]["p50_ms"] <= budget and result.winner != "tiny_cnn"
    assert "tiny_cnn" not in result.record["finalists"]


@pytest.mark.slow
def test_no_candidate_within_budget_is_one_error_and_no_directory(small, tmp_path):
    from kdedge.resolve import resolve_teacher

    teacher = resolve_teacher("resnet", small.spec)
    with pytest.raises(ConfigError, match="no candidate meets .* raise --latency-budget"):
        search(teacher.model, small, config=_config(latency_budget=1e-6, include_zoo=False, candidates=2), out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_search_config_problems():
    with pytest.raises(ConfigError) as e:
        SearchConfig(target="trt", target_threads=0, time_budget=0)
    text = str(e.value)
    for fragment in ("latency_budget must be a positive number", "target must be one of ort-cpu, torch-cpu", "target_threads must be >= 1",
                     "time_budget must be > 0"):
        assert fragment in text


@pytest.mark.slow
def test_search_with_an_onnx_teacher_reports_what_it_cannot_measure(fmnist, tmp_path, capsys):
    """Issue 24, item 4: with --target torch-cpu an ONNX teacher crashed deep-copying its onnxruntime session (after search.json
    was written, so --resume crashed too); on ort-cpu the CLI crashed formatting its p50 of None; its params were recorded as 0."""
    from kdedge.cli import main
    from kdedge.exporters import export_onnx
    from kdedge.models import load_checkpoint, pretrained_path

    onnx_path = tmp_path / "teacher.onnx"
    export_onnx(load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model.eval(), onnx_path, input_shape=(1, 28, 28))
    args = ["search", "--teacher", str(onnx_path), "--target", "torch-cpu", "--latency-budget", "1.0", "--candidates", "1", "--no-include-zoo",
            "--generations", "0", "--finalists", "1", "--epochs", "1", "--proxy-epochs", "1", "--proxy-samples", "300", "--train-limit", "1500",
            "--test-limit", "300", "--quiet", "--out", str(tmp_path / "s")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "teacher p50 unknown (an ONNX teacher is timed as it is, on ort-cpu at fp32; not on torch-cpu at fp32)" in out
    rec = json.loads((tmp_path / "s" / "search.json").read_text())
    assert rec["teacher"]["p50_ms"] is None and rec["teacher"]["params"] is None and rec["teacher"]["val_accuracy"] > 0.8
    teacher = json.loads((tmp_path / "s" / "student" / "metrics.json").read_text())["teacher"]
    assert teacher["params"] is None and teacher["flops"] is None  # unknown, not 0
    assert main([*args, "--resume"]) == 0  # a resumed search reads the same record

    # On ort-cpu the ONNX teacher is timed as the file it is, interleaved with the anchor like any candidate.
    from kdedge.search.latency import LatencyMeter

    meter = LatencyMeter(fmnist.test.batch_of(1), num_classes=10, rounds=2)
    spec = ModelSpec("teacher", 1.0, 10, (1, 28, 28))
    lat = meter.measure({"teacher": spec}, files={"teacher": onnx_path})["teacher"]
    assert lat["p50_ms"] > meter.anchor_p50_ms and not lat["cached"]  # the 26 M-MAC teacher is slower than tiny_cnn


class _BatchInTheTrace(nn.Module):
    """Warns as TorchScript's tracer does when a value is baked into the trace (a batch size turned into a Python int): the
    warning, raised here on purpose, is what the trial exporter refuses; torch.export never sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        if torch.jit.is_tracing():
            import warnings

            warnings.warn("Converting a tensor to a Python integer might cause the trace to be incorrect", torch.jit.TracerWarning, stacklevel=2)
        return self.fc(x.flatten(1))


def test_a_model_the_trial_exporter_refuses_is_timed_on_the_shipped_export_and_dynamo_times_bypass_the_cache(tmp_path):
    """The meter's two exporters: TorchScript's refuses a trace with a baked-in value (and leaves no file), the meter then times
    torch.export's ONNX of the same model; a ``dynamo``-timed model is never written to, or read from, the latency cache."""
    from kdedge._dynamo import torchscript_export
    from kdedge.search.latency import LatencyCache, LatencyMeter

    model = _BatchInTheTrace().eval()
    assert not torchscript_export(model, tmp_path / "trial.onnx", (1, 8, 8)) and not (tmp_path / "trial.onnx").exists()
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    cache = LatencyCache(None, {"format": "test"})
    meter = LatencyMeter(x, num_classes=3, rounds=2, cache=cache)
    spec = ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8))
    assert meter.measure({"odd": ModelSpec("odd", 1.0, 3, (1, 8, 8))}, modules={"odd": model})["odd"]["p50_ms"] > 0  # timed all the same
    assert not meter.measure({"tiny_cnn": spec}, exporter="dynamo")["tiny_cnn"]["cached"] and cache.entries == {}
    assert not meter.measure({"tiny_cnn": spec})["tiny_cnn"]["cached"] and set(cache.entries) == {LatencyCache.key("tiny_cnn", 3, (1, 8, 8))}
    assert meter.measure({"tiny_cnn": spec})["tiny_cnn"]["cached"]  # read back on the trial exporter only
    with pytest.raises(ValueError, match="exporter must be"):
        meter.measure({"tiny_cnn": spec}, exporter="onnx")


# --- every runtime is a search target (issue 27, item 1) -----------------------------------------

@pytest.mark.edge("executorch", "litert", "openvino", "ort")
@pytest.mark.parametrize("target, precision", [("ort-cpu", "int8"), ("executorch-cpu", "int8"), ("litert-cpu", "int8"), ("openvino-cpu", "int8"),
                                               ("ort-mobile-cpu", "int8"), ("litert-cpu", "fp32")])
def test_the_meter_times_the_file_the_target_runs_at_its_precision(tmp_path, target, precision):
    """The latency meter exports each candidate to its target's own format (ExecuTorch and LiteRT from the module; OpenVINO and the
    ORT format from the ONNX file, quantized first for INT8) and times it in that runtime. The file computes the model: FP32 to
    float rounding, INT8 to the argmax on most inputs; and an INT8 file is the quantized one: its weights take a quarter of the bytes."""
    from kdedge.bench.runners import make_runner
    from kdedge.exporters.edge import artifact_bytes, edge_format

    torch.manual_seed(0)
    spec = ModelSpec(*parse_model_name("mlp"), 10, (1, 28, 28))  # 0.2 M weights: the file's size is its weights'
    model = create_model(spec).eval()
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    meter = LatencyMeter(x, num_classes=10, target=target, precision=precision, batch=1)
    path = meter.artifact(model, spec, tmp_path / "m")
    runner = make_runner(target, path=path, precision=precision, threads=1)
    got = runner.predict(x, batch_size=1)
    fp32 = LatencyMeter(x, num_classes=10, target=target, batch=1).artifact(model, spec, tmp_path / "f")
    runtime = target.split("-")[0] if target != "ort-mobile-cpu" else "ort"
    size = (lambda p: p.stat().st_size) if target == "ort-cpu" else (lambda p: artifact_bytes(runtime, p))
    if target != "ort-cpu":
        assert path.suffix == edge_format(runtime).suffix
    if precision == "fp32":
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
        return
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()
    assert size(path) < 0.4 * size(fp32), (size(path), size(fp32))


def test_search_targets_and_precisions_are_checked_up_front():
    with pytest.raises(ConfigError, match="target_precision int8 is not timed on torch-cpu, which times fp32; int8 is timed on ort-cpu, executorch-cpu"):
        SearchConfig(latency_budget=1.0, target="torch-cpu", target_precision="int8")
    with pytest.raises(ConfigError, match="litert-cpu does not time fp16; it times fp32 or int8"):
        LatencyMeter(np.zeros((1, 1, 28, 28), np.float32), num_classes=10, target="litert-cpu", precision="fp16")
    assert SearchConfig(latency_budget=1.0, target="litert-cpu", target_precision="int8").target_precision == "int8"
    # Another precision, or another edge runtime's version, is another measurement.
    keys = {environment_key(t, 1, 1, p)[0] for t, p in (("ort-cpu", "fp32"), ("ort-cpu", "int8"), ("litert-cpu", "int8"), ("executorch-cpu", "int8"))}
    assert len(keys) == 4
    assert environment_key("litert-cpu", 1, 1, "int8")[1]["versions"]["litert"].startswith("ai-edge-litert ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: torch-cuda is a target here")
def test_a_cuda_target_without_a_gpu_is_one_line_and_no_directory(tmp_path, capsys):
    """Found on CPU: the search wrote OUT/search.json, then failed on the first timing; the target is checked before OUT is written."""
    from kdedge.cli import main

    assert main(["search", "--latency-budget", "0.5", "--target", "torch-cuda", "--target-precision", "fp16", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdedge: error: --target torch-cuda needs a CUDA GPU and torch built with CUDA; none is visible here"]
    assert not (tmp_path / "s").exists()


# --- trustworthy latencies (issue 27, item 3) ----------------------------------------------------

def test_spread_and_pooling_golden():
    from kdedge.search.latency import _pooled, _spread

    assert _spread([1.0, 1.0, 1.0]) == 0.0
    assert _spread([0.9, 1.0, 1.1, 1.0, 1.0]) == pytest.approx((1.06 - 0.94) / 1.0)  # numpy's linear p10/p90
    pooled = _pooled({"rounds": [1.0, 1.4, 1.0], "ratio": 1.0, "p90_ratio": 1.5, "spread": 0.32},
                     {"rounds": [1.1, 1.1, 1.2], "ratio": 1.1, "p90_ratio": 1.3, "spread": 0.08})
    assert pooled["ratio"] == pytest.approx(1.1) and pooled["rounds"] == [1.0, 1.4, 1.0, 1.1, 1.1, 1.2]
    assert pooled["remeasured"] and pooled["first_spread"] == 0.32 and pooled["p90_ratio"] == pytest.approx(1.4)


def test_an_unsteady_measurement_is_timed_again_and_carries_its_spread(monkeypatch):
    """The runners are real (eager PyTorch on torch-cpu); the clock is scripted, because a machine's drift cannot be ordered on
    demand: the first measurement of the model has one slow round (a ratio of 4 where the others are 0.5), the second none."""
    import kdedge.search.latency as latency
    from kdedge.bench.timing import LatencyStats

    script = iter([[0.5, 0.5, 2.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5, 0.5]])

    def stats(blocks):
        return LatencyStats(**{**LatencyStats.from_samples(blocks).to_dict(), "p50_ms": float(np.median(blocks)), "blocks_ms": tuple(blocks)})

    def scripted(fns, rounds=7, **_kw):  # the anchor ("0") at 0.5 ms a block; the model's blocks as scripted, 0.25 of each
        return {k: stats([0.5] * rounds if k == "0" else [0.25 * r for r in next(script)]) for k in fns}

    monkeypatch.setattr(latency, "measure_interleaved", scripted)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    lines = []
    meter = LatencyMeter(x, num_classes=10, target="torch-cpu", rounds=5, log=lines.append)
    lat = meter.measure({"m": ModelSpec("mlp", 0.5, 10, (1, 28, 28))})["m"]
    assert lat["remeasured"] and any("1 unsteady measurement(s) timed again (m: per-round spread" in line for line in lines), lines
    # Pooled: ten rounds, one of ratio 1.0 (0.5 ms over the anchor's 0.5), nine of 0.25: the median is 0.25, the spread what is left.
    assert lat["ratio"] == pytest.approx(0.25) and lat["p50_ms"] == pytest.approx(0.125)
    assert lat["spread"] == pytest.approx(float((np.percentile([0.25] * 9 + [1.0], 90) - 0.25) / 0.25))


def test_the_pick_is_the_most_accurate_finalist_within_budget_on_its_retiming():
    from kdedge.search.run import pick

    acc, searched = {"a": 0.93, "b": 0.92, "c": 0.92}, {"a": 0.009, "b": 0.008, "c": 0.007}
    assert pick(["a", "b", "c"], acc, searched, {}, 0.01) == "a"
    assert pick(["a", "b", "c"], acc, searched, {"a": 0.011, "b": 0.0095, "c": 0.0099}, 0.01) == "c"  # a is over; b and c tie: the faster searched
    assert pick(["a", "b", "c"], acc, searched, {"a": 0.012, "b": 0.013, "c": 0.011}, 0.01) == "c"  # none within: the fastest re-timed


@pytest.mark.edge("executorch")
def test_a_candidate_the_converter_refuses_is_recorded_not_fatal(tmp_path):
    """Found in review: on ExecuTorch or LiteRT one candidate the converter refused stopped the whole search (and its --resume).
    With failures="record" (what a search asks for) it comes back with the converter's reason, and the others are timed."""
    from kdedge.errors import KdedgeError

    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    specs = {n: ModelSpec("mlp", 0.5, 10, (1, 28, 28)) for n in ("ok", "bad")}
    torch.manual_seed(0)
    modules = {"ok": create_model(specs["ok"]).eval(), "bad": _DataDependent().eval()}
    lines = []
    meter = LatencyMeter(x, num_classes=10, target="executorch-cpu", rounds=2, log=lines.append)
    lat = meter.measure(specs, modules=modules, failures="record")
    assert lat["ok"]["p50_ms"] > 0 and set(lat["bad"]) == {"error", "cached"} and "ExecuTorch" in lat["bad"]["error"]
    assert any(line.startswith("search: bad cannot be timed on executorch-cpu fp32") for line in lines)
    with pytest.raises(KdedgeError):  # the default: a caller that needs every number (pruning) is told
        meter.measure({"bad": specs["bad"]}, modules={"bad": modules["bad"]})

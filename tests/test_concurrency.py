"""One cache directory under load: distills, latency timings and an export at once (issue 24, item 8).

Before, a search read the latency cache once and rewrote the whole file, so two searches at once
lost each other's measurements. Now every writer of a shared cache file either merges under a lock
(latencies) or replaces it atomically with the same content (logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdedge.search.latency import LatencyCache

# Two disjoint sets of candidates, timed by two processes into one latency cache file.
_TIMERS = (("mlp@0.5", "net:c8k3s2-c16k3s2-fc", "net:c8k3s2-gap"), ("mlp@0.25", "net:c4k3s2-c8k3s2-fc", "net:d8k3s2-gap"))
_TIME = ("import sys, numpy as np; from kdedge.models import ModelSpec; from kdedge.models.zoo import parse_model_name; "
         "from kdedge.search.latency import LatencyCache, time_candidates; "
         "specs = {n: ModelSpec(*parse_model_name(n), 10, (1, 28, 28)) for n in sys.argv[1:]}; "
         "x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32); "
         "time_candidates(specs, x, cache=LatencyCache.open('ort-cpu', 1, 1), rounds=2, group=2)")


@pytest.mark.slow
def test_distill_search_timing_and_export_share_one_cache(tmp_path):
    cache = tmp_path / "cache"
    env = os.environ | {"KDEDGE_CACHE": str(cache)}
    distill = [sys.executable, "-m", "kdedge", "distill", "--cache", "disk", "--teacher-runtime", "torch", "--threads", "1", "--train-limit", "600",
               "--test-limit", "200", "--epochs", "1", "--quiet"]
    commands = [
        [*distill, "--seed", "0", "--out", str(tmp_path / "d0")],
        [*distill, "--seed", "1", "--out", str(tmp_path / "d1")],
        *([sys.executable, "-c", _TIME, *names] for names in _TIMERS),
        [sys.executable, "-m", "kdedge", "export", "resnet", "--format", "onnx", "--parity-samples", "200", "--no-evaluate", "--out", str(tmp_path / "e")],
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(600), p.communicate()[1]) for p in procs]
    assert [code for code, _ in results] == [0] * len(commands), [err[-800:] for _, err in results]

    # No process lost another's latencies: every candidate of both timers is in the one file.
    (latency_file,) = (cache / "latency").glob("*.json")
    entries = json.loads(latency_file.read_text())["entries"]
    assert {key.split("|")[0] for key in entries} == {n for names in _TIMERS for n in names}
    assert LatencyCache.open("ort-cpu", 1, 1).path.name == latency_file.name  # the key this process would use: one environment

    # Both distills read or wrote the one logit file, and it holds what a lone run writes, bit for bit.
    keys = {json.loads((tmp_path / d / "metrics.json").read_text())["teacher_cache"]["key"] for d in ("d0", "d1")}
    (key,) = keys
    lone = subprocess.run([*distill, "--seed", "0", "--out", str(tmp_path / "lone")], env=os.environ | {"KDEDGE_CACHE": str(tmp_path / "alone")},
                          capture_output=True, text=True, check=False)
    assert lone.returncode == 0, lone.stderr[-800:]
    assert (cache / "logits" / f"{key}.npy").read_bytes() == (tmp_path / "alone" / "logits" / f"{key}.npy").read_bytes()
    assert (tmp_path / "e" / "model.onnx").is_file()

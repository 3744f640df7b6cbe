"""Which ONNX export the latency meter times: TorchScript's (fast) vs torch.export's (what ships).

    python benchmarks/timing_export.py [--sets 5] [--rounds 7] [--pruned]

Searches and pruning runs time dozens to hundreds of models; `kdedge.search.latency` exports each
with TorchScript's exporter and reports shipped numbers on torch.export's. This script measures
what that choice is worth and what it costs, per zoo model (seeded, untrained: latency does not
depend on the weights), on onnxruntime at 1 thread, batch 1:

- export seconds with each exporter (one export each, after one warm-up export of the model);
- the ratio p50(TorchScript file) / p50(torch.export file), timed head to head in one interleaved
  set (`measure_interleaved`), over `--sets` sets: its median and range;
- the largest output difference between the two files on 8 random inputs.

`--pruned` also times each model with a third of every channel group removed (the pruning runs'
case). Acceptance for the meter: median ratio within 0.95-1.05 for every model, outputs equal to
1e-4. CPU flags are printed with the table (onnxruntime's kernels depend on them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.bench.env import capture_environment  # noqa: E402
from kdedge.bench.runners import make_runner  # noqa: E402
from kdedge.bench.timing import measure_interleaved  # noqa: E402
from kdedge.exporters.onnx import export_onnx  # noqa: E402
from kdedge.models import ModelSpec, create_model  # noqa: E402
from kdedge.ort import ort_predict, ort_session  # noqa: E402
from kdedge._dynamo import torchscript_export  # noqa: E402

MODELS = [("resnet", (1, 28, 28)), ("mobilenet_v2", (3, 32, 32)), ("tiny_cnn", (1, 28, 28)), ("mlp", (1, 28, 28)),
          ("net:c16k5s1p-d24k3s2-fc32", (1, 28, 28))]


def _pruned(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    from kdedge.pruning.graph import ChannelGraph

    graph = ChannelGraph(model, shape)
    graph.remove({n: list(range(g.channels // 3)) for n, g in graph.groups.items()})
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pruned", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = capture_environment(1)
    print(f"CPU: {env['cpu'].get('model')}; flags: {' '.join(env['cpu'].get('flags') or [])}")
    print(f"torch {env['versions'].get('torch')}, onnxruntime {env['versions'].get('onnxruntime')}; ort-cpu, 1 thread, batch 1")
    print(f"| model | export s (TorchScript) | export s (torch.export) | p50 ratio TS/dynamo, median [min-max] over {args.sets} sets | max |Δ output| |")
    print("|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="kdedge-timing-export-"))
    cases = [(n, s, False) for n, s in MODELS] + ([(n, s, True) for n, s in MODELS if n != "mlp"] if args.pruned else [])
    for name, shape, pruned in cases:
        torch.manual_seed(0)
        model = create_model(ModelSpec(name, 1.0, 10, shape)).eval()
        if pruned:
            model = _pruned(model, shape)
        label = name + (" (pruned 1/3)" if pruned else "")
        ts, dyn = work / f"{len(list(work.iterdir()))}-ts.onnx", work / f"{len(list(work.iterdir()))}-dyn.onnx"
        torchscript_export(model, ts, shape)  # warm-up of both exporters for this model
        export_onnx(model, dyn, input_shape=shape)
        t = time.perf_counter()
        ok = torchscript_export(model, ts, shape)
        t_ts = time.perf_counter() - t
        t = time.perf_counter()
        export_onnx(model, dyn, input_shape=shape)
        t_dyn = time.perf_counter() - t
        if not ok:
            print(f"| {label} | fails (falls back) | {t_dyn:.2f} | - | - |")
            continue
        x = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
        diff = float(np.abs(ort_predict(ort_session(ts), x) - ort_predict(ort_session(dyn), x)).max())
        fns = {k: make_runner("ort-cpu", path=p, threads=1).prepare(x[:1]) for k, p in (("ts", ts), ("dyn", dyn))}
        ratios = []
        for _ in range(args.sets):
            st = measure_interleaved(fns, rounds=args.rounds)
            ratios.append(st["ts"].p50_ms / st["dyn"].p50_ms)
        print(f"| {label} | {t_ts:.2f} | {t_dyn:.2f} | {np.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

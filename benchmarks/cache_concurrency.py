"""One KDEDGE_CACHE under load: distills, searches and an export at once, against one run alone (issue 24, item 8).

    python benchmarks/cache_concurrency.py [--train-limit 3000] [--candidates 6] [--json benchmarks/results/cache_concurrency.json]

Starts, at the same moment and against one fresh cache directory:

* two ``kdedge distill --cache disk`` (seeds 0 and 1: the same teacher and data, so both want the
  same logit file);
* two ``kdedge search`` (seeds 0 and 1: different sampled candidates, timed into one latency file);
* one ``kdedge export`` of the shipped teacher.

Then it checks what the issue asks: every process finished; no latency entry was lost (every
candidate a search timed itself is in the shared file); and the shared logit file holds the bytes a
lone ``kdedge distill`` writes into an empty cache. It prints one table and the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.bench.env import capture_environment


def _commands(tmp: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    kd = [sys.executable, "-m", "kdedge"]
    data = ["--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit), "--teacher-runtime", "torch", "--threads", "1", "--quiet"]
    search = ["search", "--latency-budget", "1.0", "--candidates", str(args.candidates), "--no-include-zoo", "--generations", "0",
              "--finalists", "1", "--epochs", "1", "--proxy-epochs", "1", "--proxy-samples", "500", "--cache", "disk", *data]
    return {
        "distill seed 0": [*kd, "distill", "--cache", "disk", "--epochs", "1", "--seed", "0", *data, "--out", str(tmp / "d0")],
        "distill seed 1": [*kd, "distill", "--cache", "disk", "--epochs", "1", "--seed", "1", *data, "--out", str(tmp / "d1")],
        "search seed 0": [*kd, *search, "--seed", "0", "--out", str(tmp / "s0")],
        "search seed 1": [*kd, *search, "--seed", "1", "--out", str(tmp / "s1")],
        "export": [*kd, "export", "resnet", "--format", "onnx,onnx-int8", "--out", str(tmp / "e")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-limit", type=int, default=3000)
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--json", default="benchmarks/results/cache_concurrency.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdedge-concurrency-") as work:
        tmp = Path(work)
        cache = tmp / "cache"
        commands = _commands(tmp, args)
        start = time.perf_counter()
        errs = {name: open(tmp / f"{name}.err", "w+") for name in commands}  # files, not pipes: a full pipe would stall its process
        procs = {name: subprocess.Popen(cmd, env=os.environ | {"KDEDGE_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=errs[name], text=True)
                 for name, cmd in commands.items()}
        ended: dict[str, dict] = {}
        while len(ended) < len(procs):  # each process's own finishing time, whatever order they finish in
            for name, proc in procs.items():
                if name not in ended and proc.poll() is not None:
                    errs[name].seek(0)
                    err = errs[name].read()
                    errs[name].close()
                    ended[name] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                                   "error": err.strip().splitlines()[-1:] if proc.returncode else []}
            time.sleep(0.1)
        wall = time.perf_counter() - start

        # Latencies: each search's own measurements (not read from the cache) must all be in the shared file.
        files = list((cache / "latency").glob("*.json"))
        shared = json.loads(files[0].read_text())["entries"] if len(files) == 1 else {}
        timed = set()
        for s in ("s0", "s1"):
            rec = json.loads((tmp / s / "search.json").read_text()) if (tmp / s / "search.json").is_file() else {"candidates": {}}
            timed |= {n for n, c in rec["candidates"].items() if "p50_ms" in c}
        lost = sorted(n for n in timed if not any(k.split("|")[0] == n for k in shared))

        # Logits: the shared file against a lone run's, byte for byte.
        keys = {json.loads((tmp / d / "metrics.json").read_text())["teacher_cache"]["key"] for d in ("d0", "d1") if (tmp / d / "metrics.json").is_file()}
        lone_t = time.perf_counter()
        lone = subprocess.run([*commands["distill seed 0"][:-1], str(tmp / "lone")], env=os.environ | {"KDEDGE_CACHE": str(tmp / "alone")},
                              capture_output=True, text=True, check=False)
        lone_s = time.perf_counter() - lone_t
        identical = len(keys) == 1 and lone.returncode == 0 and all(
            (cache / "logits" / f"{k}.npy").read_bytes() == (tmp / "alone" / "logits" / f"{k}.npy").read_bytes() for k in keys)

    env = capture_environment(2)
    rows = [(name, e["rc"], e["seconds"], "; ".join(e["error"])) for name, e in ended.items()]
    print(f"CPU: {env['cpu'].get('model')}; flags: {' '.join(env['cpu'].get('flags') or [])}")
    print(f"{len(commands)} processes against one KDEDGE_CACHE, started together; wall {wall:.1f} s (a lone distill: {lone_s:.1f} s)\n")
    print("| process | exit | finished after (s) | error |\n|---|---:|---:|---|")
    for name, rc, seconds, err in rows:
        print(f"| {name} | {rc} | {seconds:.1f} | {err} |")
    print(f"\nlatency entries: {len(timed)} timed by the two searches, {len(shared)} in the shared file, lost: {len(lost)} {lost or ''}")
    print(f"logit file shared by both distills identical to a lone run's: {identical}")
    result = {"processes": len(commands), "wall_s": wall, "lone_distill_s": lone_s, "ended": ended, "latency_timed": len(timed),
              "latency_in_file": len(shared), "latency_lost": lost, "logits_identical": identical, "cpu": env["cpu"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(e["rc"] == 0 for e in ended.values()) and not lost and identical else 1


if __name__ == "__main__":
    sys.exit(main())

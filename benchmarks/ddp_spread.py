"""How far apart are two "equal" distillation runs? The margin behind tests/test_ddp.py.

Runs the CI DDP test's configuration (the default student, 4k training / 1k test images, 2
epochs) for several seeds as 1 process × 1 thread, 1 process × 2 threads and 2 gloo processes ×
1 thread, and prints the test accuracy of each and the largest difference within a seed. The
tiny_cnn student has BatchNorm, whose statistics are per rank under DDP, and float summation
order differs with the thread count, so these runs are *not* bit-equal: a test may only compare
them with a margin larger than this spread (or against a floor far below all of them).

    python benchmarks/ddp_spread.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = ["distill", "--train-limit", "4000", "--test-limit", "1000", "--epochs", "2", "--cache", "disk", "--quiet"]
MODES = {
    "1 proc x 1 thread": lambda py: [py, "-m", "kdedge", *ARGS, "--threads", "1"],
    "1 proc x 2 threads": lambda py: [py, "-m", "kdedge", *ARGS, "--threads", "2"],
    "2 procs x 1 thread (gloo)": lambda py: [str(Path(py).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "kdedge", *ARGS],
}


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "?"
    return " ".join(sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx")) or f in ("avx_vnni",))) or "none"


def run(mode: str, seed: int, work: Path) -> float:
    out = work / f"{mode.split()[0]}-{mode.split()[3]}-{seed}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "KDEDGE_CACHE": str(work / "cache")}
    cmd = MODES[mode](sys.executable) + ["--seed", str(seed), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; flags: {cpu_flags()}")
    rows, spreads = [], []
    with tempfile.TemporaryDirectory(prefix="kdedge-ddp-spread-") as tmp:
        for seed in args.seeds:
            accs = {mode: run(mode, seed, Path(tmp)) for mode in MODES}
            spread = max(accs.values()) - min(accs.values())
            spreads.append(spread)
            rows.append((seed, accs, spread))
    print(f"\n| seed | {' | '.join(MODES)} | max − min (pt) |")
    print("|---:|" + "---:|" * len(MODES) + "---:|")
    for seed, accs, spread in rows:
        print(f"| {seed} | " + " | ".join(f"{100 * a:.2f}" for a in accs.values()) + f" | {100 * spread:.2f} |")
    every = [a for _, accs, _ in rows for a in accs.values()]
    print(f"\nall runs: min {100 * min(every):.2f} %, max {100 * max(every):.2f} %; largest within-seed spread {100 * max(spreads):.2f} pt")


if __name__ == "__main__":
    main()

"""Student accuracy against epochs and against the teacher's accuracy, from stored `benchmarks/methods.py` runs (issue 16).

    python benchmarks/curve.py runs/exp/m30 runs/exp/m60 runs/exp/m30-oldteacher ...

Reads every ``<method>-seed<k>-e<epochs>.json`` in the given directories (what methods.py stores,
one file per finished run) and prints one row per (directory, method, epochs): the teacher's test
accuracy, the seeds, and the student's test and validation accuracy (mean ± std). Nothing is
trained here: the numbers are the stored runs'.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for directory in argv:
        for path in sorted(Path(directory).glob("*-seed*-e*.json")):
            run = json.loads(path.read_text())
            groups[(directory, run["method"], run["epochs"], json.dumps(run.get("config", {}), sort_keys=True))].append(run)
    print("| runs | student | method | epochs | teacher test % | seeds | student test % | student val % |")
    print("|---|---|---|---:|---:|---|---:|---:|")
    for (directory, method, epochs, _config), runs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        teacher = {r.get("teacher_accuracy") for r in runs} - {None}
        t = f"{100 * teacher.pop():.2f}" if len(teacher) == 1 else "—"
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        test = [100 * r["accuracy"] for r in runs]
        val = [100 * r["val_accuracy"] for r in runs if r.get("val_accuracy") is not None]
        student = ",".join(sorted({str(r.get("student", "tiny_cnn")) for r in runs}))
        print(f"| {Path(directory).name} | {student} | {method} | {epochs} | {t} | {seeds} | {_mean_std(test)} | {_mean_std(val)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Distillation methods compared, each against scratch trained the same way.

    python benchmarks/methods.py [--seeds 0,1,2] [--methods scratch,kd,fitnets,at,dkd] [--epochs 15] [--out runs/methods]
    python benchmarks/methods.py --methods scratch-aug,kd-step,kd-views,dkd-views --epochs 30 --views 10 --erasing 0.25 \\
        --teacher runs/teacher-v2 --val-split 0.1 --out runs/methods-aug      # issue 16: augmented, fair baseline

A teacher into the default student (tiny_cnn), full 60k/10k, the recipe of `kdedge distill`
(SGD-Nesterov lr 0.05 cosine, batch 128) unless ``--set key=value`` overrides it. Every method gets
the same initial weights per seed.

Plain methods (issue 9) see un-augmented images: Hinton KD and DKD read the logit cache; the feature
methods add their term to Hinton's loss (α 0.5, T 2) between the student's `features.3` (32x7x7)
and the teacher's `stages.1` (64x7x7) and run the teacher on every batch. Augmented methods (issue
16) all see random crops (±2 px), flips and ``--erasing`` boxes: ``scratch-aug`` is the fair baseline
(the same augmentation and epochs as the distilled students), ``kd-step`` runs the teacher on every
augmented batch (kdedge before issue 16), ``kd-views``/``dkd-views`` read ``--views`` K stored views.

With ``--val-split`` the last fraction of the training images is held out: every run reports its
validation accuracy (what a recipe is chosen on) and its test accuracy (what is reported).
Each finished run is stored as OUT/<method>-seed<k>.json and skipped when the script is run again,
so a long job can be resumed. Prints mean ± std per method and the Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from kdedge.config import DistillConfig, TrainConfig
from kdedge.data import load_dataset
from kdedge.resolve import resolve_student, resolve_teacher
from kdedge.runs import distill, train

_FEATURES = {"student_layer": "features.3", "teacher_layer": "stages.1"}
#: method -> DistillConfig overrides (on top of the kdedge distill defaults); "{views}"/"{erasing}" come from the flags.
METHODS: dict[str, dict] = {
    "scratch": {"alpha": 0.0},
    "kd": {"loss": "hinton", "alpha": 0.5, "temperature": 2.0},
    "fitnets": {"loss": "fitnets", "alpha": 0.5, "temperature": 2.0, **_FEATURES, "feature_weight": 1.0},
    "at": {"loss": "at", "alpha": 0.5, "temperature": 2.0, **_FEATURES, "feature_weight": 1000.0},
    # The paper's T 4 / beta 8 diverged on this student even with a 2-epoch warm-up (10 % accuracy);
    # T 2 / beta 2 / 1-epoch warm-up trained (92.59 % on seed 0 in a probe).
    "dkd": {"loss": "dkd", "temperature": 2.0, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup": 1.0},
    "scratch-aug": {"alpha": 0.0, "augment": True, "random_erasing": "{erasing}"},
    "kd-step": {"loss": "hinton", "augment": True, "random_erasing": "{erasing}", "cache": "off"},
    "kd-views": {"loss": "hinton", "views": "{views}", "random_erasing": "{erasing}"},
    "dkd-views": {"loss": "dkd", "temperature": 2.0, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup": 1.0, "views": "{views}", "random_erasing": "{erasing}"},
}


def overrides_for(method: str, args: argparse.Namespace) -> dict:
    fill = {"{views}": args.views, "{erasing}": args.erasing}
    out = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in METHODS[method].items()}
    return out | {k: v for k, v in args.set.items() if not (method.startswith("scratch") and k in ("alpha", "temperature"))}


def run_one(method: str, seed: int, args: argparse.Namespace, data, teacher) -> dict:
    student, spec = resolve_student(args.student, data.spec, seed)
    overrides = overrides_for(method, args)
    start = time.perf_counter()
    if method.startswith("scratch"):
        keep = {k: v for k, v in overrides.items() if k in TrainConfig.__dataclass_fields__}
        config = TrainConfig(epochs=args.epochs, seed=seed, model=args.student, **keep)
        result = train(student, data.train, data.test, val_data=data.val, config=config, spec=spec, progress=False)
    else:
        config = DistillConfig(epochs=args.epochs, seed=seed, cache="memory" if overrides.get("cache") != "off" else "off",
                               **{k: v for k, v in overrides.items() if k != "cache"})
        if overrides.get("views"):
            config = DistillConfig(**(config.to_dict() | {"cache": "disk"}))  # the K views are shared by every seed and method
        result = distill(student, teacher, data.train, data.test, val_data=data.val, config=config, student_spec=spec, progress=False)
    return {"method": method, "seed": seed, "epochs": args.epochs, "accuracy": result.test.accuracy, "macro_f1": result.test.macro_f1,
            "val_accuracy": result.val.accuracy if result.val is not None else None, "seconds": time.perf_counter() - start,
            "config": overrides, "teacher": args.teacher, "student": args.student,
            "epoch_seconds": [h["seconds"] for h in result.history], "teacher_cache": result.metrics.get("teacher_cache"),
            "teacher_accuracy": (result.metrics.get("teacher") or {}).get("test", {}).get("accuracy"),
            "history": [{k: h[k] for k in ("epoch", "val_accuracy", "test_accuracy") if k in h} for h in result.history]}


def _kv(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key.replace("-", "_"), yaml.safe_load(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="scratch,kd,fitnets,at,dkd")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--views", type=int, default=10, help="K stored views per image for the *-views methods")
    ap.add_argument("--erasing", type=float, default=0.25, help="random-erasing probability of the augmented methods")
    ap.add_argument("--teacher", default="resnet", help="the shipped teacher (resnet), a run directory or a checkpoint")
    ap.add_argument("--student", default="tiny_cnn")
    ap.add_argument("--val-split", type=float, default=None, help="hold out this fraction for validation (recipes are chosen on it)")
    ap.add_argument("--set", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="a config override for every distilled method")
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images only (smoke test)")
    args = ap.parse_args()
    args.set = dict(args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion-mnist", train_limit=args.train_limit, val_split=args.val_split)
    teacher = resolve_teacher(args.teacher, data.spec).model
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; expected {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            path = out / f"{method}-seed{seed}-e{args.epochs}{f'-n{args.train_limit}' if args.train_limit else ''}.json"
            if path.is_file():
                results[method].append(json.loads(path.read_text()))
                continue
            r = run_one(method, seed, args, data, teacher)
            path.write_text(json.dumps(r, indent=2) + "\n")
            results[method].append(r)
            val = f", val {100 * r['val_accuracy']:.2f} %" if r["val_accuracy"] is not None else ""
            print(f"{method:<11} seed {seed}: test {100 * r['accuracy']:.2f} %{val}  ({r['seconds']:.0f} s)", flush=True)

    print(f"\n{args.epochs} epochs, seeds {args.seeds}, {args.student} student, teacher {args.teacher}, Fashion-MNIST"
          f"{f', {args.val_split:g} held out for validation' if args.val_split else ''}; test accuracy (validation in brackets)\n")
    _table(methods, seeds, results)
    return 0


def _table(methods: list[str], seeds: list[int], results: dict[str, list[dict]]) -> None:
    def mean_of(method: str, key: str) -> float | None:
        values = [100 * r[key] for r in results.get(method, []) if r.get(key) is not None]
        return statistics.mean(values) if values else None

    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | vs scratch |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for method in methods:
        runs = sorted(results[method], key=lambda r: r["seed"])
        accs = [100 * r["accuracy"] for r in runs]
        cells = [f"{100 * r['accuracy']:.2f}" + (f" ({100 * r['val_accuracy']:.2f})" if r.get("val_accuracy") is not None else "") for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        baseline = "scratch-aug" if ("aug" in method or "views" in method or "step" in method) and "scratch-aug" in results else "scratch"
        base = mean_of(baseline, "accuracy")
        delta = f"{statistics.mean(accs) - base:+.2f} pt" if base is not None and not method.startswith("scratch") else "—"
        print(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(accs):.2f} ± {std:.2f} | {delta} |")


if __name__ == "__main__":
    sys.exit(main())

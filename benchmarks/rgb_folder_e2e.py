"""An RGB JPEG folder end to end through the command line, as a user with a folder of photos runs it (issue 13).

    python benchmarks/rgb_folder_e2e.py [--work DIR] [--train-per-class 500] [--epochs 4]

Builds ``DIR/photos/{train,test}/<class>/*.jpg`` from Fashion-MNIST: every image tinted (a
per-image colour), resized to 36×36 and saved as JPEG (quality 90), so the pixels are RGB,
lossy and not the model's input size. Then, each step a ``kdedge`` command with
``--image-size 32`` (shorter side to 32, center crop 32×32):

1. ``kdedge train`` a ``resnet_cifar`` teacher on the folder;
2. ``kdedge distill`` it into ``mobilenet_v2@0.25`` with ``--val-split 0.1``;
3. ``kdedge export`` the student (ONNX FP32 + INT8, parity-checked on the folder's images);
4. ``kdedge bench`` the student against the teacher;
5. ``kdedge compress-and-export`` (teacher → student → bundle) and ``kdedge verify``;
6. the consumer example (docs/bundle.md, the bundle's predict.py) (Pillow + numpy + onnxruntime, no kdedge) on the test JPEG
   files, whose accuracy must equal the bundle's recommended artifact's.

Prints one line per step with its wall time and the accuracies, and a final table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kdedge.data import load_dataset  # noqa: E402
from kdedge.data.folders import write_image_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_boot")


def build_photos(root: Path, per_class: int, test_per_class: int) -> Path:
    if (root / ".done").is_file():
        return root
    data = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    for split, ds, n in (("train", data.train, per_class), ("test", data.test, test_per_class)):
        labels = ds.labels.numpy()
        keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(10)])
        gray = ds.images[keep][:, 0].numpy()
        tints = rng.uniform(0.4, 1.0, (len(keep), 1, 1, 3))  # one colour per photo
        rgb = (gray[..., None] * tints).round().clip(0, 255).astype(np.uint8)
        rgb = np.stack([np.asarray(Image.fromarray(im).resize((36, 36), Image.Resampling.BICUBIC)) for im in rgb])
        write_image_folder(root, split, rgb, labels[keep], CLASSES, format="jpeg", quality=90)
    (root / ".done").write_text("")
    return root


def kdedge(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdedge", *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kdedge {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout + done.stderr, seconds


def consumer_example() -> str:
    text = (ROOT / "docs" / "bundle.md").read_text()
    after = text.split("<!-- consumer-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)  # type: ignore[union-attr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="kdedge-rgb-")))
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--photos-only", type=Path, metavar="DIR",
                    help="write the photo folder to DIR and stop (the image-folder tutorial's data, for readers without photos of their own)")
    args = ap.parse_args()
    if args.photos_only:
        build_photos(args.photos_only, args.train_per_class, args.test_per_class)
        print(f"wrote {args.photos_only}/train and {args.photos_only}/test: 10 classes of tinted 36x36 JPEGs from Fashion-MNIST")
        return 0
    w = args.work
    photos = build_photos(w / "photos", args.train_per_class, args.test_per_class)
    common = ["--data", str(photos), "--image-size", "32", "--epochs", str(args.epochs)]
    results = {}

    _, t = kdedge("train", *common, "--model", "resnet_cifar", "--lr", "0.1", "--out", str(w / "teacher"))
    teacher_acc = json.loads((w / "teacher" / "metrics.json").read_text())["test"]["accuracy"]
    print(f"1. train teacher resnet_cifar: test acc {teacher_acc:.4f} ({t:.0f} s)", flush=True)

    _, t = kdedge("distill", *common, "--teacher", str(w / "teacher"), "--student", "mobilenet_v2@0.25", "--val-split", "0.1",
                  "--out", str(w / "student"))
    m = json.loads((w / "student" / "metrics.json").read_text())
    print(f"2. distill -> mobilenet_v2@0.25: test acc {m['test']['accuracy']:.4f}, val acc {m['val']['accuracy']:.4f}, "
          f"teacher test {m['teacher']['test']['accuracy']:.4f} ({t:.0f} s)", flush=True)
    results["distill"] = m["test"]["accuracy"]

    out, t = kdedge("export", str(w / "student"), "--out", str(w / "export"))
    exported = json.loads((w / "export" / "export.json").read_text())
    accs = {a["path"]: a["accuracy"]["accuracy"] for a in exported["artifacts"]}
    print(f"3. export: {accs}; preprocessing {json.dumps(exported['preprocessing'])} ({t:.0f} s)", flush=True)

    out, t = kdedge("bench", str(w / "student"), "--teacher", str(w / "teacher"), "--batch-sizes", "1,32", "--min-s", "0.3", "--out", str(w / "bench"))
    report = json.loads((w / "bench" / "report.json").read_text())
    top1 = {(r["role"], r["variant"], r["target"]): r["accuracy"]["top1"] for r in report["rows"] if r["batch"] == 1 and r.get("accuracy")}
    print(f"4. bench: {top1} ({t:.0f} s)", flush=True)

    out, t = kdedge("compress-and-export", *common, "--teacher", str(w / "teacher"), "--student", "mobilenet_v2@0.25", "--val-split", "0.1",
                    "--min-retention", "0.9", "--max-quant-drop", "2", "--out", str(w / "bundle"))
    manifest = json.loads((w / "bundle" / "manifest.json").read_text())
    print(f"5. compress-and-export: student test {manifest['student']['test_accuracy']:.4f}, gates "
          f"{ {k: (round(g['value'], 4), g['passed']) for k, g in manifest['gates'].items()} } ({t:.0f} s)", flush=True)
    kdedge("verify", str(w / "bundle"))
    print("   verify: ok", flush=True)

    files = sorted((photos / "test").rglob("*.jpg"))
    script = w / "classify.py"
    script.write_text(consumer_example())
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-I", str(script), str(w / "bundle"), *map(str, files)], capture_output=True, text=True, check=True)
    predicted = done.stdout.split("\n")[: len(files)]
    truth = [manifest["labels"][CLASSES.index(f.parent.name)] for f in files]
    consumer_acc = float(np.mean([p.strip() == t for p, t in zip(predicted, truth)]))
    rec = manifest["recommended"].get("ort-cpu") or next(iter(manifest["recommended"].values()))
    artifact_acc = next(a["accuracy"] for a in manifest["artifacts"] if a["path"] == rec["artifact"])
    print(f"6. consumer example on {len(files)} JPEG files: accuracy {consumer_acc:.4f}; kdedge measured {artifact_acc:.4f} for {rec['artifact']} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| step | result |\n|---|---|")
    print(f"| teacher resnet_cifar (`kdedge train`) | test acc {teacher_acc:.4f} |")
    print(f"| student mobilenet_v2@0.25 (`kdedge distill --val-split 0.1`) | test acc {results['distill']:.4f} |")
    print(f"| `kdedge compress-and-export` bundle, {rec['artifact']} | kdedge {artifact_acc:.4f}; consumer example on JPEGs {consumer_acc:.4f} |")
    return 0 if abs(consumer_acc - artifact_acc) < 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())

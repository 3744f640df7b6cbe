"""Every tutorial followed as a new user would: its commands and its Python, in order, on small data.

Each page of ``docs/tutorials/`` runs top to bottom in one working directory shared by the
tutorials (as one reader's clone would be): every ```bash block in ``bash -euo pipefail``, every
```python block as a script of its own, and a ```python block after ``<!-- file: NAME -->`` is
written to ``NAME`` (a file the reader saves, which a later command uses). A block after
``<!-- not-run: REASON -->`` is skipped (it needs a GPU, a phone, another machine); every other block runs.
``kdedge``, ``python`` and ``torchrun`` are this interpreter's, as in the clone's ``.venv``.

The pages show the real runs (the whole dataset, 15 to 30 epochs); ``CHEAP`` makes each small with
textual substitutions that must each match exactly once on their page, so an edit of a command
fails here instead of silently running it at full size. A block two tutorials share word for word
(``kdedge distill --epochs 15 --out runs/student``) runs once. After each tutorial, ``CHECKS``
asserts what it says it produced, with numbers that cannot come out right by accident: the
runtime's answers equal PyTorch's, the ONNX teacher scores what its PyTorch original scores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from markdown_blocks import apply_once, code_blocks

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"

_SMALL = "--train-limit 2000 --test-limit 500"
_BUNDLE = "--min-retention 0.01 --max-quant-drop 100 --bench-min-s 0.02 --no-tune-runtime --batch-sizes 1 --parity-samples 200 --calibration-samples 128"
_EXPORT = "--no-evaluate --parity-samples 200 --calibration-samples 128"
_BENCH = "--warmup-iters 1 --min-iters 3 --min-s 0.02 --test-limit 500"

#: tutorial -> [(as the page shows it, what the test runs instead)]
CHEAP: dict[str, list[tuple[str, str]]] = {
    "image-folder": [
        ("--photos-only photos --train-per-class 500 --test-per-class 100", "--photos-only photos --train-per-class 40 --test-per-class 10"),
        ("--epochs 30 --lr 0.1 --out runs/photo-teacher", "--epochs 3 --lr 0.1 --out runs/photo-teacher"),
        ("--student mobilenet_v2@0.25 --epochs 30 --out bundles/photos", f"--student mobilenet_v2@0.25 --epochs 1 {_BUNDLE} --out bundles/photos"),
    ],
    "own-teacher": [
        ('kdedge.load_dataset("fashion-mnist")', 'kdedge.load_dataset("fashion-mnist", train_limit=2000, test_limit=500)'),
        ("kdedge.TrainConfig(epochs=10, lr=0.1)", "kdedge.TrainConfig(epochs=2, lr=0.1)"),
        ("--epochs 15 --out runs/student-mine", f"--epochs 1 {_SMALL} --out runs/student-mine"),
        ("--epochs 15 --out runs/student-from-onnx", f"--epochs 1 {_SMALL} --out runs/student-from-onnx"),
    ],
    "litert": [
        ("kdedge distill --epochs 15 --out runs/student", f"kdedge distill --epochs 1 {_SMALL} --out runs/student"),
        ("--out export/litert", f"{_EXPORT} --out export/litert"),
    ],
    "executorch": [
        ("kdedge distill --epochs 15 --out runs/student", f"kdedge distill --epochs 1 {_SMALL} --out runs/student"),
        ("--out export/et", f"{_EXPORT} --out export/et"),
    ],
    "latency-budget": [
        ("kdedge search --latency-budget 0.02 ", "kdedge search --latency-budget 1.0 --candidates 2 --no-include-zoo --proxy-samples 300 --proxy-epochs 1 "
         f"--generations 1 --children 1 --finalists 1 --epochs 1 {_SMALL} "),
        ("--out runs/search-bench", f"{_BENCH} --out runs/search-bench"),
        ("--epochs 2 --lr 0.005 --out bundles/fast", f"--epochs 1 --lr 0.005 {_SMALL} {_BUNDLE} --out bundles/fast"),
    ],
    "prune": [
        ("kdedge prune resnet --speedup 4 --out runs/pruned", f"kdedge prune resnet --flops-ratio 0.3 --steps 1 --epochs 1 --criterion magnitude --allocation uniform {_SMALL} --out runs/pruned"),
        ("--out runs/pruned-bench", f"{_BENCH} --out runs/pruned-bench"),
        ("--epochs 2 --lr 0.005 --out bundles/pruned", f"--epochs 1 --lr 0.005 {_SMALL} {_BUNDLE} --out bundles/pruned"),
    ],
    "qad": [
        ("kdedge distill --epochs 15 --out runs/student", f"kdedge distill --epochs 1 {_SMALL} --out runs/student"),
        ("--json runs/student-sensitivity.json", "--calibration-samples 128 --json runs/student-sensitivity.json"),
        ("--teacher resnet --out runs/student-qat", f"--teacher resnet --epochs 1 --qat-calibration 128 {_SMALL} --out runs/student-qat"),
        # ONNX Runtime's and OpenVINO's INT8 (the QDQ file); ExecuTorch's and LiteRT's from a QAT model: tests/test_qat.py.
        ("--format onnx-int8,executorch-int8,litert-int8,openvino-int8 --out export/qat", f"--format onnx-int8,openvino-int8 {_EXPORT} --out export/qat"),
        # ONNX INT8 alone: the edge runtimes' INT8 from a QAT model is exported just above, and tests/test_edge.py builds --edge bundles.
        ("kdedge compress-and-export --edge --int8 auto --max-quant-drop 0.5 --out bundles/int8",
         f"kdedge compress-and-export --int8 auto --max-quant-drop 0.5 --epochs 1 --qat-epochs 1 {_SMALL} "
         "--min-retention 0.01 --bench-min-s 0.02 --no-tune-runtime --batch-sizes 1 --parity-samples 200 --calibration-samples 128 --out bundles/int8"),
    ],
    "torchrun": [
        ("--epochs 15 --out runs/ddp", f"--epochs 1 {_SMALL} --out runs/ddp"),
    ],
}


def _steps(name: str) -> list[tuple[int, str, str, str | None]]:
    """``(line, kind, code, file)`` for each block of the tutorial that runs: kind ``bash`` or ``python``; ``file`` for a file to write."""
    steps = []
    for fence, language, code, above in code_blocks(TUTORIALS / f"{name}.md"):
        if above.startswith("<!-- not-run:") or language not in ("bash", "python"):
            assert above.startswith("<!-- not-run:") or language == "text", f"{name}.md:{fence}: a {language or 'bare'} block must be marked not-run"
            continue
        file = re.match(r"<!-- file: (\S+) -->", above)
        steps.append((fence + 1, language, code + "\n", file.group(1) if file else None))
    codes = apply_once([code for _, _, code, _ in steps], CHEAP[name], f"CHEAP[{name!r}] in {Path(__file__).name}")
    codes = [code.replace("python benchmarks/", f"python {ROOT}/benchmarks/") for code in codes]  # run from the clone's root, as the page says
    return [(line, kind, code, file) for (line, kind, _, file), code in zip(steps, codes)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The reader's working directory, shared by the tutorials; the steps already run in it; the files saved in it (name: text)."""
    return tmp_path_factory.mktemp("clone"), set(), {}


def _follow(name: str, clone) -> Path:
    work, done, saved = clone
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    for line, kind, code, file in _steps(name):
        if file:
            (work / file).write_text(code)
            saved[file] = code
            continue
        # The same step, with the same saved files around it, already ran in an earlier tutorial: its output is here.
        key = (code, frozenset(saved.items()))
        if key in done:
            continue
        argv = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        start = time.perf_counter()
        run = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        with open(work / ".seconds", "a") as log:  # what each step costs the suite: `pytest --basetemp DIR`, then DIR/clone*/.seconds
            log.write(f"{time.perf_counter() - start:7.1f} s  {name}.md:{line}  {code.strip().splitlines()[0][:100]}\n")
        assert run.returncode == 0, f"docs/tutorials/{name}.md:{line}: exit {run.returncode}\n{code}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        done.add(key)
        (work / f".out-{name}-{line}").write_text(run.stdout)
    return work


def _student_predictions(run_dir: Path, x: torch.Tensor) -> np.ndarray:
    from kdedge.models import load_checkpoint

    model = load_checkpoint(run_dir / "model.safetensors").model.eval()
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def _normalized(raw: torch.Tensor, spec) -> torch.Tensor:
    mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
    return (raw.float() * spec["scale"] - mean) / std


def _printed(work: Path, name: str) -> list[str]:
    out = sorted(work.glob(f".out-{name}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return out[-1].read_text().strip().splitlines()


# Two files, so the two test processes share the tutorials (about 4 minutes each here); the deploy half is in
# tests/test_tutorials_deploy.py, with a working directory of its own.
OWN_DATA = ["image-folder", "own-teacher", "latency-budget", "torchrun"]
DEPLOY = ["litert", "executorch", "prune", "qad"]


def test_every_tutorial_is_followed():
    pages = sorted(p.stem for p in TUTORIALS.glob("*.md"))
    assert sorted(CHEAP) == pages and sorted(OWN_DATA + DEPLOY) == pages, "a tutorial was added or removed: give it CHEAP substitutions and a group"
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(f"tutorials/{name}.md" in nav for name in pages)


@pytest.mark.slow
@pytest.mark.parametrize("name", OWN_DATA)
def test_tutorial(name, clone):
    follow_and_check(name, clone)


def follow_and_check(name: str, clone) -> None:
    """Run the tutorial ``name`` in ``clone`` and check what it says it made."""
    work = _follow(name, clone)
    if name == "image-folder":
        manifest = json.loads((work / "bundles/photos/manifest.json").read_text())
        rows = (work / "predictions.tsv").read_text().splitlines()
        files = sorted((work / "photos/test").rglob("*.jpg"))
        assert len(rows) == len(files) == 100 and {r.split("\t")[1] for r in rows} <= set(manifest["labels"])
        # predict.py's answers are the bundle's recommended artifact's: its accuracy on the folder is the one kdedge measured
        truth = {str(f.relative_to(work)): f.parent.name for f in files}
        correct = sum(truth[path] == label for path, label, _ in (r.split("\t") for r in rows))
        rec = manifest["recommended"]["ort-cpu"]
        assert abs(correct / len(rows) - rec["accuracy"]) < 1e-9, (correct, rec)
    elif name == "own-teacher":
        mine = json.loads((work / "runs/student-mine/metrics.json").read_text())["teacher"]["test"]["accuracy"]
        onnx = json.loads((work / "runs/student-from-onnx/metrics.json").read_text())["teacher"]["test"]["accuracy"]
        assert mine > 0.4 and abs(mine - onnx) <= 0.002, (mine, onnx)  # the same weights in onnxruntime: the same answers, up to near-ties
    elif name == "litert":
        from PIL import Image

        printed = {line.split()[0]: line for line in _printed(work, "litert")}
        meta = json.loads((work / "export/litert/export.json").read_text())
        raw = torch.from_numpy(np.stack([np.asarray(Image.open(work / f"shot{i}.png")) for i in range(8)]))[:, None]  # (8, 1, 28, 28)
        expected = [meta["data"]["labels"][k] for k in _student_predictions(work / "runs/student", _normalized(raw, meta["preprocessing"]))]
        assert printed["model.tflite"].endswith(str(expected)) and "uint8 float32" in printed["model.tflite"], printed
        assert "uint8 int8" in printed["model.int8.tflite"], printed
    elif name == "executorch":
        import kdedge

        lines = {line.split()[0]: line.split() for line in _printed(work, "executorch")}
        data = kdedge.load_dataset("fashion-mnist", test_limit=64)
        meta = json.loads((work / "export/et/export.json").read_text())
        pred = _student_predictions(work / "runs/student", _normalized(data.test.raw(torch.arange(64)), meta["preprocessing"]))
        assert float(lines["model.pte"][-2]) == pytest.approx(float((pred == data.test.labels.numpy()).mean()), abs=1 / 64 + 1e-9)
        assert abs(float(lines["model.int8.pte"][-2]) - float(lines["model.pte"][-2])) <= 4 / 64, lines
    elif name == "latency-budget":
        record = json.loads((work / "runs/search/search.json").read_text())
        assert record["winner"] and (work / "runs/search/student/model.safetensors").is_file()
        assert json.loads((work / "bundles/fast/manifest.json").read_text())["student"]["model"]["arch"] == record["winner"]
    elif name == "prune":
        from kdedge.models import count_flops, load_checkpoint

        pruned = load_checkpoint(work / "runs/pruned/model.safetensors").model
        teacher = load_checkpoint(ROOT / "kdedge/models/weights/resnet-fashion-mnist.safetensors").model
        assert count_flops(pruned, (1, 28, 28)) <= 0.3 * count_flops(teacher, (1, 28, 28)) * 1.05
        manifest = json.loads((work / "bundles/pruned/manifest.json").read_text())
        assert manifest["student"]["model"]["layers"] and manifest["student"]["flops"] == count_flops(pruned, (1, 28, 28))  # the pruned widths shipped
    elif name == "qad":
        exported = json.loads((work / "export/qat/export.json").read_text())
        assert {a["path"] for a in exported["artifacts"]} == {"model.int8.onnx", "model.int8.xml"}
        assert all(a["parity"]["passed"] for a in exported["artifacts"])
        quant = json.loads((work / "bundles/int8/manifest.json").read_text())["quantization"]
        assert quant["mode"] == "auto" and quant["shipped"] in ("ptq", "qat") and quant["why"]
        ranked = json.loads((work / "runs/student-sensitivity.json").read_text())
        assert ranked
    elif name == "torchrun":
        metrics = json.loads((work / "runs/ddp/metrics.json").read_text())
        assert metrics["test"]["accuracy"] > 0.5

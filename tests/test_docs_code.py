"""The documentation's Python is the API: every ```python block of the docs' guide pages runs, in order, on a small slice of the real data.

The blocks of ``PAGES`` run top to bottom in one namespace, as a reader pastes them into one
notebook: a later block uses what an earlier one defined (``kdedge``, ``data``, ``teacher``,
``student``, from Getting started). They run in a temporary directory, so the paths they write
(``runs/notebook``, ``bundles/nb``, ``export/``, ``bench/``) land there and never in the repository.
The README's one example is Getting started's first block, word for word (checked here), so it runs too.
The tutorials' code runs in ``tests/test_tutorials.py``, each tutorial on its own.

The pages show the real calls (the full dataset, 15 epochs); the test makes them cheap with the
textual substitutions in ``CHEAP``. Each must match exactly once: an edit that changes one of
these calls fails here, loudly, instead of silently running the full-size job (or nothing).

One block is a script of its own, not a notebook cell: the consumer example (after
``<!-- consumer-example -->`` in docs/bundle.md) reads ``sys.argv`` and must run without kdedge installed.
``tests/test_bundle.py::test_bundle_predict_py_runs_without_kdedge`` runs it (the bundle's predict.py) as a separate
process on a real bundle; this test skips it and checks that it is the only one skipped.

Every other code block of every page (and of the README) either runs in a test or carries a
``<!-- not-run: REASON -->`` line right above it saying why it cannot run here;
``test_every_code_block_runs_or_says_why_not`` holds that. ``text`` blocks (a file tree, an output) are not code.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from markdown_blocks import apply_once, code_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# The notebook: these pages' Python blocks, in this order (the site's reading order).
PAGES = ["getting-started.md", "guide/compress-and-export.md", "bundle.md", "guide/export.md", "guide/edge.md", "guide/bench.md",
         "guide/search.md", "guide/prune.md", "guide/qat.md", "design.md"]
TUTORIALS = "tutorials"  # their blocks: tests/test_tutorials.py
NOT_RUN = re.compile(r"^<!-- not-run: (.{20,}) -->$")

# How many ```python blocks PAGES hold, and how many of them this test runs. A new block
# changes these numbers on purpose: add it here (and to CHEAP if it is slow), never let it slip by.
EXPECTED_BLOCKS = 12
EXPECTED_SCRIPTS = 1  # the consumer example, run by tests/test_bundle.py

SCRIPT_MARKER = "<!-- consumer-example -->"

# (as the page shows it, what the test runs instead): the full-size calls made small.
CHEAP = [
    # 2,000 training and 500 test images instead of 60,000 / 10,000.
    ('kdedge.load_dataset("fashion-mnist")', 'kdedge.load_dataset("fashion-mnist", train_limit=2000, test_limit=500)'),
    # One epoch of distillation instead of 15.
    ("kdedge.DistillConfig(epochs=15,", "kdedge.DistillConfig(epochs=1,"),
    # Augmented distillation from 2 stored views per image, one epoch, instead of 10 views and 30 epochs.
    ("kdedge.DistillConfig(epochs=30, views=10,", "kdedge.DistillConfig(epochs=1, views=2,"),
    # The whole pipeline on the same slice, one epoch, a short benchmark; a one-epoch student keeps
    # far less than 98 % of the teacher's accuracy, so the retention gate is lowered to let it publish.
    ('kdedge.CompressConfig(epochs=6, out="bundles/nb")',
     'kdedge.CompressConfig(epochs=1, out="bundles/nb", train_limit=2000, test_limit=500, bench_min_s=0.05, '
     'parity_samples=200, calibration_samples=128, cache="memory", min_retention=0.5, max_quant_drop=5.0, '
     'batch_sizes=(1,), tune_runtime=False)'),
    # A search over 2 sampled candidates and one generation of 1 child, 1-epoch proxy and recipe, instead of 48 + 8x8 and 15 epochs.
    ("kdedge.SearchConfig(latency_budget=0.02)",
     "kdedge.SearchConfig(latency_budget=1.0, candidates=2, include_zoo=False, proxy_samples=300, proxy_epochs=1, generations=1, children=1, "
     "finalists=1, epochs=1)"),
    # Pruning to a FLOPs budget (no timing) in one step of one epoch, one criterion, instead of a measured 4x in 3 steps and 14 epochs.
    ("kdedge.PruneConfig(speedup=4)", 'kdedge.PruneConfig(flops_ratio=0.3, steps=1, epochs=1, criterion="magnitude", allocation="latency")'),
    # Quantization-aware distillation for one epoch, observers calibrated on 128 images, instead of 4 epochs and 1,024.
    ("kdedge.QATConfig(epochs=4)", "kdedge.QATConfig(epochs=1, qat_calibration=128)"),
    # The edge formats the block then runs by hand, without LiteRT's INT8 (its PT2E calibration and conversion; tests/test_edge_tflite.py).
    ('"litert", "litert-int8", "openvino"', '"litert", "openvino"'),
    # The QDQ ONNX file alone (ExecuTorch and LiteRT take the same converted graph; tests/test_qat.py runs them).
    ('formats=("executorch-int8", "litert-int8")', 'formats=("onnx-int8",)'),
    # A short timing policy instead of 10 warm-up calls + 0.2 s and 50 calls + 1 s per row.
    ('kdedge.BenchConfig(targets=("torch-cpu", "ort-cpu"), batch_sizes=(1, 32))',
     'kdedge.BenchConfig(targets=("torch-cpu", "ort-cpu"), batch_sizes=(1, 32), warmup_iters=1, warmup_s=0, min_iters=3, min_s=0.02)'),
]


def _python_blocks() -> list[tuple[Path, int, str, bool]]:
    """``(page, line of the first code line, code, is_script)`` for every ```python block of PAGES, in order."""
    blocks = []
    for name in PAGES:
        text = (DOCS / name).read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, m.start(1)) + 1
            before = text[: m.start()].rstrip()
            blocks.append((DOCS / name, line, m.group(1), before.endswith(SCRIPT_MARKER)))
    return blocks


def _cheap(blocks: list[tuple[Path, int, str, bool]]) -> list[tuple[Path, int, str, bool]]:
    """The blocks with every CHEAP substitution applied; each must match exactly once in all of them."""
    codes = apply_once([code for _, _, code, _ in blocks], CHEAP, f"CHEAP in {Path(__file__).name}")
    return [(page, line, code, script) for (page, line, _, script), code in zip(blocks, codes)]


def test_every_code_block_runs_or_says_why_not():
    pages = sorted(DOCS.rglob("*.md")) + [README]
    notebook = {DOCS / name for name in PAGES}
    unaccounted = []
    for page in pages:
        tutorial = page.parent.name == TUTORIALS
        for line, language, code, above in code_blocks(page):
            marked = bool(NOT_RUN.match(above))
            if tutorial and language in ("bash", "python"):
                continue  # tests/test_tutorials.py runs every one not marked, and checks that it ran them all
            runs = language == "python" and (page in notebook or page == README)  # the README's: test_readme_example_is_...
            if language == "text" or runs:
                assert not marked, f"{page.relative_to(ROOT)}:{line}: runs in a test, yet is marked not-run"
            elif not marked:
                unaccounted.append(f"{page.relative_to(ROOT)}:{line} ({language or 'no language'})")
    assert not unaccounted, "code blocks that no test runs and no '<!-- not-run: REASON -->' line explains: " + ", ".join(unaccounted)


def test_readme_example_is_getting_started_s_first_block():
    readme = [code for _, language, code, _ in code_blocks(README) if language == "python"]
    first = [code for _, language, code, _ in code_blocks(DOCS / "getting-started.md") if language == "python"][0]
    assert readme == [first], "the README's Python example must be Getting started's first block, word for word (so the notebook runs it)"


def test_every_python_block_is_run_or_named_as_a_script():
    blocks = _python_blocks()
    scripts = [code for _, _, code, script in blocks if script]
    assert (len(blocks), len(scripts)) == (EXPECTED_BLOCKS, EXPECTED_SCRIPTS), "a Python block was added to or removed from PAGES: update this test"
    assert "sys.argv" in scripts[0]
    # The skipped script is run elsewhere, by the test that reads it after the same marker.
    test_bundle = (Path(__file__).parent / "test_bundle.py").read_text()
    assert "def test_bundle_predict_py_runs_without_kdedge(" in test_bundle and SCRIPT_MARKER in test_bundle
    # Only the marked script may read the command line; every other block is a notebook cell.
    assert not [line for _, line, code, script in blocks if not script and "sys.argv" in code]
    _cheap(blocks)  # every substitution still applies


@pytest.mark.edge("executorch", "litert", "openvino", "ort")  # the "Edge runtimes" block runs each artifact in its runtime
@pytest.mark.slow
def test_docs_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran, skipped = [], []
    for page, line, code, script in _cheap(_python_blocks()):
        if script:
            skipped.append(line)
            continue
        # Blank lines in front make a traceback name the page's own line numbers.
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compiled, namespace)
        ran.append((line, stdout.getvalue()))
    assert (len(ran), len(skipped)) == (EXPECTED_BLOCKS - EXPECTED_SCRIPTS, EXPECTED_SCRIPTS)

    # What the blocks print and write is what the pages say they do (a run may log progress
    # lines first; a block's own print is its last line).
    api, bundle, export, edge, bench, searched, decided, pruned, qat, kept, viewed = (out.strip().splitlines()[-1] if out.strip() else "" for _, out in ran)
    # Sensitivity: every convolution and linear layer of the student ranked, and the most sensitive one float in the INT8 file.
    from kdedge.sensitivity import quantizable_layers

    ranked = ast.literal_eval(ran[9][1].strip().splitlines()[-2])
    assert sorted(layer for layer, _ in ranked) == sorted(quantizable_layers(namespace["student"])) and ast.literal_eval(kept) == [ranked[0][0]], kept
    # Quantization-aware: the fake-quantized student's accuracy, and its two INT8 artifacts scored in their runtimes; then the
    # export of both together: FP32 from the student (no drop), INT8 from the QAT model with its drop against that FP32 file.
    qat_acc, shipped = ran[8][1].strip().splitlines()[-2].split(" ", 1)
    assert 0.3 < float(qat_acc) <= 1 and set(ast.literal_eval(shipped)) == {"model.int8.onnx"}, qat
    both = ast.literal_eval(qat)
    assert set(both) == {"model.onnx", "model.int8.onnx"} and both["model.onnx"] is None and abs(both["model.int8.onnx"]) < 50, qat
    # The decision over the searched student: its FP32 and INT8 LiteRT files, each with a verdict.
    assert "('fp32', " in decided and "('int8', " in decided and decided.count("'shipped'") <= 1, decided
    # The pruned teacher: its name carries the digest of its kept widths, and the FLOPs budget was met.
    assert pruned.startswith("resnet-pruned-") and "'met': True" in pruned and " magnitude " in pruned, pruned
    student_acc, student_f1, teacher_acc = (float(v) for v in api.split())
    assert 0.5 < student_acc < teacher_acc and 0.5 < student_f1 < 1 and teacher_acc > 0.9  # one epoch on 2,000 images vs the shipped teacher
    assert (tmp_path / "runs/notebook/model.safetensors").is_file()
    manifest = json.loads((tmp_path / "bundles/nb/manifest.json").read_text())
    assert manifest["data"]["test_samples"] == 500 and "ort-cpu" in manifest["recommended"]
    assert all(gate["passed"] for gate in manifest["gates"].values()) and "'ort-cpu'" in bundle
    int8 = ast.literal_eval(export)
    assert 0.5 < int8["accuracy"] <= 1 and "drop_vs_fp32_pt" in int8 and (tmp_path / "export/model.int8.onnx").is_file()
    # Each artifact run by its runtime alone gives onnxruntime's FP32 logits (the edge page's claim: below 1e-4).
    alone = ast.literal_eval(edge)
    assert set(alone) == {"executorch", "litert", "openvino", "ort", "litert-pixels"} and max(alone.values()) < 1e-4
    assert {p.name for p in (tmp_path / "export-edge").iterdir()} >= {"model.pte", "model.tflite", "model.xml", "model.bin", "model.ort"}
    report = json.loads((tmp_path / "bench/report.json").read_text())
    assert {(r["model"], r["target"]) for r in report["rows"]} == {(m, t) for m in ("resnet", "tiny_cnn") for t in ("torch-cpu", "ort-cpu")}
    assert bench == ""  # the bench block prints nothing; it writes bench/
    winner, test_acc, p50 = searched.split()
    assert winner.startswith("net:") and 0 < float(test_acc) <= 1 and 0 < float(p50) <= 1.0  # a searched student within the 1 ms budget
    assert (tmp_path / "runs/search/student/model.safetensors").is_file() and (tmp_path / "runs/search/search.json").is_file()
    views = ast.literal_eval(viewed)  # 2 stored views per image (the cheap run), in the runtime the teacher pass chose
    assert views["views"] == 2 and views["runtime"] in ("onnxruntime", "torch") and views["bytes"] == 2000 * 2 * (7 + 10) * 2

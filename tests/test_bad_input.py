"""The bad-input table of docs/troubleshooting.md, row by row: each input gives its one line and its exit code.

The table in docs/troubleshooting.md (between the ``bad-input-table`` markers) and ``CASES`` below must list
the same rows; a test checks that, so a row cannot be documented without being tested.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_idx_dir
from kdedge.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"  # the page that holds the table


def _tiny(tmp: Path) -> str:
    return str(make_idx_dir(tmp / "data", n_train=64, n_test=16))


def _truncated_idx(tmp: Path) -> list[str]:
    root = make_idx_dir(tmp / "data", compress=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    return ["train", "--data", str(root), "--out", str(tmp / "r")]


def _pickled_npz(tmp: Path) -> list[str]:
    np.savez(tmp / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    return ["train", "--data", str(tmp / "d.npz"), "--out", str(tmp / "r")]


def _yaml(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return ["distill", "--config", str(tmp / "c.yaml"), "--out", str(tmp / "r")]
    return make


def _out_exists(tmp: Path) -> list[str]:
    (tmp / "r").mkdir()
    return ["train", "--data", _tiny(tmp), "--out", str(tmp / "r")]


def _unfinished(tmp: Path) -> list[str]:
    (tmp / "r.partial").mkdir()
    (tmp / "r.partial" / "checkpoint.pt").write_bytes(b"")
    return ["train", "--data", _tiny(tmp), "--out", str(tmp / "r")]


def _resume_changed(tmp: Path) -> list[str]:
    data = _tiny(tmp)
    args = ["train", "--data", data, "--out", str(tmp / "r"), "--epochs", "2", "--batch-size", "16", "--quiet"]
    import kdedge.runs

    original = kdedge.runs.write_run
    kdedge.runs.write_run = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # die after the last checkpoint
    try:
        assert main(args) == 130
    finally:
        kdedge.runs.write_run = original
    return [*args[:-1], "--batch-size", "32", "--resume"]  # (lr may change on resume: the way on after a divergence)


def _out_claimed(tmp: Path) -> list[str]:
    from kdedge._fs import claim_out

    _HELD.append(claim_out(tmp / "r", "train"))  # as another live process would hold it (released at the end of the session)
    return ["train", "--data", _tiny(tmp), "--out", str(tmp / "r")]


_HELD: list = []


def _bad_checkpoint(tmp: Path) -> list[str]:
    (tmp / "r.partial").mkdir()
    (tmp / "r.partial" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    return ["train", "--data", _tiny(tmp), "--out", str(tmp / "r"), "--resume"]


def _factory_file(tmp: Path) -> list[str]:
    (tmp / "nets.py").write_text("def make(num_classes, input_shape):\n    raise ValueError('width must be even')\n")
    return ["distill", "--data", _tiny(tmp), "--teacher", f"{tmp / 'nets.py'}:make", "--out", str(tmp / "r")]


def _code_checkpoint(tmp: Path) -> list[str]:
    from kdedge.data import load_dataset
    from kdedge.models import ModelSpec, save_checkpoint

    (tmp / "evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
                                 "def make(num_classes, input_shape):\n    raise AssertionError('never called')\n")
    data = _tiny(tmp)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    save_checkpoint(tmp / "model.safetensors", model, ModelSpec(f"{tmp}/evil.py:make", 1.0, 3, (1, 8, 8)), load_dataset(data).spec)
    return ["export", str(tmp / "model.safetensors"), "--data", data, "--out", str(tmp / "r")]


def _onnx_teacher_wrong_input(tmp: Path) -> list[str]:
    from kdedge.exporters import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    export_onnx(model, tmp / "t.onnx", input_shape=(1, 28, 28))
    return ["distill", "--data", _tiny(tmp), "--teacher", str(tmp / "t.onnx"), "--out", str(tmp / "r")]


def _bundle_with_flipped_byte(tmp: Path) -> list[str]:
    b = tmp / "bundle"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"\x00" * 8)
    manifest = {"schema": 1, "artifacts": [], "files": [{"path": "model.onnx", "bytes": 8, "sha256": "0" * 64}]}
    (b / "manifest.json").write_text(json.dumps(manifest))
    return ["verify", str(b)]


def _bundle_with_extra_file(tmp: Path) -> list[str]:
    import hashlib

    b = tmp / "bundle"
    (b / "models").mkdir(parents=True)
    (b / "config.yaml").write_text("epochs: 1\n")
    manifest = {"schema": 1, "artifacts": [], "files": [{"path": "config.yaml", "bytes": 10, "sha256": hashlib.sha256(b"epochs: 1\n").hexdigest()}]}
    (b / "manifest.json").write_text(json.dumps(manifest))
    (b / "models" / "evil.py").write_text("import os\n")
    return ["verify", str(b)]


def _archive_with_link(tmp: Path) -> list[str]:
    info = tarfile.TarInfo("bundle/model.onnx")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(tmp / "b.tar.gz", "w:gz") as tar:
        tar.addfile(info)
    return ["verify", str(tmp / "b.tar.gz")]


def _pixels_teacher(tmp: Path) -> list[str]:
    """The shipped teacher behind a pixels/255 input contract, given no --teacher-mean/--teacher-std."""
    (tmp / "nets.py").write_text(
        "from kdedge.models import load_checkpoint, pretrained_path\n"
        "import torch\n\n"
        "class Pixels(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.inner = load_checkpoint(pretrained_path('resnet', 1.0, 'fashion-mnist')).model\n\n"
        "    def forward(self, x):\n"
        "        return self.inner((x - 0.2860) / 0.3530)\n\n"
        "def make():\n"
        "    return Pixels()\n"
    )
    return ["distill", "--teacher", f"{tmp}/nets.py:make", "--train-limit", "200", "--test-limit", "500", "--quiet", "--out", str(tmp / "r")]


def _unexportable_student(tmp: Path) -> list[str]:
    (tmp / "nets.py").write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, 10)\n\n"
        "    def forward(self, x):\n"
        "        y = self.fc(x.flatten(1))\n"
        "        return y if y.sum() > 0 else -y\n\n"
        "def make():\n"
        "    return Branchy()\n"
    )
    return ["compress-and-export", "--student", f"{tmp}/nets.py:make", "--train-limit", "200", "--test-limit", "100", "--quiet", "--out", str(tmp / "r")]


#: table row input -> (build argv in tmp, fragment of the one-line message, exit code)
def _folder(problem: str) -> Callable[[Path], list[str]]:
    """An image folder (2 classes, 8×8 PNGs) with one ``problem``, trained on from the command line."""
    def make(tmp: Path) -> list[str]:
        from PIL import Image

        from kdedge.data.folders import write_image_folder

        root = tmp / "photos"
        img = np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)
        for split in ("train", "test"):
            write_image_folder(root, split, np.stack([img] * 4), np.array([0, 0, 1, 1]), ("p", "q"))
        if problem == "empty":
            (root / "train" / "r").mkdir()
        elif problem == "text":
            (root / "train" / "p" / "notes.txt").write_text("hi")
        elif problem == "header":
            (root / "train" / "p" / "fake.png").write_bytes(b"this is not a png")
        elif problem == "truncated":
            f = root / "train" / "q" / "3.png"
            f.write_bytes(f.read_bytes()[:60])
        elif problem == "sizes":
            Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "train" / "q" / "big.png")
        elif problem == "val":
            write_image_folder(root, "val", img[None], np.array([0]), ("d_extra",))
        return ["train", "--data", str(root), "--epochs", "1", "--workers", "0", "--out", str(tmp / "r")]
    return make


def _ambiguous_npz(tmp: Path) -> list[str]:
    np.savez(tmp / "d.npz", x=np.zeros((10, 3, 7, 4), np.uint8), y=np.arange(10) % 2)
    return ["train", "--data", str(tmp / "d.npz"), "--out", str(tmp / "r")]


def _float_npz_uint8_input(tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    np.savez(tmp / "f.npz", x_train=rng.random((40, 1, 28, 28), np.float32), y_train=np.arange(40) % 10,
             x_test=rng.random((20, 1, 28, 28), np.float32), y_test=np.arange(20) % 10)
    return ["compress-and-export", "--data", str(tmp / "f.npz"), "--input-format", "uint8-nhwc", "--out", str(tmp / "r")]


def _net_file(tmp: Path, body: str) -> str:
    (tmp / "nets.py").write_text("from torch import nn\n\ndef make(num_classes, input_shape):\n    return " + body + "\n")
    return f"{tmp / 'nets.py'}:make"


def _prune_groupnorm(tmp: Path) -> list[str]:
    ref = _net_file(tmp, "nn.Sequential(nn.Conv2d(input_shape[0], 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3), "
                         "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))")
    return ["prune", ref, "--data", _tiny(tmp), "--flops-ratio", "0.5", "--quiet", "--out", str(tmp / "r")]


def _prune_unreachable(tmp: Path) -> list[str]:
    ref = _net_file(tmp, "nn.Sequential(nn.Conv2d(input_shape[0], 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
                         "nn.Linear(16, num_classes))")
    return ["prune", ref, "--data", _tiny(tmp), "--flops-ratio", "0.01", "--quiet", "--out", str(tmp / "r")]


def _prune_nothing(tmp: Path) -> list[str]:
    ref = _net_file(tmp, "nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))")
    return ["prune", ref, "--data", _tiny(tmp), "--flops-ratio", "0.5", "--quiet", "--out", str(tmp / "r")]


def _prune_resume_unpruned(tmp: Path) -> list[str]:
    from kdedge.models import ModelSpec, create_model, save_checkpoint
    from kdedge.pruning.run import STATE_FILE

    (tmp / "r.partial").mkdir()
    save_checkpoint(tmp / "r.partial" / STATE_FILE, create_model(ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8))), ModelSpec("tiny_cnn", 1.0, 3, (1, 8, 8)))
    ref = _net_file(tmp, "nn.Sequential(nn.Conv2d(input_shape[0], 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))")
    return ["prune", ref, "--data", _tiny(tmp), "--flops-ratio", "0.5", "--resume", "--quiet", "--out", str(tmp / "r")]


CASES: dict[str, tuple[Callable[[Path], list[str]], str, int]] = {
    "unknown dataset name": (lambda t: ["train", "--data", "fashion-mnsit", "--out", str(t / "r")], "unknown dataset 'fashion-mnsit'", 2),
    "truncated or corrupt IDX file": (_truncated_idx, "truncated: header says shape", 2),
    ".npz holding pickled objects": (_pickled_npz, "not a readable .npz archive", 2),
    "image folder with an empty class folder": (_folder("empty"), "train/r: empty class folder; put its images in it or remove the folder", 2),
    "file in an image folder that is not an image": (_folder("text"), "notes.txt: not an image file (expected .jpg, .jpeg, .png, .webp, .bmp); move it out of", 2),
    "image whose header cannot be read": (_folder("header"), "fake.png: cannot be read as an image", 2),
    "truncated image (header intact)": (_folder("truncated"), "3.png: cannot be decoded (OSError: image file is truncated", 2),
    "images of mixed sizes without `--image-size`": (_folder("sizes"), "pass --image-size N to resize the shorter side to N and center-crop N×N", 2),
    "`val/` (or `test/`) class folder missing from `train/`": (_folder("val"), "has class folder(s) d_extra that train/ lacks", 2),
    "array shape that reads as NCHW and as NHWC": (_ambiguous_npz, "could be (N, C, H, W) or (N, H, W, C); pass --layout NCHW or --layout NHWC", 2),
    "config key that does not exist": (_yaml("epocs: 3\n"), "unknown key(s) epocs", 2),
    "config file that is not YAML": (_yaml("epochs: [3\n"), "not valid YAML at line", 2),
    "value out of range": (lambda t: ["train", "--epochs", "0", "--out", str(t / "r")], "epochs must be >= 1, got 0", 2),
    "value of the wrong type": (_yaml("epochs: ten\n"), "epochs must be an integer, got 'ten'", 2),
    "`kdedge search` without `--latency-budget`": (lambda t: ["search", "--out", str(t / "s")],
                                                 "latency_budget must be a positive number of milliseconds (e.g. --latency-budget 0.02), got None", 2),
    "`kdedge search --target-precision` the target does not time": (
        lambda t: ["search", "--latency-budget", "0.05", "--target", "torch-cpu", "--target-precision", "int8", "--out", str(t / "s")],
        "target_precision int8 is not timed on torch-cpu, which times fp32; int8 is timed on ort-cpu, executorch-cpu", 2),
    "`kdedge compress-and-export --latency-budget` whose target the formats leave out": (
        lambda t: ["compress-and-export", "--latency-budget", "0.02", "--target", "litert-cpu", "--formats", "onnx,onnx-int8", "--out", str(t / "b")],
        "--target litert-cpu: the decision ships its litert or litert-int8 file, and --formats lacks litert, litert-int8; add it to --formats", 2),
    "searched architecture name with a bad block": (lambda t: ["distill", "--student", "net:c16k4s2-fc", "--out", str(t / "r")],
                                                    "architecture 'net:c16k4s2-fc': 'c16k4s2': channels must be 1..2048, kernel 1, 3, 5 or 7, stride 1 or 2", 2),
    "`--out` that already exists": (_out_exists, "already exists; pass another --out or remove it", 2),
    "`--out` whose last run was killed, without `--resume`": (_unfinished, "holds the checkpoint of an unfinished run; continue it with --resume", 2),
    "`--out` another run is writing now": (_out_claimed, "another kdedge process is writing", 2),
    "`--resume` with changed settings": (_resume_changed, "the config differs from the checkpoint's (batch_size: 16 -> 32)", 2),
    "`--resume` with a damaged checkpoint": (_bad_checkpoint, "is not a readable kdedge checkpoint", 2),
    "`--precision fp16` without a GPU": (lambda t: ["train", "--data", _tiny(t), "--device", "cpu", "--precision", "fp16", "--out", str(t / "r")],
                                         "fp16 needs a CUDA device", 2),
    "factory module that cannot be imported": (lambda t: ["distill", "--data", _tiny(t), "--teacher", "no_such_pkg.nets:make", "--out", str(t / "r")],
                                               "no module named 'no_such_pkg'", 2),
    "factory that raises": (_factory_file, "the factory raised ValueError: width must be even", 2),
    "checkpoint whose architecture is code, without `--trust-code`": (_code_checkpoint, "would import and run that code. If you trust it, pass --trust-code", 2),
    "hooked layer that does not exist": (lambda t: ["distill", "--train-limit", "64", "--test-limit", "16", "--loss", "fitnets", "--student-layer", "features.99",
                                                    "--teacher-layer", "stages.1", "--quiet", "--out", str(t / "r")], "no layer named 'features.99'", 2),
    "ONNX teacher whose input does not fit the data": (_onnx_teacher_wrong_input, "but the data's samples are (1, 8, 8)", 2),
    "teacher fed another normalization than it was trained on": (_pixels_teacher, "near chance (0.1", 2),
    "training that diverges": (lambda t: ["train", "--model", "mlp", "--lr", "50", "--train-limit", "2000", "--test-limit", "500", "--quiet",
                                          "--out", str(t / "r")], "training diverged at epoch 1: the training loss is", 2),
    "a student that cannot be exported (checked before training)": (_unexportable_student, "cannot export Branchy to ONNX", 2),
    "bundle file whose bytes changed": (_bundle_with_flipped_byte, "model.onnx: sha256 mismatch", 2),
    "bundle archive with a link or `..` path": (_archive_with_link, "refusing archive member 'bundle/model.onnx' (symbolic link)", 2),
    "bundle with a file its manifest does not list": (_bundle_with_extra_file, "models/evil.py: not in the manifest", 2),
    "`kdedge prune` without a budget": (lambda t: ["prune", "resnet", "--out", str(t / "r")], "give exactly one budget: speedup", 2),
    "a layer the pruner cannot handle": (_prune_groupnorm, "layer '1' (GroupNorm) would be narrowed with '0'", 2),
    "a pruning budget no step can reach": (_prune_unreachable, "the budget cannot be reached: it asks for", 2),
    "a model with nothing to prune": (_prune_nothing, "the model has nothing to prune", 2),
    "`kdedge prune --resume` from a checkpoint that is not a pruned one": (_prune_resume_unpruned, "is not a pruned checkpoint from a kdedge prune step", 2),
    "`kdedge distill --qat` without a trained FP32 student": (lambda t: ["distill", "--qat", "--out", str(t / "r")],
                                                            "quantization-aware training fine-tunes a trained FP32 student: give its run directory", 2),
    "`--int8 qat` with no INT8 format": (lambda t: ["compress-and-export", "--int8", "qat", "--formats", "onnx", "--out", str(t / "b")],
                                         "int8 qat trains the INT8 student, but formats (onnx) hold no INT8 format", 2),
    "`--keep-float` naming no layer of the model": (lambda t: ["export", "resnet", "--keep-float", "layer9", "--out", str(t / "r")],
                                                    "--keep-float 'layer9' is not a layer of ResNet; expected a module name holding a convolution", 2),
    "`--input-format uint8-*` for data stored as floats": (_float_npz_uint8_input, "input format uint8-nhwc takes 8-bit pixels, but data", 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_row(name, tmp_path, capsys):
    build, fragment, code = CASES[name]
    argv = build(tmp_path)
    existed = (tmp_path / "r").exists()
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdedge: error: "), err
    assert fragment in lines[0], lines[0]
    assert (tmp_path / "r").exists() == existed  # never a half-written output


def _readme_rows() -> list[tuple[str, str, int]]:
    text = PAGE.read_text()
    block = re.search(r"<!-- bad-input-table -->(.*?)<!-- /bad-input-table -->", text, re.S)
    assert block, "docs/troubleshooting.md lacks the bad-input table markers"
    rows = []
    for line in block.group(1).strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], cells[1].strip("`"), int(cells[2])))
    return rows


def test_docs_table_lists_exactly_the_tested_rows():
    rows = _readme_rows()
    assert [r[0] for r in rows] == list(CASES)
    for name, message, code in rows:
        assert CASES[name][1] in message, (name, message)
        assert CASES[name][2] == code, name

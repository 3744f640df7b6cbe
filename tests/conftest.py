"""Shared fixtures. Tiny models are defined here; real data comes from the built-in dataset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.data import find_builtin, write_idx

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in several processes (pytest-xdist): each gets its share of the cores for its compute
    # threads, and so do the kdedge processes its tests start (OMP_NUM_THREADS is inherited), instead of every process
    # spinning up one thread per core on a machine they share.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


#: Fixtures that build something end to end (a whole bundle, the shipped teacher in every edge runtime): a test that uses one,
#: directly or through another fixture, is `slow` — `make test` runs it, `make test-fast` leaves it out.
_SLOW_FIXTURES = frozenset({"edge_teacher", "edge_bundle", "bundle"})


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu`, `tensorrt` or `edge(FORMAT, ...)` skip, with the reason, where the hardware or library is absent;
    tests on a slow fixture are marked `slow`."""
    from kdedge.exporters.edge import edge_unavailable

    has_cuda = torch.cuda.is_available()
    has_trt = _importable("tensorrt")
    require_edge = os.environ.get("KDEDGE_REQUIRE_EDGE") == "1"  # `make test` installs them: a missing one must fail, not skip
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        edge = item.get_closest_marker("edge")
        missing = [why for fmt in (edge.args if edge else ()) if (why := edge_unavailable(fmt))]
        if missing and not require_edge:
            item.add_marker(pytest.mark.skip(reason="; ".join(missing)))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (pip install 'kdedge-distill[tensorrt]')" if not has_trt else "needs a CUDA GPU"))
        elif "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    # The longest files first (a stable sort: each file's own order is kept). `make test` hands whole files to its worker
    # processes in this order (--dist loadscope --no-loadscope-reorder; xdist would otherwise order them by test count, and
    # the README's 2-test, 2-minute file ran last), so no worker is left alone with a long file at the end. The seconds per
    # file are the suite's own, recorded by `make test-durations`; a file not in the record counts 20 s per slow test.
    recorded = _recorded_durations()
    slow: dict[str, float] = {}
    for item in items:
        slow[_file(item.nodeid)] = slow.get(_file(item.nodeid), 0.0) + 20.0 * bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -recorded.get(_file(item.nodeid), slow[_file(item.nodeid)]))


DURATIONS = os.path.join(os.path.dirname(__file__), "durations.json")


def _file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _recorded_durations() -> dict[str, float]:
    import json

    try:
        with open(DURATIONS) as f:
            return {k: float(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Seconds per file (setup, call and teardown), gathered where every report arrives (the controller under xdist)."""
    if os.environ.get("KDEDGE_RECORD_DURATIONS") == "1" and not report.skipped:
        _measured[_file(report.nodeid)] = _measured.get(_file(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    """`make test-durations`: write the seconds per file the scheduling above reads (not from a worker: each saw only its share)."""
    import json

    whole = exitstatus == 0 and not session.config.option.keyword and not session.config.option.markexpr  # a partial run: partial times
    if os.environ.get("KDEDGE_RECORD_DURATIONS") == "1" and not hasattr(session.config, "workerinput") and _measured and whole:
        from pathlib import Path

        from kdedge._fs import atomic_file

        root = os.path.dirname(os.path.dirname(DURATIONS))
        kept = {k: v for k, v in _recorded_durations().items() if os.path.exists(os.path.join(root, k))}  # files this run did not measure stay
        with atomic_file(Path(DURATIONS)) as tmp:  # a collecting run never reads half a file
            tmp.write_text(json.dumps({k: round(v, 1) for k, v in sorted((kept | _measured).items())}, indent=1) + "\n")


# A small but real bundle build: 2,000 training and 500 test images, 1 epoch, a short benchmark, gates a 1-epoch student passes.
SMALL_BUNDLE = {"train_limit": 2000, "test_limit": 500, "epochs": 1, "batch_sizes": [1, 8], "bench_min_s": 0.05, "parity_samples": 200,
                "calibration_samples": 128, "cache": "memory", "min_retention": 0.5, "max_quant_drop": 3.0}

# Where the real Fashion-MNIST lives before the tests re-point the cache (it may be in the cache).
_FMNIST_DIR = find_builtin("fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own kdedge cache (logit files) so tests never see each other's."""
    monkeypatch.setenv("KDEDGE_CACHE", str(tmp_path_factory.mktemp("kdedge-cache")))
    if _FMNIST_DIR is not None and "KDEDGE_DATA" not in os.environ:
        monkeypatch.setenv("KDEDGE_DATA", str(_FMNIST_DIR.parent))


@pytest.fixture(scope="session")
def fmnist():
    """The real Fashion-MNIST (installed by `make test`)."""
    from kdedge.data import load_dataset

    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def edge_teacher(tmp_path_factory, fmnist):
    """What every edge format's tests start from: the shipped teacher, its parity reference in onnxruntime, 1,000 test images.

    ``onnx`` is the teacher's FP32 ONNX (with kdedge metadata), ``onnx_int8`` its static QDQ INT8
    (calibrated on the first 256 of ``calibration``); ``reference`` and ``int8_reference`` are
    onnxruntime's logits of each on ``x``. Built once per session for the four format test files.
    """
    from types import SimpleNamespace

    from kdedge.exporters import export_onnx, onnx_metadata, quantize_int8
    from kdedge.models.zoo import load_checkpoint, pretrained_path
    from kdedge.ort import ort_predict, ort_session

    root = tmp_path_factory.mktemp("edge-teacher")
    ck = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist"))
    model = ck.model.eval()
    meta = onnx_metadata(fmnist.spec, model_name=ck.spec.name, source_sha256=None)
    calibration = fmnist.train.inputs(slice(0, 512)).numpy()
    export_onnx(model, root / "model.onnx", input_shape=(1, 28, 28), metadata=meta)
    quantize_int8(root / "model.onnx", root / "model.int8.onnx", calibration=calibration[:256])
    x, labels = fmnist.test.inputs(slice(0, 1000)).numpy(), fmnist.test.labels[:1000].numpy()
    return SimpleNamespace(model=model, meta=meta, calibration=calibration, x=x, labels=labels, onnx=root / "model.onnx",
                           onnx_int8=root / "model.int8.onnx", reference=ort_predict(ort_session(root / "model.onnx"), x),
                           int8_reference=ort_predict(ort_session(root / "model.int8.onnx"), x))


class _DataDependent(nn.Module):
    """A branch on the input's values (Python control flow on a tensor): torch.export, and so every exporter, refuses it."""

    def __init__(self, in_features: int = 784, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, classes)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y if float(y.sum()) > 0 else -y


class TinyNet(nn.Module):
    """A 1x8x8 -> K classifier small enough to train in milliseconds."""

    def __init__(self, num_classes: int = 3, channels: int = 1, size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_idx_dir(path, *, n_train=60, n_test=20, size=8, classes=3, seed=0, compress=True, names=None):
    """Write a small MNIST-style dataset with a learnable signal (class = brightest band)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    names = names or {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, classes, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        band = size // classes
        for i, c in enumerate(y):
            x[i, c * band:(c + 1) * band] += 150
        write_idx(path / (names[f"{split}_images"] + suffix), x, compress=compress)
        write_idx(path / (names[f"{split}_labels"] + suffix), y, compress=compress)
    return path

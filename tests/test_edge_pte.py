"""ExecuTorch (``.pte``, XNNPACK): the shipped teacher exported from PyTorch, run on 1,000 real test images.

The reference is onnxruntime on the teacher's FP32 ONNX export. Tolerances: FP32 max |Δ| <= 1e-3
and 100 % argmax agreement, run by ExecuTorch's own runtime API alone; kdedge's session equals
that runtime to 1e-6; INT8 >= 97 % argmax agreement with FP32 and accuracy within 1.5 pt of it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.errors import ExportError
from kdedge.exporters.edge import edge_predict, export_edge, load_edge, sidecar_path
from kdedge.exporters.pte import Session, read_metadata

pytestmark = pytest.mark.edge("executorch")  # skipped without the runtime, unless KDEDGE_REQUIRE_EDGE=1 (tests/conftest.py)

N = 1000


@pytest.fixture(scope="module")
def teacher_pte(tmp_path_factory, edge_teacher):
    """The teacher as FP32 and INT8 programs, its ONNX export, and onnxruntime's FP32 logits on 1,000 test images."""
    t = edge_teacher
    root = tmp_path_factory.mktemp("executorch")
    art = {}
    for precision in ("fp32", "int8"):
        path = root / f"model.{precision}.pte"
        details = export_edge("executorch", out=path, precision=precision, model=t.model, input_shape=(1, 28, 28),
                              calibration=t.calibration, metadata=t.meta, max_batch=256)
        print(f"\n{path.name}: exported in {details['seconds']:.1f} s, batch {details['batch']}")
        art[precision] = {"path": path, "details": details}
    return art, t.meta, t.x, t.labels, t.reference, root


def _raw_logits(path, x, *, batch=250):
    """ExecuTorch's runtime API alone, as a deployment outside kdedge would call it."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return np.concatenate([method.execute([torch.from_numpy(x[i : i + batch])])[0].numpy() for i in range(0, len(x), batch)])


def test_fp32_program_alone_matches_onnxruntime_on_1000_images(teacher_pte):
    art, _, x, _, reference, _ = teacher_pte
    logits = _raw_logits(art["fp32"]["path"], x)
    diff = float(np.abs(logits - reference).max())
    print(f"\nExecuTorch FP32 vs onnxruntime FP32 on {N} images: max |Δ| = {diff:.2e}")
    assert diff <= 1e-3
    assert (logits.argmax(1) == reference.argmax(1)).mean() == 1.0
    details = art["fp32"]["details"]
    assert details["batch"] == {"min": 1, "max": 256} and details["quantization"] is None
    assert not [op for op in details["outside_delegate"] if op.startswith("aten.") and op != "aten.sym_size.int"]  # all compute in XNNPACK


def test_session_matches_raw_runtime_at_batch_1_and_32_with_one_thread(teacher_pte):
    art, _, x, _, _, _ = teacher_pte
    session = load_edge("executorch", art["fp32"]["path"], threads=1)
    assert isinstance(session, Session)
    assert session.threads == 1 and session.fixed_batch is None and session.max_batch == 256
    assert session.runtime.startswith("executorch ") and session.runtime.endswith(" XNNPACK")
    raw = _raw_logits(art["fp32"]["path"], x[:32], batch=32)  # loaded after the session set the pool: see pte._Pool
    np.testing.assert_allclose(session.run(x[:32]), raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([session.run(x[i : i + 1]) for i in range(4)]), raw[:4], rtol=0, atol=1e-6)
    np.testing.assert_allclose(edge_predict(session, x[:300], batch_size=256), _raw_logits(art["fp32"]["path"], x[:300]), rtol=0, atol=1e-6)
    infer = session.prepare(x[:1])
    infer()
    other = Session(art["fp32"]["path"], threads=2)  # replaces the process-wide pool the first session's method was loaded under
    assert other.threads == 2
    infer()  # rebinds under the new pool instead of calling into the destroyed one
    np.testing.assert_allclose(session.run(x[:8]), raw[:8], rtol=0, atol=1e-6)
    assert session.threads == 1
    np.testing.assert_allclose(other.run(x[:8]), raw[:8], rtol=0, atol=1e-6)


def test_int8_program_keeps_accuracy_on_1000_images(teacher_pte):
    art, _, x, labels, reference, _ = teacher_pte
    details = art["int8"]["details"]
    assert details["quantization"]["weights"] == "int8 symmetric per output channel" and details["quantization"]["calibration_samples"] == 512
    assert art["int8"]["path"].stat().st_size < 0.35 * art["fp32"]["path"].stat().st_size  # int8 weights in the program
    logits = edge_predict(load_edge("executorch", art["int8"]["path"]), x)
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    accuracy, fp32_accuracy = float((logits.argmax(1) == labels).mean()), float((reference.argmax(1) == labels).mean())
    print(f"\nExecuTorch INT8: {agreement:.1%} argmax agreement with FP32, accuracy {accuracy:.1%} (FP32 {fp32_accuracy:.1%})")
    assert agreement >= 0.97
    assert accuracy >= fp32_accuracy - 0.015


def test_metadata_round_trips_through_the_sidecar(teacher_pte):
    art, meta, _, _, _, root = teacher_pte
    for precision, a in art.items():
        assert read_metadata(a["path"]) == meta | {"kdedge.precision": precision}
        doc = json.loads(sidecar_path(a["path"]).read_text())
        assert doc["format"] == "executorch" and doc["batch"] == {"min": 1, "max": 256}
        assert doc["kdedge.input"]["shape"] == ["batch", 1, 28, 28]  # stored as JSON, not as a string
    assert sorted(p.name for p in root.iterdir() if "pte" in p.name) == ["model.fp32.pte", "model.fp32.pte.json", "model.int8.pte",
                                                                         "model.int8.pte.json"]  # no leftovers


@pytest.mark.parametrize("damage", ["truncated", "onnx renamed"])
def test_bad_program_is_one_line_export_error(teacher_pte, edge_teacher, tmp_path, damage):
    art, _, _, _, _, _ = teacher_pte
    data = art["fp32"]["path"].read_bytes()
    bad = tmp_path / "model.pte"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else edge_teacher.onnx.read_bytes())
    with pytest.raises(ExportError) as info:
        Session(bad)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(bad) in message and "not a loadable ExecuTorch program" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no runtime traceback behind it


def test_untraceable_model_is_one_line_export_error(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):  # data-dependent control flow: torch.export cannot trace it
            return x.flatten(1)[:, :10] if x.sum() > 0 else -x.flatten(1)[:, :10]

    with pytest.raises(ExportError) as info:
        export_edge("executorch", out=tmp_path / "m.pte", precision="fp32", model=Branchy(), input_shape=(1, 4, 4), metadata={})
    assert len(str(info.value).splitlines()) == 1 and "cannot export Branchy to ExecuTorch" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_importing_the_backend_loads_no_runtime():
    code = "import sys, kdedge.exporters.pte; print(sorted({'executorch', 'torchao'} & {m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(torch.nn.functional.interpolate(self.conv(x), scale_factor=2, mode="bilinear").flatten(1))


def test_a_program_without_upsampling_is_lowered_without_the_bilinear_patterns_to_the_same_file(tmp_path):
    """kdedge spares XNNPACK's bilinear pattern graphs (5 s per process) where nothing can match them: the .pte is byte for byte
    the file the lowering with them writes, and a model that upsamples still gets them."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d

    from conftest import TinyNet

    def lower(model, name):
        torch.manual_seed(0)
        export_edge("executorch", out=tmp_path / name, precision="fp32", model=model.eval(), input_shape=(1, 8, 8), metadata={}, max_batch=8)
        return (tmp_path / name).read_bytes()

    torch.manual_seed(0)
    tiny, upsampling = TinyNet(), _Upsampling()
    bilinear_2d._get_bilinear_2d_graphs.cache_clear()
    without = lower(tiny, "without.pte")
    assert bilinear_2d._get_bilinear_2d_graphs.cache_info().currsize == 0  # never built
    lower(upsampling, "upsampling.pte")
    assert bilinear_2d._get_bilinear_2d_graphs.cache_info().currsize == 1  # built: they may match this one
    assert lower(tiny, "with.pte") == without


def test_the_quantizer_pattern_exports_are_kept_and_the_int8_file_is_the_same(tmp_path, monkeypatch):
    """XNNPACKQuantizer exports its conv+BatchNorm patterns on every annotate (6 s); kdedge keeps them once per process. The
    INT8 .pte is byte for byte the file made with a fresh export of every pattern."""
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    from conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    calibration = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)

    def lower(name):
        torch.manual_seed(0)
        export_edge("executorch", out=tmp_path / name, precision="int8", model=model, input_shape=(1, 8, 8), calibration=calibration,
                    metadata={}, max_batch=8)
        return (tmp_path / name).read_bytes()

    kept = lower("kept.pte")
    assert xnnpack_quantizer_utils._get_aten_graph_module_for_pattern is not pt2e_utils._get_aten_graph_module_for_pattern  # cached
    monkeypatch.setattr(xnnpack_quantizer_utils, "_get_aten_graph_module_for_pattern", pt2e_utils._get_aten_graph_module_for_pattern)
    assert lower("fresh.pte") == kept

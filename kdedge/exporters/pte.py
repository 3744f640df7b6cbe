"""ExecuTorch ``.pte`` programs with the XNNPACK delegate (``executorch`` extra).

The program is lowered from the PyTorch module with a dynamic batch dimension
(``torch.export.Dim("batch", min=1, max=max_batch)``). ExecuTorch plans memory for the largest
batch, so one program runs every batch from 1 to ``max_batch`` and refuses larger ones; the
planned maximum is read back from the program and recorded in the sidecar ``model.pte.json``
with the input contract (a ``.pte`` has no metadata of its own).

INT8 goes through ExecuTorch's own quantizer: ``XNNPACKQuantizer`` with torchao's PT2E
``prepare_pt2e``/``convert_pt2e``, calibrated on real training inputs — int8 weights symmetric per
output channel, int8 activations per tensor with static scales (histogram observer). The
quantized graph is lowered to XNNPACK like the FP32 one.

The runtime's thread pool is process-wide: a session opened with ``threads`` replaces it through
the private ``_unsafe_reset_threadpool`` of ExecuTorch's Python bindings (there is no public
setting). A method loaded before such a reset must not run again (it would call into the destroyed
pool), so sessions reload their method when the pool changed since their load (see :class:`_Pool`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdedge._fs import atomic_write_bytes
from kdedge.data.pixels import PixelInput, artifact_input, example_input, inner_model
from kdedge.errors import ExportError
from kdedge.exporters._native import attach_native_log, cause, last_native_line, quiet, version_of
from kdedge.exporters.edge import int8_scheme, read_sidecar, sidecar_batch, write_sidecar
from kdedge.models.qat import QATModel

__all__ = ["Session", "export", "read_metadata"]

_METHOD = "forward"
# torch.export specializes a dimension of size 1, and ExecuTorch bounds the batch by what the export
# proved: the fake conv kernel guards on batch >= 16 (its backend choice), so an example below 16
# would cap the program at batch 15. 32 keeps the whole range 1..max_batch.
_EXAMPLE_BATCH = 32
# Loggers that report the internals of torchao, torch.export and the lowering passes at WARNING.
_NOISY = ("torchao", "torch.utils._pytree", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "executorch")


def export(*, out: Path, precision: str, model: nn.Module | None, onnx: Path | None, input_shape: tuple[int, ...],
           calibration: np.ndarray | None, metadata: dict[str, str], max_batch: int, keep_float: tuple[str, ...] = (),
           per_channel: bool = True) -> dict[str, Any]:
    """Lower ``model`` (eval, CPU) to an ExecuTorch program at ``out``; see :func:`kdedge.exporters.edge.export_edge`.

    Returns:
        ``details``: converter version, delegate, batch contract, quantization scheme, seconds.

    Raises:
        ExportError: The model cannot be exported or lowered (its arguments are checked by ``export_edge``).
    """
    del onnx  # made from the PyTorch module
    start = time.perf_counter()
    native: list[str] = []
    try:
        with quiet(native, _NOISY):
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            program = _exported(model, tuple(input_shape), precision, calibration, max_batch, keep_float, per_channel)
            with _without_bilinear_patterns(program):
                lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
            buffer = lowered.buffer
    except Exception as exc:  # torch.export, the quantizer and the XNNPACK passes raise many types; all mean "cannot lower"
        attach_native_log(exc, native)
        raise ExportError(f"cannot export {type(model).__name__} to ExecuTorch ({cause(exc)}); the model must be traceable by "
                          "torch.export with ops XNNPACK supports (kdedge --debug shows where it failed)") from exc
    planned = _planned_batch(buffer)  # what the memory plan holds (max_batch unless the export narrowed it)
    batch = {"fixed": planned} if max_batch == 1 else {"min": 1, "max": planned}
    outside = sorted({_op_name(n.target) for n in lowered.exported_program().graph.nodes if n.op == "call_function"}
                     - {"torch.ops.higher_order.executorch_call_delegate", "_operator.getitem"})  # ops ExecuTorch runs itself
    details: dict[str, Any] = {
        "converter": f"executorch {version_of('executorch')}", "delegate": "XnnpackPartitioner", "outside_delegate": outside, "batch": batch,
        "quantization": (inner_model(model).quantization() if hasattr(inner_model(model), "quantization") else
                         int8_scheme("XNNPACKQuantizer (torchao pt2e)", per_channel) | {"calibration_samples": len(calibration)}  # type: ignore[arg-type]
                         | ({"float_layers": list(keep_float)} if keep_float else {}))
        if precision == "int8" and (calibration is not None or hasattr(inner_model(model), "quantization")) else None,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out), buffer)
    write_sidecar(Path(out), metadata | {"kdedge.precision": precision}, format="executorch", precision=precision, **details)
    details["seconds"] = round(time.perf_counter() - start, 3)  # in export.json only: the sidecar is reproducible bit for bit
    return details


def _exported(model: nn.Module, input_shape: tuple[int, ...], precision: str, calibration: np.ndarray | None,
              max_batch: int, keep_float: tuple[str, ...] = (), per_channel: bool = True) -> torch.export.ExportedProgram:
    """``model`` as an ExportedProgram with a dynamic batch (static when ``max_batch`` is 1), quantized for INT8."""
    example = (example_input(model, min(_EXAMPLE_BATCH, max_batch), input_shape),)  # uint8 for a model with its preprocessing in the graph
    dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if max_batch > 1 else None
    with torch.no_grad():
        inner = inner_model(model)
        if precision == "int8" and isinstance(inner, QATModel):  # quantization-aware: its own Q/DQ graph, the scales training used
            graph = inner.converted()
            return torch.export.export(model.around(graph) if isinstance(model, PixelInput) else graph, example, dynamic_shapes=dynamic)
        program = torch.export.export(model, example, dynamic_shapes=dynamic)
        if precision == "int8":
            assert calibration is not None
            quantized = _quantized(program.module(), calibration, batch=min(64, max_batch), keep_float=keep_float, per_channel=per_channel,
                                   inside="model" if isinstance(model, PixelInput) else None)  # in-graph preprocessing stays float
            program = torch.export.export(quantized, example, dynamic_shapes=dynamic)
    return program


@contextlib.contextmanager
def _without_bilinear_patterns(program: torch.export.ExportedProgram) -> Iterator[None]:
    """XNNPACK's lowering looks for decomposed bilinear upsampling with pattern graphs it builds by exporting and lowering
    four small modules: 5 s, once per process (measured). A program with no upsampling node has nothing they can match,
    so the pass gets no patterns and rewrites nothing, as it would have; the .pte is the same file
    (tests/test_edge_pte.py). If ExecuTorch's layout differs, nothing is patched."""
    try:
        from executorch.backends.xnnpack.partition.graphs import bilinear_2d
    except ImportError:
        yield
        return
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]  # submodules of higher-order ops too
    upsamples = any(n.op == "call_function" and "upsample" in str(n.target) for g in graphs for n in g.nodes)
    cache_info = getattr(getattr(bilinear_2d, "_get_bilinear_2d_graphs", None), "cache_info", None)
    if upsamples or not hasattr(bilinear_2d, "get_graphs_dict") or cache_info is None or cache_info().currsize:
        yield  # they may match, or are built already (or ExecuTorch builds them otherwise): nothing to save
        return
    original = bilinear_2d.get_graphs_dict
    bilinear_2d.get_graphs_dict = lambda: {}
    try:
        yield
    finally:
        bilinear_2d.get_graphs_dict = original


def _quantized(graph: torch.fx.GraphModule, calibration: np.ndarray, *, batch: int, keep_float: tuple[str, ...] = (),
               inside: str | None = None, per_channel: bool = True) -> torch.fx.GraphModule:
    """PT2E static INT8: observers from ``XNNPACKQuantizer``, fed ``calibration`` ``(N, C, H, W)``, folded to Q/DQ; ``keep_float`` layers
    (and with ``inside``, every operation outside that submodule: see :func:`~kdedge.models.float_layers.keep_float_quantizer`) stay float."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from kdedge.models.float_layers import keep_float_quantizer
    from kdedge.models.qat import pt2e_quantizer

    quantizer = pt2e_quantizer("xnnpack", per_channel=per_channel)
    prepared = prepare_pt2e(graph, keep_float_quantizer(quantizer, keep_float, inside=inside))
    inputs = torch.from_numpy(np.ascontiguousarray(calibration))  # float32, or uint8 pixels for a model that takes them
    for chunk in inputs.split(batch):
        prepared(chunk)
    return convert_pt2e(prepared)


def _op_name(target: Any) -> str:
    """``aten.sym_size.int`` for an ATen op, ``module.function`` for ExecuTorch's own (its memory ``view``)."""
    if isinstance(target, torch._ops.OpOverload) or not hasattr(target, "__name__"):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{target.__name__}".lstrip(".")


def _planned_batch(buffer: bytes) -> int:
    """The largest batch the program's memory plan holds (the input's planned leading size)."""
    with quiet([], _NOISY):
        from executorch.runtime import Runtime

        meta = Runtime.get().load_program(buffer).metadata(_METHOD)
    return int(meta.input_tensor_meta(0).sizes()[0])


class _Pool:
    """ExecuTorch's thread pool, one per process, and how often kdedge has replaced it.

    A loaded method keeps a pointer to the pool it was loaded under, and ``_unsafe_reset_threadpool``
    destroys that pool: a method loaded before a reset crashes or hangs on its next call (seen as a
    glibc mutex assertion). So the pool is only reset before a load, and every session reloads
    its method when the generation moved since its own load.
    """

    generation = 0


class Session:
    """A ``.pte`` program opened in ExecuTorch's runtime (XNNPACK), as an :class:`~kdedge.exporters.edge.EdgeSession`.

    Args:
        path: The program.
        threads: XNNPACK's thread count (None: the pool as it is, by default one thread per
            performance core). ExecuTorch has one thread pool per process: a session asking for
            another count replaces it (through the private ``_unsafe_reset_threadpool``), and every
            session then reloads its method before its next call. ``threads`` reports the count a
            session's method was loaded with.

    Raises:
        ExportError: The file is missing, truncated, corrupt or not an ExecuTorch program.
    """

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ExecuTorch program")
        if threads is not None and threads < 1:
            raise ExportError(f"threads must be at least 1, got {threads}")
        self._wanted = threads
        self._load()
        self.runtime = f"executorch {version_of('executorch')} XNNPACK"
        meta = self._method.metadata.input_tensor_meta(0)
        planned = int(meta.sizes()[0])
        # c10::ScalarType: 0 Byte (uint8 pixels, the preprocessing in the graph), else the float32 input kdedge exports
        self._dtype = np.dtype(np.uint8 if int(meta.dtype()) == 0 else np.float32)
        batch = sidecar_batch(self.path)
        self.fixed_batch: int | None = batch.get("fixed")
        self.max_batch: int | None = batch.get("max", planned) if self.fixed_batch is None else self.fixed_batch

    def _load(self) -> None:
        """(Re)load the method under the current pool, replacing the pool first when this session wants another size."""
        native: list[str] = []
        try:
            with quiet(native, _NOISY):
                from executorch.extension.pybindings import portable_lib
                from executorch.runtime import Runtime

                if self._wanted is not None and portable_lib._threadpool_get_thread_count() != self._wanted:
                    portable_lib._unsafe_reset_threadpool(int(self._wanted))
                    _Pool.generation += 1
                self._program = Runtime.get().load_program(self.path)
                self._method = self._program.load_method(_METHOD)
        except (RuntimeError, ValueError) as exc:  # the bindings raise a hex code; the reason is in the native log
            reason = last_native_line(native) or cause(exc)
            raise ExportError(f"{self.path}: not a loadable ExecuTorch program ({reason}); re-export it with kdedge export") from None
        self._generation = _Pool.generation
        self.threads: int | None = int(portable_lib._threadpool_get_thread_count())

    def _current(self) -> Any:
        """The method, reloaded when another session replaced the thread pool since it was loaded."""
        if self._generation != _Pool.generation or (self._wanted is not None and self.threads != self._wanted):
            self._load()
        return self._method

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, K)`` for ``x`` ``(B, ...)`` (float32, or uint8 pixels), ``B`` within the batch contract."""
        (logits,) = self._current().execute([torch.from_numpy(artifact_input(x, self._dtype, self.path.name))])
        return logits.numpy()

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """One inference per call on ``x``, already copied into the program's planned input (no per-call copies)."""
        tensor = torch.from_numpy(artifact_input(x, self._dtype, self.path.name))
        if not hasattr(getattr(self._current(), "_method", None), "set_inputs"):  # the bindings' ExecuTorchMethod is private
            return lambda: self._current().execute([tensor])
        bound = {"generation": -1, "execute": None}

        def bind() -> None:
            raw = self._current()._method
            raw.set_inputs([tensor])
            bound.update(generation=self._generation, execute=raw.execute)

        def infer() -> None:
            if bound["generation"] != _Pool.generation:  # another session replaced the pool: rebind under the new one
                bind()
            bound["execute"]()

        bind()
        return infer


def read_metadata(path: Path) -> dict[str, str]:
    """The ``kdedge.*`` strings of a program, from its sidecar (``{}`` when it has none)."""
    return read_sidecar(Path(path))

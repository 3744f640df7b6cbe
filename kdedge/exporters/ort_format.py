"""ONNX Runtime's ORT format (``model.ort``) and the operator list of a reduced onnxruntime build.

The ORT format is the flatbuffer that onnxruntime's minimal (mobile, embedded) builds load instead
of ONNX protobuf. onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``)
makes it from the parity-checked ONNX artifact of the same precision, and writes beside it
``<stem>.required_operators.config``: the operators (per domain and opset) to pass to
``build.sh --minimal_build --include_ops_by_config`` so the build contains exactly those kernels.

The optimization style is ``Fixed``: the converter runs onnxruntime's graph optimizations (level
``all``, the NCHWc layout left out so the file runs on any CPU) once and saves the optimized graph,
so a minimal build, which cannot optimize, runs the same fused graph (``FusedConv``, and
``QLinearConv`` for INT8) that a full onnxruntime runs from the ONNX file. ``Runtime`` style is
meant for compiling execution providers (NNAPI, CoreML) and replays its optimizations only with a
session option that must be trusted; on the CPU provider it buys nothing.

The ONNX ``metadata_props`` (the ``kdedge.*`` input contract) survive the conversion: an
``InferenceSession`` on the ``.ort`` file reads them from ``get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kdedge.errors import ConfigError, ExportError
from kdedge.exporters._native import first_line
from kdedge.data.pixels import artifact_input

__all__ = ["CONFIG_SUFFIX", "Session", "config_path", "export", "read_metadata"]

#: ``model.ort`` -> ``model.required_operators.config``.
CONFIG_SUFFIX = ".required_operators.config"
_LEVEL_VARIABLE = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"  # the converter's own knob (default: all)


def config_path(path: Path) -> Path:
    """The required-operators config beside an ORT artifact: ``model.int8.ort`` -> ``model.int8.required_operators.config``."""
    path = Path(path)
    return path.with_name(path.stem + CONFIG_SUFFIX)


def export(*, out: Path, precision: str, model: nn.Module | None, onnx: Path | None, input_shape: tuple[int, ...],
           calibration: np.ndarray | None, metadata: dict[str, str], max_batch: int, keep_float: tuple[str, ...] = (),
           per_channel: bool = True) -> dict[str, Any]:
    """Convert ``onnx`` (``model.onnx``, or the QDQ ``model.int8.onnx``) to ``out`` and :func:`config_path` of it.

    Only ``out``, ``onnx`` and ``metadata`` are used: the ORT file is the ONNX artifact's graph
    (optimized), INT8 comes from its Q/DQ scales and its batch dimension stays as it was.

    Returns:
        The artifact's details: converter and settings, the required-operators file and the
        operators it lists, seconds.

    Raises:
        ExportError: onnxruntime's converter fails on it (the arguments are checked by ``export_edge``).
    """
    del precision, model, input_shape, calibration, max_batch, keep_float, per_channel  # the QDQ file has them already
    from kdedge.ort import onnxruntime

    version = onnxruntime().__version__
    out, onnx = Path(out), Path(onnx)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        source = work / "onnx" / f"{out.stem}.onnx"  # the converter names what it writes after its input
        _with_metadata(onnx, source, metadata)
        converted = _convert(source, work / "ort", onnx, version)
        operators = _write_config(converted[1], config_path(out), out.name)
        os.replace(converted[0], out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "converter": f"onnxruntime {version}: onnxruntime.tools.convert_onnx_models_to_ort", "source": onnx.name,
        "optimization_style": "Fixed", "optimization_level": os.getenv(_LEVEL_VARIABLE, "all"), "layout": "portable (NCHWc not applied)",
        "required_operators": config_path(out).name, "operators": operators,
        "loads_with": f"onnxruntime >= {version}, full or minimal build (--minimal_build --include_ops_by_config {config_path(out).name})",
        "seconds": {"convert": round(time.perf_counter() - start, 3)},
    }


def _with_metadata(onnx: Path, dest: Path, metadata: dict[str, str]) -> None:
    """``onnx`` written to ``dest`` as one file with ``metadata`` in its ``metadata_props`` (the ORT file keeps them)."""
    import onnx as onnx_lib

    from kdedge.exporters.onnx import set_metadata

    try:
        proto = onnx_lib.load(str(onnx))
    except Exception as exc:  # protobuf DecodeError, OSError, missing external data
        raise ExportError(f"cannot read {onnx} as ONNX ({type(exc).__name__}: {first_line(exc)}); convert the ONNX artifact kdedge exported") from exc
    set_metadata(proto, metadata)
    dest.parent.mkdir(parents=True)
    onnx_lib.save_model(proto, str(dest))


def _convert(source: Path, out_dir: Path, onnx: Path, version: str) -> tuple[Path, Path]:
    """onnxruntime's converter, in process, on ``source`` (a copy of ``onnx``); the ``.ort`` file and config it wrote in ``out_dir``."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress line per step
            from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

            tool = logging.getLogger("ort_format_model.utils")  # logs "Created config in <path>" at INFO
            level = tool.level
            tool.setLevel(logging.WARNING)
            try:
                convert_onnx_models_to_ort(source, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
            finally:
                tool.setLevel(level)
    except Exception as exc:  # onnxruntime's Fail/InvalidGraph/NotImplemented, the tool's ValueError
        cause = first_line(exc).replace(str(source), str(onnx))  # the copy is gone; name the user's file
        raise ExportError(f"onnxruntime {version} cannot convert {onnx.name} to the ORT format ({cause}); "
                          f"check that {onnx.name} runs in onnxruntime, or leave ort out of the export formats") from exc
    finally:
        root.handlers[:] = handlers  # importing the tool calls logging.basicConfig, which would print every later log record
    orts, configs = sorted(out_dir.glob("*.ort")), sorted(out_dir.glob("*.config"))
    if len(orts) != 1 or len(configs) != 1:
        raise ExportError(f"onnxruntime {version}'s converter wrote {[p.name for p in orts + configs]} for {onnx.name}; "
                          "expected one .ort file and one .config (is this onnxruntime's converter changed?)")
    return orts[0], configs[0]


def _write_config(produced: Path, dest: Path, artifact: str) -> dict[str, dict[str, int]]:
    """The converter's config at ``dest``, naming ``artifact`` instead of a temporary path; ``{domain: {operator: opset}}``."""
    lines, operators = [], {}
    for line in produced.read_text().splitlines():
        if line.startswith("# - "):  # "# - /tmp/.../model.ort": the models it was generated from
            line = f"# - {artifact}"
        elif line.strip() and not line.startswith("#"):  # "ai.onnx;11;Conv,MaxPool"
            domain, opset, ops = line.split(";", 2)
            for op in ops.split(","):
                operators.setdefault(domain, {})[op.strip()] = int(opset)
        lines.append(line)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {domain: dict(sorted(ops.items())) for domain, ops in sorted(operators.items())}


def _load(path: Path, threads: int | None, **options: str):
    """An ``InferenceSession`` on an ORT format file; ExportError naming the file when it is not one onnxruntime can load."""
    from kdedge.ort import ort_session, ort_version

    if path.suffix != ".ort":
        raise ExportError(f"{path}: an ORT format artifact ends in .ort (onnxruntime tells the formats apart by the suffix); rename or re-export it")
    if not path.is_file():
        raise ExportError(f"{path}: no such ORT format file; export it first (kdedge export --format ort)")
    try:
        return ort_session(path, threads=threads, **options)
    except ExportError as exc:
        raise ExportError(f"{path}: onnxruntime {ort_version()} cannot load it as an ORT format model ({first_line(exc.__cause__ or exc)}); "
                          "is it truncated or corrupt, or written by a newer onnxruntime? export it again") from exc


class Session:
    """An ORT format file in onnxruntime's CPU execution provider (:func:`kdedge.ort.ort_session`)."""

    max_batch: int | None = None

    def __init__(self, path: Path, *, threads: int | None = None, optimization: str = "all", execution_mode: str = "sequential") -> None:
        from kdedge.ort import fixed_batch, input_dtype, ort_version

        self.path, self.threads = Path(path), threads or None
        self.session = _load(self.path, threads, optimization=optimization, execution_mode=execution_mode)
        self.runtime = f"onnxruntime {ort_version()} ORT format"
        self.fixed_batch: int | None = fixed_batch(self.session)
        inp = self.session.get_inputs()[0]
        self._name, self._sample = inp.name, tuple(d if isinstance(d, int) else None for d in inp.shape[1:])
        self._dtype = input_dtype(self.session)  # float32, or uint8 for a model with its preprocessing in the graph

    def _feed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = artifact_input(x, self._dtype, self.path.name)
        if x.ndim != 1 + len(self._sample) or any(s is not None and s != n for s, n in zip(self._sample, x.shape[1:])):
            raise ConfigError(f"{self.path.name} takes inputs (batch, {', '.join(str(s or '?') for s in self._sample)}) "
                              f"{np.dtype(self._dtype).name}; got {tuple(x.shape)}")
        return {self._name: x}

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, K)`` for ``x`` ``(B, C, H, W)``."""
        return np.asarray(self.session.run(None, self._feed(x))[0], dtype=np.float32)

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """``session.run`` with the feed built once: the call the ``ort-cpu`` target times, so the two compare like for like."""
        feed, run = self._feed(x), self.session.run
        return lambda: run(None, feed)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``kdedge.*`` strings of the ORT file's metadata (copied from the ONNX ``metadata_props``)."""
    meta = _load(Path(path), 1).get_modelmeta().custom_metadata_map
    return {key: value for key, value in meta.items() if key.startswith("kdedge.")}

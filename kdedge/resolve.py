"""From what a user names (``--teacher``, ``--student``, ``--model``) to a model that fits the data.

A reference is a zoo name (``tiny_cnn@0.5``), ``auto`` (the largest zoo student within a FLOPs
budget), a factory (``package.module:factory``, ``file.py:factory``), a run directory, a
``.safetensors`` checkpoint or, for teachers, an ``.onnx`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdedge.data.normalization import Normalization
from kdedge.data.spec import DatasetSpec
from kdedge.errors import ConfigError, DataError, ModelError
from kdedge.models.byo import is_factory_ref
from kdedge.models.zoo import (
    MODELS,
    TEACHERS,
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    parse_model_name,
    pretrained_path,
)

__all__ = ["ResolvedTeacher", "auto_student", "check_fits", "check_same_input", "resolve_student", "resolve_teacher"]


@dataclass
class ResolvedTeacher:
    """A teacher and what is known about it.

    Attributes:
        model: The teacher module (an ``OnnxTeacherModule`` for an ``.onnx`` file).
        spec: Its model spec (``arch`` ``onnx`` for ONNX files, the factory reference for factories).
        name: A description for logs and manifests.
        input: The input normalization it was trained with, when its file records one (a kdedge
            checkpoint's dataset spec, a kdedge ONNX file's ``kdedge.preprocessing``); None otherwise.
        path: The ONNX file, for a teacher that runs in onnxruntime.
    """

    model: nn.Module
    spec: ModelSpec
    name: str
    input: Normalization | None = None
    path: Path | None = None

    @property
    def is_onnx(self) -> bool:
        return self.path is not None and self.path.suffix == ".onnx"


def check_fits(what: str, spec: ModelSpec, data: DatasetSpec) -> None:
    """DataError unless ``spec``'s classes and input shape are ``data``'s."""
    if spec.num_classes != data.num_classes or tuple(spec.input_shape) != tuple(data.input_shape):
        raise DataError(
            f"{what} expects {spec.num_classes} classes and inputs {tuple(spec.input_shape)}, but data {data.name!r} has "
            f"{data.num_classes} classes and inputs {tuple(data.input_shape)}; use a {what} trained on this data"
        )


def resolve_teacher(ref: str, data: DatasetSpec, *, weights: str | None = None,
                    trust_code: bool = False) -> ResolvedTeacher:
    """A teacher from a run directory, a ``.safetensors`` checkpoint, an ``.onnx`` file, a shipped zoo
    name, or a factory (``package.module:factory``, ``file.py:factory``) with ``weights``.

    A kdedge checkpoint or ONNX file also says how its inputs were normalized
    (:attr:`ResolvedTeacher.input`); a factory's teacher is assumed to take the data's inputs
    unless ``--teacher-mean``/``--teacher-std`` say otherwise.
    """
    path = Path(ref).expanduser()
    if not path.exists() and is_factory_ref(ref):
        spec = ModelSpec(ref, 1.0, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
        model = create_model(spec)
        if weights:
            load_weights(model, weights)
        return ResolvedTeacher(model, spec, ref + (f" ({weights})" if weights else ""))
    if weights:
        raise ConfigError(f"--teacher-weights applies to a factory teacher (module:factory); {ref} already carries its weights")
    if path.is_file() and path.suffix == ".onnx":
        from kdedge.models.onnx_teacher import OnnxTeacherModule

        module = OnnxTeacherModule(path, input_shape=tuple(data.input_shape), num_classes=data.num_classes)
        spec = ModelSpec("onnx", 1.0, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
        return ResolvedTeacher(module, spec, str(path), input=_onnx_input(module, path, data), path=path)
    if path.exists():
        ckpt = load_checkpoint(path, trust_code=trust_code)
        check_fits(f"teacher {ref}", ckpt.spec, data)
        return ResolvedTeacher(ckpt.model, ckpt.spec, str(ckpt.path), input=_spec_input(ckpt.data, data, ref))
    arch, width = parse_model_name(ref)
    shipped = pretrained_path(arch, width, data.name)
    if shipped is None:
        raise ModelError(
            f"kdedge ships no {ref} weights for {data.name!r}; pass a run directory or checkpoint as --teacher "
            f"(train one with: kdedge train --model {ref} --data {data.name} --out DIR)"
        )
    ckpt = load_checkpoint(shipped)
    check_fits(f"teacher {ref}", ckpt.spec, data)
    return ResolvedTeacher(ckpt.model, ckpt.spec, f"{ref} (shipped, {data.name})", input=_spec_input(ckpt.data, data, ref))


def _known_scale(scale: float | None, recorded_on: str | None, data: DatasetSpec, what: str) -> float | None:
    """A recorded pixel scale, or — when the file predates recording it — the data's, if it is the same dataset."""
    if scale is not None:
        return scale
    if recorded_on == data.name:
        return data.scale  # the same data, stored the same way
    raise ConfigError(f"{what} was written before kdedge recorded pixel scales and was trained on {recorded_on!r}, not {data.name!r}, so how to "
                      "feed it these pixels is unknown; declare its normalization with --teacher-mean/--teacher-std")


def _spec_input(spec: DatasetSpec | None, data: DatasetSpec, ref: str) -> Normalization | None:
    """The normalization a kdedge checkpoint's dataset spec records (None when it records no dataset)."""
    if spec is None:
        return None
    return Normalization(tuple(spec.mean), tuple(spec.std), _known_scale(spec.scale, spec.name, data, f"teacher {ref}"))


#: kdedge versions whose ONNX metadata wrote scale 1/255 whatever the data was (issue 12, item 3).
_SCALE_UNRELIABLE_BEFORE = (0, 2, 0)


def _onnx_input(module: nn.Module, path: Path, data: DatasetSpec) -> Normalization | None:
    """The normalization a kdedge-exported ONNX file declares in ``kdedge.preprocessing``; None for other files."""
    meta = module.session.get_modelmeta().custom_metadata_map
    try:
        pre = json.loads(meta.get("kdedge.preprocessing", "null"))
        if not pre:
            return None
        version = tuple(int(v) for v in meta.get("kdedge.version", "0.0.0").split(".")[:3])
        scale = float(pre["scale"]) if version >= _SCALE_UNRELIABLE_BEFORE else None
        mean, std = tuple(map(float, pre["mean"])), tuple(map(float, pre["std"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path.name}: its kdedge.preprocessing metadata is not readable; fix or remove it, or pass --teacher-mean/--teacher-std") from exc
    return Normalization(mean, std, _known_scale(scale, meta.get("kdedge.dataset"), data, path.name))


def auto_student(data: DatasetSpec, flops_budget: float) -> tuple[ModelSpec, int]:
    """The zoo student with the most FLOPs per sample within ``flops_budget`` (widths 0.25..2).

    The zoo's teacher architectures (:data:`~kdedge.models.zoo.TEACHERS`) are not candidates.
    """
    best: tuple[int, int, ModelSpec] | None = None
    for arch in sorted(MODELS.keys() - TEACHERS):
        for width in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
            spec = ModelSpec(arch, width, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
            model = create_model(spec)
            flops, params = count_flops(model, spec.input_shape), count_parameters(model)
            if flops <= flops_budget and (best is None or (flops, params) > best[:2]):
                best = (flops, params, spec)
    if best is None:
        raise ConfigError(f"no zoo student fits {flops_budget:,.0f} FLOPs per sample on {tuple(data.input_shape)} inputs; raise --flops-budget")
    return best[2], best[0]


def resolve_student(ref: str, data: DatasetSpec, seed: int, *, weights: str | None = None, flops_budget: float | None = None,
                    trust_code: bool = False) -> tuple[nn.Module, ModelSpec]:
    """A fresh zoo model (seeded) by name, ``auto`` under a FLOPs budget, a factory, or a checkpoint to fine-tune."""
    path = Path(ref).expanduser()
    if path.exists():
        if weights:
            raise ConfigError(f"--student-weights applies to a zoo name or factory; {ref} already carries its weights")
        ckpt = load_checkpoint(path, trust_code=trust_code)
        check_fits(f"model {ref}", ckpt.spec, data)
        return ckpt.model, ckpt.spec
    if ref == "auto":
        if flops_budget is None:
            raise ConfigError("--student auto needs --flops-budget (FLOPs per sample)")
        spec, _ = auto_student(data, flops_budget)
    elif is_factory_ref(ref):
        spec = ModelSpec(ref, 1.0, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
    else:
        arch, width = parse_model_name(ref)
        spec = ModelSpec(arch, width, data.num_classes, tuple(data.input_shape))  # type: ignore[arg-type]
    torch.manual_seed(seed)  # initialization is part of the seeded run
    model = create_model(spec)
    if weights:
        load_weights(model, weights)
    return model, spec


def check_same_input(model: ResolvedTeacher, data: DatasetSpec, what: str) -> None:
    """A model that becomes a student (``what``: pruned, quantization-aware) is fed the data's normalization: it must have been
    trained on the same one (:meth:`~kdedge.data.normalization.Normalization.map_from` is None, as for a teacher that needs no input map)."""
    norm = model.input
    if norm is None or norm.map_from(data) is None:
        return
    raise ConfigError(f"{model.name} was trained on inputs normalized with mean {tuple(norm.mean)}, std {tuple(norm.std)}, "
                      f"but the data's are mean {tuple(data.mean)}, std {tuple(data.std)}; the {what} model would be fed the data's — "
                      "train it on data with its own normalization")

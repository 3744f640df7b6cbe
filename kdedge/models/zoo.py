"""The model zoo: architectures by name, model specs, checkpoints and shipped weights.

A model is named ``arch`` or ``arch@width`` (``tiny_cnn@0.5``). A checkpoint is a safetensors
file whose metadata records the :class:`ModelSpec` and the :class:`DatasetSpec`, so it can be
rebuilt and checked against data without the code that trained it. Weights are only ever read
through safetensors or ``torch.load(weights_only=True)`` — never unrestricted pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdedge._fs import file_sha256, umask
from kdedge._modes import evaluating
from kdedge.data.spec import DatasetSpec
from kdedge.errors import ModelError
from kdedge.models import architectures
from kdedge.models.genome import GenomeNet, is_genome, parse_genome

__all__ = [
    "MODELS",
    "TEACHERS",
    "Checkpoint",
    "ModelSpec",
    "count_flops",
    "count_parameters",
    "create_model",
    "load_checkpoint",
    "load_weights",
    "model_cost",
    "onnx_file_of",
    "parse_model_name",
    "pretrained_path",
    "runs_outside_torch",
    "save_checkpoint",
    "state_dict_sha256",
]

CHECKPOINT_FORMAT = 1

ModelFactory = Callable[[int, tuple[int, int, int], float], nn.Module]

#: Architecture name -> factory(num_classes, input_shape, width).
MODELS: dict[str, ModelFactory] = {
    "resnet": architectures.resnet,
    "resnet_cifar": architectures.resnet_cifar,
    "tiny_cnn": architectures.tiny_cnn,
    "dw_cnn": architectures.dw_cnn,
    "mobilenet_v2": architectures.mobilenet_v2,
    "mlp": architectures.mlp,
}

#: Architectures meant as teachers. Any zoo model can be named as a student, but ``--student auto``
#: searches only the others: a budgeted search should not hand back a thin copy of the teacher.
TEACHERS: frozenset[str] = frozenset({"resnet", "resnet_cifar"})

#: (architecture, width, dataset) -> weights file shipped in kdedge/models/weights/.
PRETRAINED: dict[tuple[str, float, str], str] = {
    ("resnet", 1.0, "fashion-mnist"): "resnet-fashion-mnist.safetensors",
}


@dataclass(frozen=True)
class ModelSpec:
    """Enough to rebuild a model: architecture, width, the data's shape and, for a pruned model, its kept widths.

    ``layers`` (a channel-pruned model, :mod:`kdedge.models.pruned`): ``(module name, (out, in,
    groups))`` per narrowed layer, sorted by name; the base architecture is ``arch@width``.
    """

    arch: str
    width: float
    num_classes: int
    input_shape: tuple[int, int, int]
    layers: tuple[tuple[str, tuple[int, int, int]], ...] | None = None
    qat: str | None = None  # a quantization-aware-trained model: its scheme (kdedge.qat.SCHEMES); the weights are the prepared graph's
    float_layers: tuple[str, ...] | None = None  # a quantization-aware model's layers left in float (kdedge.sensitivity)

    @property
    def base_name(self) -> str:
        """The architecture before pruning: ``arch`` or ``arch@width``."""
        return self.arch if self.width == 1.0 else f"{self.arch}@{self.width:g}"

    @property
    def name(self) -> str:
        """``arch[@width]``, and ``-pruned-<digest of the kept widths>`` for a pruned model (a latency cache tells them apart)."""
        if self.layers:
            from kdedge.models.pruned import shapes_digest

            name = f"{self.base_name}-pruned-{shapes_digest(dict(self.layers))}"
        else:
            name = self.base_name
        if self.float_layers:
            name = f"{name}-float-" + hashlib.sha256(",".join(self.float_layers).encode()).hexdigest()[:8]
        return f"{name}-qat-{self.qat}" if self.qat else name

    @property
    def pruned(self) -> bool:
        return bool(self.layers)

    def with_layers(self, layers: dict[str, tuple[int, int, int]] | None) -> ModelSpec:
        """This spec with ``layers`` as its kept widths (None or empty: the unpruned base)."""
        return dataclasses.replace(self, layers=tuple(sorted((k, tuple(int(v) for v in s)) for k, s in layers.items())) if layers else None)  # type: ignore[misc]

    def with_qat(self, scheme: str | None, float_layers: tuple[str, ...] = ()) -> ModelSpec:
        """This spec as the quantization-aware-trained model of ``scheme`` (None: the float model), ``float_layers`` left in float."""
        return dataclasses.replace(self, qat=scheme, float_layers=tuple(float_layers) if scheme and float_layers else None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d.pop("layers")
        d.pop("qat")
        d.pop("float_layers")
        if self.layers:  # absent for an unpruned model: its spec (and every cache key made from it) is what it always was
            d["layers"] = {k: list(s) for k, s in self.layers}
        if self.qat:
            d["qat"] = self.qat
        if self.float_layers:
            d["float_layers"] = list(self.float_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        try:
            layers = d.get("layers")
            if layers is not None and not isinstance(layers, dict):
                raise TypeError(f"layers must map module names to [out, in, groups], got {type(layers).__name__}")
            spec = cls(str(d["arch"]), float(d["width"]), int(d["num_classes"]), tuple(int(v) for v in d["input_shape"]))  # type: ignore[arg-type]
            if layers:
                shapes = {str(k): tuple(int(v) for v in s) for k, s in layers.items()}
                if any(len(s) != 3 for s in shapes.values()):
                    raise ValueError("every pruned layer records [out, in, groups]")
                spec = spec.with_layers(shapes)  # type: ignore[arg-type]
            if d.get("qat") is not None:
                from kdedge.models.qat import SCHEMES

                if d["qat"] not in SCHEMES:
                    raise ValueError(f"qat must be one of {', '.join(SCHEMES)}, got {d['qat']!r}")
                floats = d.get("float_layers") or ()
                if not isinstance(floats, (list, tuple)) or not all(isinstance(f, str) and f for f in floats):
                    raise TypeError("float_layers must be a list of module names")
                spec = spec.with_qat(str(d["qat"]), tuple(floats))
            return spec
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed model spec in checkpoint ({exc!r})") from None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and what its metadata says."""

    model: nn.Module
    spec: ModelSpec
    data: DatasetSpec | None
    path: Path
    sha256: str
    extra: dict[str, Any]


def parse_model_name(name: str) -> tuple[str, float]:
    """``"tiny_cnn@0.5"`` -> ``("tiny_cnn", 0.5)``; validates both parts."""
    arch, _, width_text = name.partition("@")
    if is_genome(arch):
        parse_genome(arch)  # a searched architecture, spelled out; raises on a bad token
    elif arch not in MODELS:
        raise ModelError(f"unknown model {arch!r}; expected one of {', '.join(sorted(MODELS))} (optionally NAME@WIDTH, e.g. tiny_cnn@0.5), "
                         "or a searched architecture such as net:c16k3s2-d32k3s2-fc")
    width = 1.0
    if width_text:
        try:
            width = float(width_text)
        except ValueError:
            raise ModelError(f"bad width in {name!r}: expected a number after '@', e.g. {arch}@0.5") from None
        if not 0.05 <= width <= 16:
            raise ModelError(f"width {width:g} in {name!r} is out of range; expected 0.05..16")
    return arch, width


def create_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialized model for ``spec`` (initialization follows the global RNG).

    ``spec.arch`` may also be a factory reference (``package.module:factory``, ``file.py:factory``).
    A pruned spec (``spec.layers``) builds the base and narrows the recorded layers (:func:`kdedge.models.pruned.narrow`).
    """
    from kdedge.models.byo import build_from_factory, is_factory_ref

    if is_factory_ref(spec.arch):
        model = build_from_factory(spec.arch, num_classes=spec.num_classes, input_shape=spec.input_shape)
    elif is_genome(spec.arch):
        model = GenomeNet(parse_genome(spec.arch), spec.num_classes, spec.input_shape, spec.width)
    elif spec.arch not in MODELS:
        raise ModelError(f"unknown model {spec.arch!r}; expected one of {', '.join(sorted(MODELS))} or a searched net:... architecture")
    else:
        model = MODELS[spec.arch](spec.num_classes, spec.input_shape, spec.width)
    if spec.layers:
        from kdedge.models.pruned import narrow

        narrow(model, dict(spec.layers))
    if spec.qat:  # the prepared graph of the float architecture; its tensors (weights, scales) come from the checkpoint
        from kdedge.models.qat import QATModel

        model = QATModel(model, spec.input_shape, scheme=spec.qat, keep_float=spec.float_layers or ())
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def runs_outside_torch(model: nn.Module) -> bool:
    """Whether part of ``model`` computes outside PyTorch (an ONNX teacher run by onnxruntime).

    Such a model's parameters and FLOPs cannot be counted and it cannot be timed or copied as a
    PyTorch module: kdedge records those as unknown (None), never as 0.
    """
    return any(getattr(m, "runs_outside_torch", False) for m in model.modules())


def onnx_file_of(model: nn.Module) -> Path | None:
    """The ONNX file of a model that is an ONNX teacher (possibly behind an input map), else None."""
    return next((Path(m.path) for m in model.modules() if getattr(m, "runs_outside_torch", False) and hasattr(m, "path")), None)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a single sample (``torch.utils.flop_counter``; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    with evaluating(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def model_cost(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """``{"params": ..., "flops": ...}`` of zoo model ``name`` (``arch`` or ``arch@width``) on one sample.

    The RGB models' parameters do not depend on ``input_shape`` but their FLOPs do; the flatten
    models' (``tiny_cnn``, ``mlp``) parameters grow with it.

    Raises:
        ModelError: ``name`` is not a zoo model.
    """
    arch, width = parse_model_name(name)
    model = create_model(ModelSpec(arch, width, num_classes, tuple(input_shape)))  # type: ignore[arg-type]
    return {"params": count_parameters(model), "flops": count_flops(model, tuple(input_shape))}


def state_dict_sha256(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, shapes, dtypes and bytes, in sorted key order."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec | None,
    data: DatasetSpec | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights and specs as one safetensors file.

    ``spec`` None (a model from outside the zoo) stores the weights without an architecture:
    reload them with :func:`load_weights` into the same module.
    """
    from safetensors.torch import save_file

    meta = {"format": CHECKPOINT_FORMAT, "model": spec.to_dict() if spec else None, "data": data.to_dict() if data else None, "extra": extra or {}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"kdedge": json.dumps(meta, sort_keys=True)})
    os.chmod(path, 0o666 & ~umask())  # safetensors writes 0600; a shipped checkpoint is as readable as any file


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint; expected a .safetensors file or a run directory holding model.safetensors")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to a user
        raise ModelError(f"{path}: cannot load weights with torch.load(weights_only=True) ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state, {}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from safetensors or a ``torch.save``d state dict into ``model``, strictly.

    Raises:
        ModelError: The file is unreadable, or its tensors do not fit the architecture.
    """
    path = Path(path)
    state, _ = _read_state(path)
    _load_strict(model, state, path)
    return model


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    if hasattr(model, "resize_to"):  # a QAT model: its observers' per-channel ranges take their size from the first batch (or the file)
        model.resize_to(state)
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & state.keys()) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"shape mismatch {len(wrong)} (e.g. {'; '.join(wrong[:2])})")
        raise ModelError(f"{path}: weights do not fit {type(model).__name__}: {', '.join(parts)}; was it saved from another architecture or width?")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> Checkpoint:
    """Rebuild a model from a kdedge checkpoint (a ``.safetensors`` file or a run directory).

    Args:
        path: The checkpoint, or a run directory holding ``model.safetensors``.
        trust_code: Allow a checkpoint whose architecture is a factory reference
            (``file.py:factory``, ``package.module:factory``) to import and run that code. Off by
            default: opening a file someone sent you must not run their code.

    Raises:
        ModelError: The file is unreadable, names code without ``trust_code``, or its weights do not fit.
    """
    from kdedge.models.byo import is_factory_ref

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state, meta = _read_state(path)
    if "kdedge" not in meta:
        raise ModelError(f"{path}: has no kdedge metadata, so its architecture is unknown; load it into a model with kdedge.load_weights")
    try:
        info = json.loads(meta["kdedge"])
    except json.JSONDecodeError:
        raise ModelError(f"{path}: kdedge metadata is not valid JSON; the file is corrupt") from None
    if not info.get("model"):
        raise ModelError(f"{path}: was saved from a model outside the zoo, so its architecture is unknown; load it into that model with kdedge.load_weights")
    spec = ModelSpec.from_dict(info["model"])
    if is_factory_ref(spec.arch) and not trust_code:  # refused before anything is imported
        raise ModelError(
            f"{path}: its architecture comes from code, {spec.arch!r}; loading it would import and run that code. "
            "If you trust it, pass --trust-code (trust_code=True in Python)"
        )
    data = DatasetSpec.from_dict(info["data"]) if info.get("data") else None
    model = create_model(spec)
    _load_strict(model, state, path)
    return Checkpoint(model=model, spec=spec, data=data, path=path, sha256=file_sha256(path), extra=info.get("extra") or {})


def pretrained_path(arch: str, width: float, dataset: str) -> Path | None:
    """The shipped weights for ``arch@width`` trained on ``dataset``, if kdedge has them."""
    file_name = PRETRAINED.get((arch, width, dataset))
    if file_name is None:
        return None
    path = Path(str(resources.files("kdedge.models") / "weights" / file_name))
    return path if path.is_file() else None

"""The run directory of ``kdedge train`` / ``kdedge distill`` and the checkpoint of an unfinished run.

A run directory holds ``model.safetensors`` (weights plus model and dataset specs),
``metrics.json`` and the fully resolved ``config.yaml``. It is written under a temporary name
and renamed into place, so an interrupted run leaves no half-written directory; until then the
per-epoch checkpoint lives in ``OUT.partial/checkpoint.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge._fs import partial_dir, publish_dir
from kdedge._version import __version__
from kdedge.config import _RunConfig, config_to_yaml
from kdedge.data.spec import DatasetSpec, ImageDataset
from kdedge.models.zoo import ModelSpec, count_flops, count_parameters, runs_outside_torch, save_checkpoint

__all__ = ["RESUME_NEEDS_OUT", "checkpoint_path", "spec_of", "model_summary", "write_run"]

RESUME_NEEDS_OUT = "--resume needs --out: the run directory the killed run was writing (its checkpoint is OUT.partial/checkpoint.pt)"


def checkpoint_path(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its per-epoch checkpoint until it finishes: ``OUT.partial/checkpoint.pt`` (inside its claim)."""
    return partial_dir(Path(out)) / "checkpoint.pt"


def spec_of(data: Dataset | DataLoader | None) -> DatasetSpec | None:
    """The :class:`DatasetSpec` of a kdedge dataset (or of a loader over one); None for other data."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    return ds.spec if isinstance(ds, ImageDataset) else None


def model_summary(model: nn.Module, spec: ModelSpec | None, data: DatasetSpec | None) -> dict[str, Any]:
    """Name, parameters and (when the input shape is known) FLOPs per sample, for ``metrics.json``.

    Both are None (unknown) for a model that computes outside PyTorch (an ONNX teacher): counting
    its PyTorch parameters would record 0.
    """
    outside = runs_outside_torch(model)
    summary: dict[str, Any] = {"name": spec.name if spec else type(model).__name__, "params": None if outside else count_parameters(model)}
    shape = spec.input_shape if spec else (data.input_shape if data else None)
    if shape is not None:
        summary["flops"] = None if outside else count_flops(model, tuple(shape))
    return summary


def write_run(out: Path, model: nn.Module, spec: ModelSpec | None, data: DatasetSpec | None, metrics: dict, config: _RunConfig) -> None:
    """Write the run directory atomically: build it under a temporary name, then rename (a failed rename keeps it and says where)."""
    with publish_dir(out) as tmp:
        cfg = config.to_dict() | {"out": str(out)}
        save_checkpoint(tmp / "model.safetensors", model, spec, data, extra={"kdedge_version": __version__, "test_accuracy": (metrics.get("test") or {}).get("accuracy")})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_to_yaml(type(config)(**cfg)))

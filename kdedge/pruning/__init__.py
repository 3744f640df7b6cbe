"""Structured (channel) pruning of a trained model, recovered by distillation from the original.

``kdedge prune MODEL --speedup 4`` and :func:`prune`: see :mod:`kdedge.pruning.run` for the loop,
:mod:`kdedge.pruning.graph` for the channel groups (Torch-Pruning's DepGraph) and
:mod:`kdedge.models.pruned` for how a pruned model is recorded and rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import kdedge.distributed as dist_
from kdedge.config import PruneConfig
from kdedge.pruning.graph import CRITERIA
from kdedge.pruning.run import RESUMABLE, PruneResult, prune

if TYPE_CHECKING:
    from kdedge.data.spec import DatasetSpec
    from kdedge.resolve import ResolvedTeacher

__all__ = ["CRITERIA", "PruneResult", "check_input", "prune", "run_prune"]


def run_prune(config: PruneConfig, *, progress: bool = True, log: Callable[[str], None] | None = None, trust_code: bool = False) -> PruneResult:
    """``kdedge prune``: resolve the data, the model to prune (run directory, checkpoint, shipped zoo
    name, or factory with ``config.weights``) and the optional recovery teacher, then :func:`prune`
    into ``config.out`` (default ``runs/prune-<time>``).

    Under ``torchrun`` the recoveries run distributed; the main process measures and decides which
    channels go, and every process removes the same ones.
    """
    from kdedge.data import load_data_for
    from kdedge.errors import ConfigError
    from kdedge.resolve import resolve_teacher
    from kdedge.runs import _output

    if config.resume and config.out is None:
        raise ConfigError("--resume needs the --out of the prune run to continue")
    dist_.init_from_env(config.device)
    try:
        with _output(config.out, resume=config.resume, kind="prune", checkpoint=RESUMABLE) as out:  # claimed before any data is read
            data = load_data_for(config)
            model = resolve_teacher(config.model, data.spec, weights=config.weights, trust_code=trust_code)
            if model.is_onnx:
                raise ConfigError(f"{config.model}: an ONNX file cannot be pruned (its channels are not PyTorch parameters); prune the checkpoint it was exported from")
            check_input(model, data.spec)
            teacher = resolve_teacher(config.teacher, data.spec, weights=config.teacher_weights, trust_code=trust_code) if config.teacher else model
            return prune(model.model, data, config=config, spec=model.spec, teacher=teacher.model if config.teacher else None,
                         teacher_name=teacher.name if config.teacher else f"{model.name} (unpruned)", teacher_input=teacher.input, out=out,
                         progress=progress, log=log, trust_code=trust_code)
    finally:
        dist_.shutdown()


def check_input(model: ResolvedTeacher, data: DatasetSpec) -> None:
    """The pruned model is a student fed the data's normalization: the model must have been trained on the same one."""
    from kdedge.resolve import check_same_input

    check_same_input(model, data, "pruned")

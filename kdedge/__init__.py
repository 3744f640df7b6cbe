"""kdedge: distill a large teacher into a small student and ship it to the edge.

The public API takes plain PyTorch objects::

    import kdedge
    data = kdedge.load_dataset("fashion-mnist")
    teacher = kdedge.resolve_teacher("resnet", data.spec).model
    student = kdedge.create_model(kdedge.ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)))
    result = kdedge.distill(student, teacher, data.train, data.test, config=kdedge.DistillConfig(epochs=5))

    bundle = kdedge.export_model(result.model, "export/", data=data)  # ONNX FP32 + INT8, parity-checked

Importing kdedge loads torch but neither onnx, onnxruntime nor TensorRT; they load on first use.
"""

from kdedge._version import __version__
from kdedge.config import BenchConfig, CompressConfig, DistillConfig, ExportConfig, PruneConfig, QATConfig, SearchConfig, TrainConfig, load_config
from kdedge.data import ArrayDataset, DatasetSpec, DataSplits, load_dataset
from kdedge.distill import FrozenTeacher, HintonLoss, LossParts, teacher_logits
from kdedge.errors import (
    BackendUnavailable,
    ConfigError,
    DataError,
    ExportError,
    KdedgeError,
    ModelError,
    ParityError,
)
from kdedge.exporters import ExportResult, export_checkpoint, export_model
from kdedge.metrics import Evaluation, evaluate
from kdedge.models import (
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from kdedge.pruning import PruneResult, prune
from kdedge.qat import QATModel, qat_distill
from kdedge.resolve import resolve_student, resolve_teacher
from kdedge.runs import RunResult, distill, run_distill, run_train, train
from kdedge.sensitivity import Sensitivity, layer_sensitivity

__all__ = [
    "ArrayDataset",
    "BackendUnavailable",
    "BenchConfig",
    "CompressConfig",
    "ConfigError",
    "DataError",
    "DataSplits",
    "DatasetSpec",
    "DistillConfig",
    "Evaluation",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "FrozenTeacher",
    "HintonLoss",
    "KdedgeError",
    "LossParts",
    "ModelError",
    "ModelSpec",
    "ParityError",
    "PruneConfig",
    "PruneResult",
    "QATConfig",
    "QATModel",
    "RunResult",
    "SearchConfig",
    "Sensitivity",
    "TrainConfig",
    "__version__",
    "count_flops",
    "count_parameters",
    "create_model",
    "distill",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "layer_sensitivity",
    "load_checkpoint",
    "load_config",
    "load_dataset",
    "load_weights",
    "prune",
    "qat_distill",
    "resolve_student",
    "resolve_teacher",
    "run_distill",
    "run_train",
    "save_checkpoint",
    "teacher_logits",
    "train",
]

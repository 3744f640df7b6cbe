"""Model zoo: architectures by name with a width multiplier, checkpoints and shipped weights."""

from kdedge.models.zoo import (
    MODELS,
    Checkpoint,
    ModelSpec,
    count_flops,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    parse_model_name,
    pretrained_path,
    save_checkpoint,
    state_dict_sha256,
)

__all__ = [
    "MODELS",
    "Checkpoint",
    "ModelSpec",
    "count_flops",
    "count_parameters",
    "create_model",
    "load_checkpoint",
    "load_weights",
    "parse_model_name",
    "pretrained_path",
    "save_checkpoint",
    "state_dict_sha256",
]

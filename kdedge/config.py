"""Typed run configurations. YAML only serializes these dataclasses.

Keys mirror the CLI flags (``--batch-size`` <-> ``batch_size``). Loading rejects unknown keys
and wrong types, and validation gathers every problem before raising one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdedge.errors import ConfigError

__all__ = ["TrainConfig", "DistillConfig", "load_config", "config_from_dict", "config_to_yaml"]

C = TypeVar("C", bound="_RunConfig")

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "constant")
_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("fp32", "bf16")
_CACHES = ("disk", "memory", "off")


@dataclass
class _RunConfig:
    """Fields shared by every training run."""

    data: str = "fashion-mnist"
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    random_erasing: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = True
    threads: int | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        problems = self._problems()
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p = []
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"{name} must be >= 1 or null, got {v}")
        if not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            p.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            p.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            p.append(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            p.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.random_erasing <= 1:
            p.append(f"random_erasing must be in [0, 1], got {self.random_erasing}")
        for name, allowed in (("optimizer", _OPTIMIZERS), ("schedule", _SCHEDULES), ("device", _DEVICES), ("precision", _PRECISIONS)):
            if getattr(self, name) not in allowed:
                p.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(_RunConfig):
    """Supervised training (``kdedge train``), e.g. of a teacher."""

    model: str = "tiny_cnn"


@dataclass
class DistillConfig(_RunConfig):
    """Knowledge distillation (``kdedge distill``) with Hinton's loss.

    The defaults are the recipe ``benchmarks/kd_vs_scratch.py`` measures: the shipped
    Fashion-MNIST teacher into ``tiny_cnn`` for 15 epochs with α = 0.5, T = 2 (chosen from
    α ∈ {0.5, 0.7, 0.9} × T ∈ {1, 2, 4} on seed 0; T = 4 under-fitted this student).
    """

    teacher: str = "resnet"
    student: str = "tiny_cnn"
    alpha: float = 0.5
    temperature: float = 2.0
    cache: str = "disk"
    epochs: int = 15

    def _problems(self) -> list[str]:
        p = super()._problems()
        if not 0 <= self.alpha <= 1:
            p.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0, got {self.temperature}")
        if self.cache not in _CACHES:
            p.append(f"cache must be one of {', '.join(_CACHES)}, got {self.cache!r}")
        return p


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in _allowed_types(a))
    if annotation is None:
        return (type(None),)
    return (annotation,)


def _describe(types_: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types_)


def _check_types(cfg: _RunConfig) -> None:
    problems = []
    hints = typing.get_type_hints(type(cfg))  # resolves the string annotations of `from __future__`
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        allowed = _allowed_types(hints[f.name])
        if isinstance(value, bool) and bool not in allowed:
            problems.append(f"{f.name} must be {_describe(allowed)}, got {value!r}")
        elif isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
            setattr(cfg, f.name, float(value))
        elif not isinstance(value, allowed):
            problems.append(f"{f.name} must be {_describe(allowed)}, got {value!r}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def config_from_dict(cls: type[C], values: dict[str, Any], *, source: str = "config") -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys (``-`` and ``_`` are equivalent)."""
    known = {f.name for f in fields(cls)}
    normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(normalized.keys() - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return cls(**normalized)


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (e.g. explicit CLI flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}; expected a mapping of keys like 'epochs: 10'") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, found {type(loaded).__name__}")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides or {})
    return config_from_dict(cls, values, source=str(path) if path else "config")


def config_to_yaml(cfg: _RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

"""How pixels become a model's inputs, and how one model's inputs become another's.

A dataset declares ``x = (pixel · scale − mean[c]) / std[c]`` (:class:`~kdedge.data.spec.DatasetSpec`).
A teacher may have been trained with another normalization — ``pixels / 255`` against
standardized inputs, say. :class:`Normalization` states such a contract and
:meth:`Normalization.map_from` gives the per-channel affine :class:`InputMap` from the data's
inputs to the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdedge.data.spec import DatasetSpec
from kdedge.errors import ConfigError

__all__ = ["Normalization", "InputMap"]


@dataclass(frozen=True)
class Normalization:
    """The input normalization a model was trained with: ``x = (pixel · scale − mean[c]) / std[c]``.

    ``scale`` None means the data's own pixel scale (1/255 for 8-bit images):
    ``Normalization((0.0,), (1.0,))`` is a teacher trained on ``pixels / 255``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"teacher_mean and teacher_std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"teacher_std must be positive, got {', '.join(map(str, self.std))}")

    def map_from(self, data: DatasetSpec) -> InputMap | None:
        """The per-channel affine map from ``data``'s normalized inputs to this teacher's, or None when they are the same."""
        channels = data.input_shape[0]
        mean, std = (self.mean * channels if len(self.mean) == 1 else self.mean), (self.std * channels if len(self.std) == 1 else self.std)
        if len(mean) != channels:
            raise ConfigError(f"teacher_mean/teacher_std have {len(self.mean)} values, but data {data.name!r} has {channels} channels; give 1 or {channels}")
        data_scale = data.scale if data.scale is not None else 1 / 255  # None: a legacy spec (see DatasetSpec.from_dict)
        ratio = (self.scale if self.scale is not None else data_scale) / data_scale  # teacher pixel scale per data pixel scale
        # x_data = (p·s_d − m_d)/σ_d  =>  x_teacher = (p·s_t − m_t)/σ_t = x_data · (σ_d·r/σ_t) + (m_d·r − m_t)/σ_t, r = s_t/s_d
        a = tuple(sd * ratio / st for sd, st in zip(data.std, std))
        b = tuple((md * ratio - mt) / st for md, mt, st in zip(data.mean, mean, std))
        if all(abs(v - 1) < 1e-12 for v in a) and all(abs(v) < 1e-12 for v in b):
            return None
        return InputMap(a, b)


@dataclass(frozen=True)
class InputMap:
    """``x ↦ x · a[c] + b[c]``: the data's normalized inputs as the teacher expects them."""

    a: tuple[float, ...]
    b: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tensor(self.a, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        b = torch.tensor(self.b, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return torch.addcmul(b, x, a)

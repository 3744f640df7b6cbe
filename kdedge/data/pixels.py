"""Preprocessing inside the model: artifacts that take the camera's ``uint8`` pixels as they are.

A kdedge model is trained on ``x = pixel * a + b`` (``a = scale / std``, ``b = -mean / std`` per
channel) in NCHW float32, and by default its artifacts take that ``x``: the device repeats the
scaling, the mean/std and the layout change in its own code, the step where deployments go
wrong. With an input format other than ``float`` the exported graph starts at the pixels:

- ``uint8-nhwc``: ``(B, H, W, C)`` uint8, the layout of a decoded image or a camera frame
  (Pillow, Android's ``Bitmap``, OpenCV without its BGR swap);
- ``uint8-nchw``: ``(B, C, H, W)`` uint8;

and does ``cast -> (transpose) -> x * a + b`` itself, with the very ``a`` and ``b`` the training
data was normalized with (:class:`PixelInput`). Decoding, the image-folder resize and the crop
stay outside: they depend on the file, not the tensor.

kdedge checks such an artifact against the float model on the same images: :meth:`InputFormat.feed`
turns the normalized batches it holds back into the stored pixels, exactly (``round((x - b) / a)``
recovers a uint8 pixel to well within half a step), so parity, accuracy and timing feed each
artifact what a device would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdedge.config import INPUT_FORMATS
from kdedge.errors import ConfigError, DataError
from kdedge.data.spec import UINT8_SCALE, DatasetSpec

__all__ = ["INPUT_FORMATS", "InputFormat", "PixelInput", "artifact_input", "example_input", "inner_model", "input_format", "recorded_input_format"]


class PixelInput(nn.Module):
    """``model`` behind its own preprocessing: ``(B, H, W, C)`` (or ``(B, C, H, W)``) uint8 pixels in, logits out.

    The affine map is the dataset's (``x = pixel * scale / std - mean / std``, one multiply-add per
    element, in the dtype of ``gain``: float32, or float16 inside an FP16 export), so the wrapped
    graph computes what the float model computes on the dataset's normalized inputs.
    """

    def __init__(self, model: nn.Module, *, scale: float, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> None:
        super().__init__()
        self.model = model
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # (1, C, 1, 1): the dataset's own coefficients (spec.ImageDataset), so the result is its normalization up to float32 rounding
        self.register_buffer("gain", scale / s, persistent=False)
        self.register_buffer("bias", -m / s, persistent=False)
        self.channels_last = channels_last
        self._args = {"scale": scale, "mean": tuple(mean), "std": tuple(std), "channels_last": channels_last}

    def around(self, inner: nn.Module) -> PixelInput:
        """The same preprocessing in front of another module (a quantization-aware model's converted INT8 graph)."""
        return PixelInput(inner, **self._args)

    input_dtype = torch.uint8

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.gain.dtype)  # cast first: the float permute and affine lower into XNNPACK's partition, a uint8 permute would not
        x = x.permute(0, 3, 1, 2) if self.channels_last else x  # (B, C, H, W)
        return self.model(x * self.gain + self.bias)


@dataclass(frozen=True)
class InputFormat:
    """What an artifact takes: ``name`` (one of :data:`INPUT_FORMATS`) for data normalized with ``scale``, ``mean``, ``std``."""

    name: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def raw(self) -> bool:
        """Whether the artifact takes pixels (preprocessing in its graph) rather than normalized floats."""
        return self.name != "float"

    @property
    def layout(self) -> str:
        return "NHWC" if self.name == "uint8-nhwc" else "NCHW"

    @property
    def dtype(self) -> str:
        return "uint8" if self.raw else "float32"

    def shape(self, chw: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's shape as the artifact takes it, from the model's ``(C, H, W)``."""
        c, h, w = chw
        return (h, w, c) if self.layout == "NHWC" else (c, h, w)

    def contract(self, chw: tuple[int, ...], *, name: str = "input") -> dict[str, object]:
        """The ``input`` entry of ``export.json`` and of the ONNX metadata: the graph input's name, shape, dtype and layout."""
        return {"name": name, "shape": ["batch", *self.shape(chw)], "dtype": self.dtype, "layout": self.layout, "format": self.name,
                "preprocessing": ("in the graph: cast, then x = pixel * scale / std[c] - mean[c] / std[c]" if self.raw
                                  else "by the caller: x = (pixel * scale - mean[c]) / std[c]")}

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the artifact computes it: itself for ``float``, else behind a :class:`PixelInput`."""
        if not self.raw:
            return model
        return PixelInput(model, scale=self.scale, mean=self.mean, std=self.std, channels_last=self.layout == "NHWC")

    def feed(self, x: np.ndarray) -> np.ndarray:
        """The artifact's input for normalized inputs ``x`` ``(B, C, H, W)`` float32: the same images, as the artifact takes them.

        For a raw format, the stored pixels back: ``round((x + mean / std) * std / scale)``, exact
        for 8-bit data (the float error is ~1e-4 of a pixel step), then the layout.
        """
        if not self.raw:
            return x
        std = np.asarray(self.std, np.float64).reshape(1, -1, 1, 1)
        mean = np.asarray(self.mean, np.float64).reshape(1, -1, 1, 1)
        pixels = np.clip(np.rint((np.asarray(x, np.float64) * std + mean) / self.scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1) if self.layout == "NHWC" else pixels)


def input_format(name: str, spec: DatasetSpec) -> InputFormat:
    """The :class:`InputFormat` ``name`` for a model trained on ``spec``.

    Raises:
        ConfigError: ``name`` is not one of :data:`INPUT_FORMATS`, or it asks for uint8 pixels
            while the data is not stored as 8-bit pixels (its scale is not 1/255).
    """
    if name not in INPUT_FORMATS:
        raise ConfigError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {name!r}")
    scale = spec.scale
    if name != "float" and (scale is None or abs(scale - UINT8_SCALE) > 1e-12):
        found = "records no pixel scale" if scale is None else f"stores pixels scaled by {scale:g} (floating point), not 8-bit ones"
        raise ConfigError(f"input format {name} takes 8-bit pixels, but data {spec.name!r} {found}; "
                          "export with --input-format float, or train on 8-bit images (an image folder, IDX or uint8 arrays)")
    return InputFormat(name=name, scale=float(scale if scale is not None else UINT8_SCALE), mean=tuple(spec.mean), std=tuple(spec.std))


def artifact_input(x: np.ndarray, dtype: type | np.dtype, what: str) -> np.ndarray:
    """``x`` as a contiguous array of the artifact's input ``dtype``; ConfigError where that would change what the values mean.

    A uint8 artifact (its preprocessing in the graph) fed floating-point inputs would read normalized
    values as pixels, and a float one fed uint8 pixels would read them unnormalized: both compute
    nonsense without an error, so both are refused, naming ``what`` (the artifact).
    """
    x = np.asarray(x)
    pixels, given = np.dtype(dtype) == np.uint8, x.dtype == np.uint8
    if pixels and not given:
        raise ConfigError(f"{what} takes uint8 pixels (its preprocessing is in the graph), got {x.dtype} inputs; feed the decoded images "
                          "(kdedge.data.pixels.InputFormat.feed turns normalized inputs back into them)")
    if given and not pixels:
        raise ConfigError(f"{what} takes {np.dtype(dtype).name} inputs normalized as its metadata says, got uint8 pixels; normalize them "
                          "first, or export with --input-format uint8-nhwc")
    return np.ascontiguousarray(x, dtype=dtype)


def inner_model(model: nn.Module) -> nn.Module:
    """The model behind a :class:`PixelInput` (``model`` itself otherwise)."""
    return model.model if isinstance(model, PixelInput) else model


def example_input(model: nn.Module, batch: int, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros ``(batch, *sample_shape)`` of the dtype ``model`` takes (uint8 for a :class:`PixelInput`, else float32): what tracing needs."""
    return torch.zeros(batch, *sample_shape, dtype=getattr(model, "input_dtype", torch.float32))


def recorded_input_format(contract: object, preprocessing: object) -> InputFormat | None:
    """The :class:`InputFormat` an artifact records (``export.json``'s or a bundle's ``input`` and ``preprocessing``, or the
    ``kdedge.input`` / ``kdedge.preprocessing`` metadata, parsed); None for a float input or a file that does not say.

    Raises:
        DataError: The input is uint8 but the record cannot say how to make its pixels (a malformed or edited file): feeding it
            anything would be a guess.
    """
    if not isinstance(contract, dict) or contract.get("dtype") != "uint8":
        return None
    try:
        pre = preprocessing if isinstance(preprocessing, dict) else {}
        name = contract.get("format") or ("uint8-nhwc" if contract.get("layout") == "NHWC" else "uint8-nchw")
        sample = [int(v) for v in contract["shape"][1:]]
        fmt = InputFormat(name=str(name), scale=float(pre["scale"]), mean=tuple(float(v) for v in pre["mean"]),
                          std=tuple(float(v) for v in pre["std"]))
        channels = sample[-1] if fmt.name == "uint8-nhwc" else sample[0]
        problem = ("format is not a uint8 one" if fmt.name not in INPUT_FORMATS[1:] else
                   f"scale {fmt.scale} is not positive" if not (math.isfinite(fmt.scale) and fmt.scale > 0) else
                   f"{len(fmt.mean)} mean and {len(fmt.std)} std values for {channels} channel(s)" if not len(fmt.mean) == len(fmt.std) == channels else
                   "a std is not positive" if not all(v > 0 for v in fmt.std) else None)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise DataError(f"the artifact takes uint8 pixels, but its recorded input contract cannot say how to make them ({problem}); "
                        "re-export it with kdedge export")
    return fmt

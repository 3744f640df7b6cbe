"""A teacher the user only has as an ONNX file: its logits come from onnxruntime.

:class:`OnnxTeacherModule` is an ``nn.Module`` (no parameters, no gradients) so everything that
takes a teacher — :class:`~kdedge.distill.teacher.FrozenTeacher`, the logit cache, ``evaluate`` —
works unchanged. The file's sha256 is registered as a buffer, so the logit-cache key changes
whenever the ONNX file does. A graph exported with a fixed batch size gets its inputs in chunks of
exactly that size (the last one padded), so any batch the loop, the cache or evaluation uses works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdedge._fs import file_sha256
from kdedge.errors import DataError

__all__ = ["OnnxTeacherModule"]


class OnnxTeacherModule(nn.Module):
    """Runs an ONNX classifier ``(B, C, H, W) -> (B, K)`` in onnxruntime on the CPU.

    Args:
        path: The ``.onnx`` file.
        input_shape: ``(C, H, W)`` the data has; checked against the graph's input.
        num_classes: ``K`` the data has; checked against the graph's output.
        threads: onnxruntime intra-op threads (default: its choice).

    Raises:
        ExportError: The file cannot be loaded by onnxruntime.
        DataError: Its input or output does not fit the data.
    """

    def __init__(self, path: str | Path, *, input_shape: tuple[int, ...], num_classes: int, threads: int | None = None) -> None:
        super().__init__()
        from kdedge.ort import ort_session

        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise DataError(f"{self.path.name}: an ONNX teacher must have one input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        #: The graph's fixed batch size, or None when the batch dimension is symbolic.
        self.fixed_batch: int | None = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if len(shape) != 1 + len(input_shape) or any(f is not None and f != want for f, want in zip(fixed, input_shape)):
            raise DataError(f"{self.path.name}: input {self.input_name!r} has shape {shape}, but the data's samples are {tuple(input_shape)}; "
                            "export the teacher for this data's (batch, C, H, W) inputs")
        if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
            raise DataError(f"{self.path.name}: input {self.input_name!r} is {inputs[0].type}; expected float inputs (normalized images)")
        self._dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        probe = self._run(np.zeros((1, *input_shape), self._dtype))
        if probe.ndim != 2 or probe.shape != (1, num_classes):
            raise DataError(f"{self.path.name}: output {outputs[0].name!r} has shape {tuple(probe.shape)} for one sample, "
                            f"but the data has {num_classes} classes; expected (batch, {num_classes}) logits")
        digest = bytes.fromhex(file_sha256(self.path))
        self.register_buffer("onnx_sha256", torch.frombuffer(bytearray(digest), dtype=torch.uint8))  # identifies it in cache keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=self._dtype)
        return torch.from_numpy(np.asarray(self._run(feed), dtype=np.float32)).to(x.device)

    def _run(self, feed: np.ndarray) -> np.ndarray:
        """Logits of ``feed`` (B, C, H, W); a fixed-batch graph gets chunks of its size, the last one zero-padded."""
        step = self.fixed_batch
        if step is None or len(feed) == step:
            return self.session.run(None, {self.input_name: feed})[0]
        out = []
        for i in range(0, len(feed), step):
            chunk = feed[i : i + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

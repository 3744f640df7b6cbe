"""A teacher the user only has as an ONNX file: its logits come from onnxruntime.

:class:`OnnxTeacherModule` is an ``nn.Module`` (no parameters, no gradients) so everything that
takes a teacher — :class:`~kdedge.distill.teacher.FrozenTeacher`, the logit cache, ``evaluate`` —
works unchanged. The sha256 of the file and of every external-data file it names
(``torch.onnx.export`` writes the weights to ``NAME.onnx.data`` beside it) is registered as a buffer,
so the logit-cache key changes whenever the graph or its weights do. A graph exported with a fixed batch size gets its inputs in chunks of
exactly that size (the last one padded), so any batch the loop, the cache or evaluation uses works.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdedge._fs import file_sha256
from kdedge.errors import DataError
from kdedge.ort import fixed_batch, ort_predict, ort_session

__all__ = ["OnnxTeacherModule", "onnx_sha256"]


def onnx_sha256(path: Path) -> str:
    """sha256 over an ONNX file's bytes and those of each external-data file it names (sorted by name).

    A graph re-exported with new weights can keep its ``.onnx`` bytes and change only its
    ``.onnx.data``: hashing the ``.onnx`` alone would serve the old weights' cached logits.
    """
    import onnx

    def tensors(graph: onnx.GraphProto):  # initializers, sparse ones, and those of subgraphs (If/Loop bodies)
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    model = onnx.load(str(path), load_external_data=False)
    names = sorted({entry.value for t in tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                    for entry in t.external_data if entry.key == "location"})
    files = [path, *(path.parent / name for name in names)]
    if len(files) == 1:
        return file_sha256(path)  # a self-contained file: its plain sha256, as before
    return hashlib.sha256("".join(f"{f.name}\0{file_sha256(f)}\n" for f in files).encode()).hexdigest()


class OnnxTeacherModule(nn.Module):
    """Runs an ONNX classifier ``(B, C, H, W) -> (B, K)`` in onnxruntime on the CPU.

    Its computation is not PyTorch's (:data:`runs_outside_torch`): its parameters, FLOPs and
    PyTorch latency are unknown to kdedge, never 0.

    Args:
        path: The ``.onnx`` file.
        input_shape: ``(C, H, W)`` the data has; checked against the graph's input.
        num_classes: ``K`` the data has; checked against the graph's output.
        threads: onnxruntime intra-op threads (default: its choice).

    Raises:
        ExportError: The file cannot be loaded by onnxruntime.
        DataError: Its input or output does not fit the data.
    """

    #: Read by :func:`kdedge.models.zoo.runs_outside_torch`.
    runs_outside_torch = True

    def __init__(self, path: str | Path, *, input_shape: tuple[int, ...], num_classes: int, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise DataError(f"{self.path.name}: an ONNX teacher must have one input, found {len(inputs)} ({', '.join(i.name for i in inputs)})")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        #: The graph's fixed batch size, or None when the batch dimension is symbolic.
        self.fixed_batch = fixed_batch(self.session)
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if inputs[0].type == "tensor(uint8)":  # a kdedge export with --input-format uint8-*: its preprocessing is in the graph
            raise DataError(f"{self.path.name}: input {self.input_name!r} takes uint8 pixels (its preprocessing is in the graph); a teacher is "
                            "fed normalized float images: export it again with --input-format float")
        if len(shape) != 1 + len(input_shape) or any(f is not None and f != want for f, want in zip(fixed, input_shape)):
            raise DataError(f"{self.path.name}: input {self.input_name!r} has shape {shape}, but the data's samples are {tuple(input_shape)}; "
                            "export the teacher for this data's (batch, C, H, W) inputs")
        if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
            raise DataError(f"{self.path.name}: input {self.input_name!r} is {inputs[0].type}; expected float inputs (normalized images)")
        self._dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        try:
            probe = self._run(np.zeros((1, *input_shape), self._dtype))
        except Exception as exc:  # loads, but fails when run (a bad reshape inside, an op the CPU provider lacks)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DataError(f"{self.path.name}: onnxruntime cannot run it on one zero sample of shape {tuple(input_shape)} ({first}); "
                            "is it a classifier of (batch, C, H, W) inputs?") from exc
        if probe.ndim != 2 or probe.shape != (1, num_classes):
            raise DataError(f"{self.path.name}: output {outputs[0].name!r} has shape {tuple(probe.shape)} for one sample, "
                            f"but the data has {num_classes} classes; expected (batch, {num_classes}) logits")
        digest = bytes.fromhex(onnx_sha256(self.path))
        self.register_buffer("onnx_sha256", torch.frombuffer(bytearray(digest), dtype=torch.uint8))  # identifies it in cache keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=self._dtype)
        return torch.from_numpy(np.asarray(self._run(feed), dtype=np.float32)).to(x.device)

    def _run(self, feed: np.ndarray) -> np.ndarray:
        """Logits of ``feed`` (B, C, H, W) in one call; a fixed-batch graph gets chunks of its size, the last one zero-padded."""
        return ort_predict(self.session, feed, batch_size=max(len(feed), 1), dtype=self._dtype)

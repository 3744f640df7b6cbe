"""Numeric parity of an exported model against its PyTorch reference, on real inputs.

An export never "succeeds" with wrong numbers: :func:`check_parity` runs the artifact in
onnxruntime (CPU) and the reference in PyTorch on the same inputs — each of the first samples
alone (batch 1) and all of them as one batch (batch N) — and raises :class:`ParityError` naming
the output, the difference and the tolerance, unless the caller opts out with ``allow_mismatch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdedge.errors import ParityError
from kdedge.ort import ort_session, ort_version

__all__ = ["Tolerance", "OutputParity", "ParityReport", "check_outputs", "check_parity", "compare_outputs"]


@dataclass(frozen=True)
class Tolerance:
    """When an artifact's outputs count as equal to the reference's.

    Attributes:
        atol: Absolute bound on max |Δ|; None leaves the difference unchecked (INT8).
        rtol: Added bound relative to the reference's largest magnitude: ``atol + rtol * max|ref|``.
        min_agreement: Smallest allowed fraction of samples whose argmax agrees. Disagreements on
            near-ties — the reference's top-2 margin within twice the bound — are excused, since
            a difference inside the tolerance can legitimately flip them.
    """

    atol: float | None
    rtol: float = 0.0
    min_agreement: float = 1.0

    def bound(self, reference: np.ndarray) -> float:
        if self.atol is None:
            return math.inf
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))


@dataclass
class OutputParity:
    """Agreement of one output: max/mean |Δ| and argmax agreement, at batch 1 and batch N."""

    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_diff_batch1: float
    bound: float | None
    argmax_agreement: float
    near_tie_disagreements: int
    disagreements: int
    samples: int

    def failures(self, tolerance: Tolerance) -> list[str]:
        out = []
        if self.bound is not None and not self.max_abs_diff <= self.bound:  # `not <=` also catches NaN
            out.append(f"output {self.name!r}: max |Δ| {self.max_abs_diff:.3g} exceeds the tolerance {self.bound:.3g}")
        unexplained = self.disagreements - self.near_tie_disagreements
        if self.samples and 1 - unexplained / self.samples < tolerance.min_agreement:
            out.append(
                f"output {self.name!r}: argmax agrees on {self.argmax_agreement:.2%} of samples "
                f"({unexplained} disagreements not explained by near-ties), below the required {tolerance.min_agreement:.2%}"
            )
        return out


@dataclass
class ParityReport:
    """The result of :func:`check_parity`; saved next to the artifact as part of ``export.json``."""

    artifact: str
    reference: str
    runtime: str
    samples: int
    batch1_samples: int
    tolerance: dict
    outputs: list[OutputParity]
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _argmax_stats(out: np.ndarray, ref: np.ndarray, bound: float) -> tuple[float, int, int]:
    """(agreement, near-tie disagreements, disagreements) of ``out`` vs ``ref`` along the last axis."""
    if ref.ndim < 2 or ref.shape[-1] < 2:
        return 1.0, 0, 0
    a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    differ = a.argmax(-1) != b.argmax(-1)
    top2 = np.sort(b, axis=-1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * bound
    return float(1 - differ.mean()), int((differ & near_tie).sum()), int(differ.sum())


def compare_outputs(
    outputs: list[np.ndarray],
    references: list[np.ndarray],
    batch1_outputs: list[np.ndarray],
    names: list[str],
    tolerance: Tolerance,
) -> list[OutputParity]:
    """Per-output statistics of ``outputs`` (batch N) and ``batch1_outputs`` vs ``references``."""
    result = []
    for name, out, ref, out1 in zip(names, outputs, references, batch1_outputs):
        out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
        if out64.shape != ref64.shape:
            raise ParityError(f"output {name!r} has shape {out64.shape}, the reference {ref64.shape}")
        diff = np.abs(out64 - ref64)
        diff1 = np.abs(out1.astype(np.float64) - ref64[: len(out1)])
        bound = tolerance.bound(ref64)
        agreement, near, total = _argmax_stats(out64, ref64, bound if math.isfinite(bound) else 0.0)
        result.append(
            OutputParity(
                name=name,
                max_abs_diff=float(max(diff.max(initial=0.0), diff1.max(initial=0.0))),
                mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
                max_abs_diff_batch1=float(diff1.max(initial=0.0)),
                bound=bound if math.isfinite(bound) else None,
                argmax_agreement=agreement,
                near_tie_disagreements=near,
                disagreements=total,
                samples=int(np.prod(ref64.shape[:-1])) if ref64.ndim >= 2 else 1,
            )
        )
    return result


def _reference_fn(reference: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], np.ndarray]:
    if isinstance(reference, nn.Module):
        model = reference.eval().cpu()

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return model(x).float().numpy()

        return run
    return lambda x: np.asarray(reference(x))


def check_parity(
    artifact: str | Path,
    reference: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    *,
    tolerance: Tolerance,
    batch1_samples: int = 16,
    allow_mismatch: bool = False,
    session=None,
    feed: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ParityReport:
    """Compare an ONNX artifact in onnxruntime (CPU) with ``reference`` in PyTorch.

    Args:
        artifact: The ``.onnx`` file.
        reference: The PyTorch model (run in eval mode on the CPU) or a function of the inputs.
        inputs: Real, preprocessed inputs ``(N, C, H, W)``, float32. All N run as one batch;
            the first ``batch1_samples`` also run one at a time.
        tolerance: The bound the differences must stay within.
        batch1_samples: How many samples run at batch 1.
        allow_mismatch: Return a failing report instead of raising.
        session: An existing onnxruntime session on ``artifact`` (saves loading it twice).
        feed: Turns ``inputs`` into what the artifact takes (uint8 pixels for one with its preprocessing in
            the graph, :meth:`kdedge.data.pixels.InputFormat.feed`); the reference still gets ``inputs``.

    Raises:
        ParityError: The outputs differ beyond ``tolerance`` (and ``allow_mismatch`` is False).
    """
    session = session or ort_session(artifact)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    feed = feed or (lambda x: x)
    return check_outputs(lambda x: session.run(None, {input_name: feed(x)}), reference, inputs, names=names, artifact=Path(artifact).name,
                         runtime=f"onnxruntime {ort_version()} CPUExecutionProvider", tolerance=tolerance, batch1_samples=batch1_samples,
                         allow_mismatch=allow_mismatch)


def check_outputs(
    run: Callable[[np.ndarray], list[np.ndarray] | np.ndarray],
    reference: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    *,
    names: list[str] | None = None,
    artifact: str,
    runtime: str,
    tolerance: Tolerance,
    batch1_samples: int = 16,
    allow_mismatch: bool = False,
) -> ParityReport:
    """:func:`check_parity` for any runtime: ``run`` maps a float32 batch to the artifact's outputs.

    ``run`` gets all of ``inputs`` at once and each of the first ``batch1_samples`` alone; a
    runtime with a bounded batch chunks inside ``run``. ``artifact`` and ``runtime`` name what
    was run in the report and in the error.
    """
    inputs = inputs.detach().cpu().float().contiguous()
    x = inputs.numpy()

    def outputs_of(batch: np.ndarray) -> list[np.ndarray]:
        out = run(batch)
        return [out] if isinstance(out, np.ndarray) else list(out)

    outputs = outputs_of(x)
    names = names or (["logits"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    k = min(batch1_samples, len(x))
    singles = [outputs_of(x[i : i + 1]) for i in range(k)]
    batch1 = [np.concatenate([s[j] for s in singles], axis=0) for j in range(len(outputs))]
    ref = _reference_fn(reference)(inputs)
    references = [ref] if isinstance(ref, np.ndarray) else list(ref)
    stats = compare_outputs(outputs[: len(references)], references, batch1[: len(references)], names[: len(references)], tolerance)
    failures = [f for s in stats for f in s.failures(tolerance)]
    report = ParityReport(
        artifact=artifact,
        reference=f"torch {torch.__version__} cpu",
        runtime=runtime,
        samples=len(x),
        batch1_samples=k,
        tolerance=asdict(tolerance),
        outputs=stats,
        passed=not failures,
        failures=failures,
    )
    if failures and not allow_mismatch:
        raise ParityError(f"{artifact} does not match PyTorch: " + "; ".join(failures) + " (pass --allow-mismatch to keep it anyway)")
    return report

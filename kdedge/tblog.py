"""Training you can watch: ``--log-dir DIR`` writes TensorBoard event files of a run (the ``tensorboard`` extra).

Per epoch (the step is the epoch number): every number of the epoch's history row — the loss and
its parts (``train_loss``, ``train_task_loss``, ``train_kd_loss``, ``train_feature_loss``), training
accuracy, the learning rate, validation (or test) accuracy and macro F1, how often the student
predicts the teacher's class there (``val_teacher_agreement``, a distillation's; the history rows of
a run with a log directory carry it), seconds — as the scalar ``<group>/<name>``
(``loss/train_kd_loss``, ``accuracy/val_accuracy``, ``agreement/val_teacher_agreement``, ``lr/lr``,
``time/seconds``). A bundle (``compress-and-export``) adds its benchmark's Markdown report (latency,
throughput and accuracy per model, variant and target) under ``bundle/report``.
At the end: the final test (and validation) metrics as scalars and a Markdown table under
``summary``. Only the main process of a ``torchrun`` job writes. Each event file starts with TensorBoard's ``purge_step`` at the first epoch the run trains, so the
points a killed run (or an earlier run in the same directory) left from there on are dropped rather
than drawn twice. Written through ``torch.utils.tensorboard``; view with
``tensorboard --logdir DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdedge.errors import BackendUnavailable, ConfigError

__all__ = ["EpochLog", "RunLog", "check_available", "prepare_dir", "sub_dir", "write_text"]

_GROUPS = (("loss", ("loss",)), ("agreement", ("teacher_agreement",)), ("accuracy", ("accuracy", "macro_f1")), ("lr", ("lr",)), ("time", ("seconds",)))


def check_available() -> None:
    """Raise :class:`BackendUnavailable` (one line, the install hint) when TensorBoard's writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise BackendUnavailable("--log-dir writes TensorBoard event files and needs the tensorboard package: "
                                 "pip install 'kdedge-distill[tensorboard]'") from None


def prepare_dir(log_dir: str | Path) -> None:
    """Create ``log_dir``, or raise :class:`ConfigError` in one line saying why it cannot be."""
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--log-dir {log_dir}: cannot create it ({exc.strerror or exc}); give a writable directory") from None


def write_text(log_dir: str | Path, tag: str, text: str, *, step: int = 0) -> None:
    """One Markdown entry ``tag`` in ``log_dir``'s run (a bundle's latency and accuracy tables, beside its training curves)."""
    check_available()
    from torch.utils.tensorboard import SummaryWriter

    prepare_dir(log_dir)
    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_text(tag, text, step)
    finally:
        writer.close()


def sub_dir(log_dir: str | None, name: str) -> str | None:
    """Where a run inside a run logs (a pruning step, the QAD of a bundle, a search finalist): its own TensorBoard run."""
    return str(Path(log_dir) / name.replace("/", "_").replace(":", "_")) if log_dir else None


def _tag(key: str) -> str | None:
    for group, words in _GROUPS:
        if any(key == w or key.endswith("_" + w) for w in words):
            return f"{group}/{key}"
    return None


class EpochLog:
    """A run's TensorBoard writer: :meth:`epoch` per history row, :meth:`finish` with the final metrics."""

    def __init__(self, log_dir: str | Path, *, first_epoch: int = 1, title: str = "") -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        prepare_dir(log_dir)
        # purge_step: points from this epoch on, left by an earlier run in this directory (a killed one, a rerun), are dropped, not drawn twice.
        self.writer = SummaryWriter(str(log_dir), purge_step=first_epoch)
        self.title = title

    def epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            tag = _tag(key)
            if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def finish(self, metrics: dict[str, Any], *, epochs: int) -> None:
        """The final metrics (``metrics.json``'s ``test`` and ``val``): scalars at the last epoch, and a Markdown table."""
        lines = [f"**{self.title}**" if self.title else "", "", "| split | accuracy | macro F1 |", "|---|---:|---:|"]
        for split in ("test", "val"):
            m = metrics.get(split)
            if not m:
                continue
            self.writer.add_scalar(f"final/{split}_accuracy", float(m["accuracy"]), epochs)
            self.writer.add_scalar(f"final/{split}_macro_f1", float(m["macro_f1"]), epochs)
            lines.append(f"| {split} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
        teacher = metrics.get("teacher") or {}
        if teacher.get("test"):
            lines.append(f"| teacher ({teacher.get('name', '')}) test | {teacher['test']['accuracy']:.4f} | {teacher['test']['macro_f1']:.4f} |")
        self.writer.add_text("summary", "\n".join(lines).strip(), epochs)
        self.writer.close()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """A training run's TensorBoard log, or nothing when ``log_dir`` is None: a context manager that closes the writer on every path.

    Checked and created on entry (a missing package or an unwritable directory is one line before any training); the
    writer starts at the first epoch row the run reports (a resumed run purges the killed run's later points);
    :meth:`epoch` also forwards each row to ``on_epoch``.
    """

    def __init__(self, log_dir: str | None, *, title: str, on_epoch: Any = None) -> None:
        self.log_dir, self.title, self.on_epoch = log_dir, title, on_epoch
        self.writer: EpochLog | None = None
        if log_dir:
            check_available()
            prepare_dir(log_dir)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()

    def epoch(self, row: dict[str, Any]) -> None:
        if self.log_dir and self.writer is None:
            self.writer = EpochLog(self.log_dir, first_epoch=int(row["epoch"]), title=self.title)
        if self.writer is not None:
            self.writer.epoch(row)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def finish(self, metrics: dict[str, Any], *, epochs: int) -> None:
        if self.writer is not None:
            self.writer.finish(metrics, epochs=epochs)

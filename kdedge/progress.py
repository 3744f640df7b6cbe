"""Progress a person or a CI log can read.

On a terminal a long step is a rich progress bar. Anywhere else (a CI log, ``| tee``, a file)
rich would print nothing until the end, so each step is one plain line when it *finishes*, and
a stage header when it starts: the log shows where a run is and what it has measured so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Bars on a terminal, plain lines elsewhere, or nothing.

    Args:
        enabled: False prints nothing at all (``--quiet``, non-zero DDP ranks).
        stream: Where to write (default: ``sys.stdout`` at the time of each write).
        plain: Force plain lines (True) or bars (False); default: bars only when ``stream`` is a terminal.
    """

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, plain: bool | None = None) -> None:
        self.enabled = enabled
        self._stream = stream
        self._plain = plain
        self._bar = None
        self._started: dict[int, float] = {}
        self._next_id = 0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def plain(self) -> bool:
        if self._plain is not None:
            return self._plain
        isatty = getattr(self.stream, "isatty", None)
        return not (callable(isatty) and isatty())

    def __enter__(self) -> Progress:
        if self.enabled and not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=Console(file=self.stream),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)  # type: ignore[arg-type]
            self._bar = None

    @property
    def live(self) -> bool:
        """Whether a bar is being drawn (worth updating step by step)."""
        return self._bar is not None

    def line(self, text: str) -> None:
        """One line of log (above the bars on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def add(self, description: str, total: int) -> int:
        """Start a step of ``total`` units; returns its id."""
        if self._bar is not None:
            return self._bar.add_task(description, total=total, stats="")
        self._next_id += 1
        self._started[self._next_id] = time.perf_counter()
        return self._next_id

    def update(self, task: int, *, advance: int = 0, stats: str | None = None) -> None:
        """Advance a step on the bar; plain mode waits for :meth:`finish`."""
        if self._bar is not None:
            self._bar.update(task, advance=advance, **({"stats": stats} if stats is not None else {}))  # type: ignore[arg-type]

    def finish(self, task: int, summary: str) -> None:
        """End a step: the bar shows ``summary``; plain mode prints it as one line."""
        if self._bar is not None:
            description = self._bar.tasks[[t.id for t in self._bar.tasks].index(task)].description
            self._bar.update(task, stats=summary.removeprefix(description).strip())  # type: ignore[arg-type]
        elif self.enabled:
            self.line(summary)

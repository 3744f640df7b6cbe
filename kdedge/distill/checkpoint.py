"""Per-epoch training state: written atomically, read back without unpickling code.

A checkpoint holds everything the next epoch depends on — model, optimizer, scheduler, loss
parameters (e.g. the FitNets regressor), gradient scaler, the shuffling generator and every
rank's RNG states, the history so far, the run's config and the teacher-logit cache key — so a
resumed run continues bit for bit where the killed one stopped (same threads, same hardware).

The file is a ``torch.save`` archive of tensors, numbers, strings, lists and dicts, loaded with
``torch.load(weights_only=True)``: a planted pickle payload is refused, never executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdedge._fs import atomic_file
from kdedge.errors import ConfigError

__all__ = ["FORMAT", "RESUMABLE_KEYS", "RETUNABLE_KEYS", "save_state", "load_state", "config_differences"]

FORMAT = "kdedge-train-state-v1"

#: config keys a resumed run may change: they do not alter the numbers (or are where the state lives)
RESUMABLE_KEYS = frozenset({"resume", "out", "threads", "device", "sanity_checks", "workers", "decode_cache", "log_dir"})
#: config keys a resumed run may change on purpose, altering the numbers from the resumed epoch on:
#: a lower ``--lr`` is how a run that diverged continues from its last good checkpoint.
RETUNABLE_KEYS = frozenset({"lr"})


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a reader sees the previous checkpoint or this one."""
    with atomic_file(Path(path), fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)  # as readable as the run directory (the umask's permissions)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state`; anything else is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; the run to resume never finished an epoch there — run again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ... : all are bad input here
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__  # torch's messages run to paragraphs
        raise ConfigError(f"--resume: {path} is not a readable kdedge checkpoint ({first}); remove it and run without --resume") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"--resume: {path} is not a kdedge training checkpoint (expected format {FORMAT}); remove it and run without --resume")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None, *,
                       resumable: frozenset[str] = RESUMABLE_KEYS) -> list[str]:
    """``key: saved -> current`` for every setting that changed and would change the numbers.

    A key the saved config lacks (written by a kdedge before the option existed) counts as its
    value in ``defaults``: the behaviour that kdedge had. Keys in ``resumable`` may change.
    """
    defaults = defaults or {}
    keys = sorted((set(saved) | set(current)) - resumable)
    old = {k: saved.get(k, defaults.get(k)) for k in keys}
    return [f"{k}: {old[k]!r} -> {current.get(k)!r}" for k in keys if old[k] != current.get(k)]

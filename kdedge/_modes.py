"""Train/eval mode changes that leave a model as they found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; afterwards every submodule's own flag is restored.

    ``model.train(was_training)`` would not do: it sets *every* submodule to the top module's
    flag, un-freezing a deliberately frozen BatchNorm, or putting a frozen teacher inside a
    wrapper into train mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training

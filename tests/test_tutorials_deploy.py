"""The deploying half of the tutorials (LiteRT, ExecuTorch, pruning, QAD), followed as tests/test_tutorials.py follows the rest.

A file of its own so that the two test processes share the tutorials; its working directory is its own too.
"""

from __future__ import annotations

import pytest

from test_tutorials import DEPLOY, follow_and_check


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return tmp_path_factory.mktemp("clone"), set(), {}


#: the edge runtimes each tutorial exports to (QAD's distill --qat uses torchao, which comes with ExecuTorch); pruning needs none
RUNTIMES = {"litert": ("litert",), "executorch": ("executorch",), "prune": (), "qad": ("executorch", "openvino")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.edge(*RUNTIMES[n])] if RUNTIMES[n] else []) for n in DEPLOY])
def test_tutorial(name, clone):
    follow_and_check(name, clone)

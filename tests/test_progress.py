"""Logs a person or a CI can read: plain lines when stdout is not a terminal, bars when it is."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from kdedge.exporters import export_model
from kdedge.progress import Progress

from conftest import TinyNet


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_and_bars_on_one():
    log = io.StringIO()
    with Progress(stream=log) as p:
        task = p.add("epoch 1/2", 10)
        p.update(task, advance=10, stats="loss 0.5")
        p.finish(task, "epoch 1/2  loss 0.5000")
        p.line("teacher: test accuracy 0.9409")
    assert log.getvalue() == "epoch 1/2  loss 0.5000\nteacher: test accuracy 0.9409\n"  # one line per finished step, nothing per update
    tty = _Terminal()
    with Progress(stream=tty) as p:
        task = p.add("epoch 1/2", 10)
        p.update(task, advance=10)
        p.finish(task, "done")
    assert "epoch 1/2" in tty.getvalue()  # rich drew its bar on the terminal
    quiet = io.StringIO()
    with Progress(False, stream=quiet) as p:
        p.finish(p.add("x", 1), "x")
        p.line("y")
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_distill_prints_a_line_per_epoch_and_stage_headers_in_a_pipe(tmp_path):
    """Run as CI runs it: stdout is a pipe, so every epoch shows up as it ends, not at the end of the run."""
    env = os.environ | {"KDEDGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kdedge", "distill", "--train-limit", "600", "--test-limit", "300", "--epochs", "2",
                           "--threads", "1", "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("teacher: test accuracy ") and " on 300 images, balanced " in lines[0]
    assert lines[1].startswith("teacher: scoring 600 training images once for the logit cache, in ")  # + the runtime and its rate
    assert lines[2].startswith("teacher: 600 logits in ")
    assert lines[3].startswith("epoch 1/2  loss ") and " test acc " in lines[3]
    assert lines[4].startswith("epoch 2/2  loss ")
    assert lines[-1] == f"wrote {tmp_path / 'r'}"


def test_export_prints_its_stages(tmp_path, fmnist):
    torch.manual_seed(0)
    from kdedge.models import ModelSpec, create_model

    model = create_model(ModelSpec("mlp", 0.25, 10, (1, 28, 28)))
    lines: list[str] = []
    export_model(model, tmp_path / "e", data=fmnist.limit(train=256, test=128), log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["export", "parity", "accuracy", "int8", "parity", "accuracy"]
    assert lines[3] == "int8: calibrating on 256 training images (minmax)"


def test_export_leaves_the_callers_model_as_it_was(tmp_path, fmnist):
    """export_model runs the model in eval mode on the CPU, but hands it back in the mode it came in."""
    model = TinyNet(num_classes=10, size=28)
    frozen_bn = torch.nn.BatchNorm2d(1)
    model.bn = frozen_bn
    model.train()
    frozen_bn.eval()  # a user's deliberately frozen BatchNorm inside a training model
    export_model(model, tmp_path / "e", data=fmnist.limit(train=64, test=64))
    assert model.training and not frozen_bn.training

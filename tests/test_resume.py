"""Per-epoch checkpoints and --resume: a killed run continues to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TinyNet, make_idx_dir
from kdedge.config import DistillConfig, TrainConfig
from kdedge.data import load_dataset
from kdedge.distill.checkpoint import load_state
from kdedge.distill.loop import fit
from kdedge.distill.teacher import FrozenTeacher
from kdedge.errors import ConfigError
from kdedge.distill import make_loss
from kdedge.rundir import checkpoint_path

TRAIN = ["train", "--train-limit", "3000", "--test-limit", "500", "--epochs", "3", "--threads", "1", "--quiet"]


def _kdedge(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdedge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    proc = _kdedge(*TRAIN, "--out", str(killed))
    ckpt = checkpoint_path(killed)
    deadline = time.monotonic() + 300
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(0.2)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists()  # the run directory appears only when the run completes
    assert load_state(ckpt)["epoch"] in (1, 2)  # killed during epoch 2 (or 3 on a very fast machine)

    # Starting over by accident is refused: the checkpoint would be lost.
    again = _kdedge(*TRAIN, "--out", str(killed))
    _, err = again.communicate()
    assert again.returncode == 2 and "--resume" in err and "Traceback" not in err

    resumed = _kdedge(*TRAIN, "--out", str(killed), "--resume")
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert not ckpt.parent.exists()  # removed once the run directory is written

    straight = _kdedge(*TRAIN, "--out", str(tmp_path / "straight"))
    _, err = straight.communicate()
    assert straight.returncode == 0, err

    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    import json

    history = json.loads((killed / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_idx_dir(tmp_path_factory.mktemp("tiny"), n_train=96, n_test=24)
    return load_dataset(str(root))


def _crash_after(epoch: int):
    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise KeyboardInterrupt  # a crash just after the epoch's checkpoint was written
    return on_epoch


@pytest.mark.parametrize("overrides", [
    {"loss": "hinton", "cache": "memory"},  # logits from the cache; the cache key is checked on resume
    {"loss": "fitnets", "student_layer": "conv", "teacher_layer": "conv", "augment": True, "random_erasing": 0.5},  # learned regressor, augmentation
    {"loss": "dkd", "dkd_warmup": 2.0},
    {"loss": "hinton", "cache": "memory", "views": 3, "random_erasing": 0.5, "teacher_runtime": "torch"},  # stored views drawn per epoch
])
def test_resume_in_process_is_exact(tiny, tmp_path, overrides):
    torch.manual_seed(1)
    teacher = FrozenTeacher(TinyNet())
    config = DistillConfig(data="tiny", epochs=4, batch_size=16, device="cpu", threads=1, channels_last=False, **overrides)

    def run(ckpt=None, resume=False, on_epoch=None):
        torch.manual_seed(0)
        student = TinyNet()
        fit(student, tiny.train, config=config, loss=make_loss(config), teacher=teacher, progress=False, checkpoint=ckpt, resume=resume, on_epoch=on_epoch)
        return student

    reference = run()
    ckpt = tmp_path / "state" / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, on_epoch=_crash_after(2))
    assert load_state(ckpt)["epoch"] == 2
    resumed = run(ckpt, resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_resume_refuses_a_different_config_or_teacher(tiny, tmp_path):
    config = DistillConfig(data="tiny", epochs=3, batch_size=16, device="cpu", threads=1, channels_last=False, cache="memory")
    ckpt = tmp_path / "checkpoint.pt"
    torch.manual_seed(1)
    teacher = FrozenTeacher(TinyNet())
    with pytest.raises(KeyboardInterrupt):
        fit(TinyNet(), tiny.train, config=config, loss=make_loss(config), teacher=teacher, progress=False, checkpoint=ckpt, on_epoch=_crash_after(1))

    other = DistillConfig(**(config.to_dict() | {"batch_size": 32, "temperature": 4.0}))  # (lr may change: the way on after a divergence)
    with pytest.raises(ConfigError, match=r"batch_size: 16 -> 32; temperature: 2\.0 -> 4\.0"):
        fit(TinyNet(), tiny.train, config=other, loss=make_loss(other), teacher=teacher, progress=False, checkpoint=ckpt, resume=True)

    torch.manual_seed(2)
    another_teacher = FrozenTeacher(TinyNet())
    with pytest.raises(ConfigError, match="teacher.s cached outputs differ"):
        fit(TinyNet(), tiny.train, config=config, loss=make_loss(config), teacher=another_teacher, progress=False, checkpoint=ckpt, resume=True)

    # threads may change on resume (they do not change the numbers)
    fit(TinyNet(), tiny.train, config=DistillConfig(**(config.to_dict() | {"threads": 2})), loss=make_loss(config), teacher=teacher,
        progress=False, checkpoint=ckpt, resume=True)


def test_resume_rejects_missing_damaged_and_pickled_checkpoints(tiny, tmp_path):
    config = TrainConfig(data="tiny", epochs=2, batch_size=16, device="cpu", channels_last=False)
    loss = make_loss(DistillConfig(alpha=0.0))

    def resume(path):
        fit(TinyNet(), tiny.train, config=config, loss=loss, progress=False, checkpoint=path, resume=True)

    with pytest.raises(ConfigError, match="no checkpoint at"):
        resume(tmp_path / "missing.pt")

    torn = tmp_path / "torn.pt"
    ckpt = tmp_path / "good.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(TinyNet(), tiny.train, config=config, loss=loss, progress=False, checkpoint=ckpt, on_epoch=_crash_after(1))
    torn.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="not a readable kdedge checkpoint"):
        resume(torn)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "kdedge-train-state-v1", "model": Payload()}, evil)
    with pytest.raises(ConfigError, match="not a readable kdedge checkpoint"):
        resume(evil)
    assert not marker.exists()  # refused by weights_only=True, never executed

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match="not a kdedge training checkpoint"):
        resume(foreign)


def test_resume_without_out_is_one_line(tmp_path):
    proc = _kdedge("train", "--resume", "--epochs", "1")
    _, err = proc.communicate()
    assert proc.returncode == 2
    assert err.strip().splitlines() == ["kdedge: error: --resume needs --out: the run directory the killed run was writing (its checkpoint is OUT.partial/checkpoint.pt)"]

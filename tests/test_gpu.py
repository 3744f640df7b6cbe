"""CUDA-only behaviour: fp16 autocast with a gradient scaler, bf16, and exact resume on a GPU.

Marked ``gpu``: skipped with its reason where no CUDA device is visible (CI); run by
``benchmarks/gpu_check.sh`` on a lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TinyNet, make_idx_dir
from kdedge.config import DistillConfig
from kdedge.data import load_dataset
from kdedge.distill.checkpoint import load_state
from kdedge.distill.loop import fit
from kdedge.metrics import evaluate
from kdedge.distill.teacher import FrozenTeacher
from kdedge.distill import make_loss
from kdedge.resolve import resolve_student, resolve_teacher

pytestmark = pytest.mark.gpu


@pytest.fixture
def deterministic_cuda():
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_distillation_learns_on_cuda(fmnist, precision):
    data = fmnist.limit(10000, 2000)
    teacher = resolve_teacher("resnet", data.spec).model
    student, _ = resolve_student("tiny_cnn", data.spec, 0)
    config = DistillConfig(epochs=2, device="cuda", precision=precision, cache="memory")
    history, _ = fit(student, data.train, config=config, loss=make_loss(config), teacher=FrozenTeacher(teacher, device="cuda"), progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert evaluate(student, data.test, device="cuda").accuracy > 0.80  # fp32 reaches ~0.84 here


def test_resume_with_fp16_and_grad_scaler_is_exact_on_cuda(tmp_path, deterministic_cuda):
    tiny = load_dataset(str(make_idx_dir(tmp_path / "d", n_train=96, n_test=24)))
    torch.manual_seed(1)
    teacher = FrozenTeacher(TinyNet(), device="cuda")
    config = DistillConfig(epochs=3, batch_size=16, device="cuda", precision="fp16", channels_last=False, cache="memory", augment=True)

    def run(ckpt=None, resume=False, crash=False):
        torch.manual_seed(0)
        student = TinyNet()

        def on_epoch(row):
            if crash and row["epoch"] == 1:
                raise KeyboardInterrupt

        fit(student, tiny.train, config=config, loss=make_loss(config), teacher=teacher, progress=False, checkpoint=ckpt, resume=resume, on_epoch=on_epoch)
        return student

    reference = run()
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, crash=True)
    state = load_state(ckpt)
    assert state["epoch"] == 1 and "cuda" in state["rng"] and state["scaler"]["scale"] > 0
    resumed = run(ckpt, resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)



@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_search_times_candidates_on_torch_cuda(precision):
    """Issue 27, item 1: the GPU targets are search targets where a GPU exists. Each call is timed to the end of the GPU's work
    (the meter synchronizes), so a model with more work takes longer: resnet's 52 MFLOPs against mlp@0.5's 0.1 at batch 256."""
    import numpy as np

    from kdedge.models import ModelSpec
    from kdedge.models.zoo import parse_model_name
    from kdedge.search.latency import LatencyMeter

    x = np.random.default_rng(0).standard_normal((256, 1, 28, 28)).astype(np.float32)
    specs = {n: ModelSpec(*parse_model_name(n), 10, (1, 28, 28)) for n in ("mlp@0.5", "resnet")}
    meter = LatencyMeter(x, num_classes=10, target="torch-cuda", precision=precision, batch=256, rounds=3)
    lat = meter.measure(specs)
    assert 0 < lat["mlp@0.5"]["p50_ms"] < lat["resnet"]["p50_ms"]

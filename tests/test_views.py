"""Cached teacher views (issue 16): stored augmented views, the teacher's outputs on them, and the fast teacher pass."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdedge.config import DistillConfig
from kdedge.data import load_folder, load_idx_dir
from kdedge.data.folders import write_image_folder
from kdedge.distill import FrozenTeacher, fit
from kdedge.distill.augment import VIEW_FIELDS, apply_views, augment_batch, sample_views
from kdedge.distill.factory import make_loss
from kdedge.distill.teacher_pass import teacher_pass
from kdedge.distill.views import TeacherViews, ViewRecipe, full_logits, teacher_views, view_cache_key
from kdedge.errors import ConfigError
from kdedge.progress import Progress

views_mod = importlib.import_module("kdedge.distill.views")  # the module (kdedge.distill is also a function's name)

from conftest import TinyNet, make_idx_dir

RECIPE = ViewRecipe(views=3, erasing=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_idx_dir(make_idx_dir(tmp_path_factory.mktemp("tiny"), n_train=50, n_test=20))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(3)
    return FrozenTeacher(TinyNet())


def _fresh_logp(teacher: FrozenTeacher, data, found: TeacherViews, index: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the teacher computes now on the stored views, and what the cache says it computed."""
    rows, stored = found.rows(index, view)
    x = next(iter(data.batches([index])))[1]
    return torch.log_softmax(teacher(apply_views(x, rows, pad=found.recipe.pad)), 1), stored


def test_augment_batch_is_sample_then_apply():
    x = torch.randn(32, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    direct = augment_batch(x, torch.Generator().manual_seed(5), erasing=0.5)
    views = sample_views(32, 9, 7, torch.Generator().manual_seed(5), erasing=0.5)
    assert views.dtype == torch.int16 and views.shape == (32, len(VIEW_FIELDS))
    assert torch.equal(apply_views(x, views), direct)


def test_view_rows_mean_what_they_say():
    """Golden: a hand-written view row renders as a shift, a mirror and one zeroed rectangle."""
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5) + 1
    row = torch.tensor([[1, 3, 1, 0, 0, 2, 1]], dtype=torch.int16)  # shift up-left by (1, -1) of pad 2, flip, erase rows 0-1 of column 0
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    want = padded[..., 1:6, 3:8].flip(-1).clone()
    want[..., 0:2, 0:1] = 0
    assert torch.equal(apply_views(x, row, pad=2), want)


def test_each_stored_output_is_the_teachers_output_on_that_rendered_view(tiny, teacher, tmp_path):
    """The student renders exactly the pixels the teacher scored: parity on every view of every image."""
    found = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    n = len(tiny.train)
    index, view = torch.arange(n).repeat_interleave(3), torch.arange(3).repeat(n)
    fresh, stored = _fresh_logp(teacher, tiny.train, found, index, view)
    torch.testing.assert_close(stored, fresh, atol=2e-3, rtol=1e-3)  # fp16 storage of log-probabilities
    rows = found.rows(index, view)[0]
    assert len({tuple(r) for r in rows.tolist()}) > n  # views differ within an image
    assert (rows[:, 5] > 0).float().mean().item() == pytest.approx(0.5, abs=0.15)  # erasing p 0.5


def test_disk_hit_memory_map_and_key(tiny, teacher, tmp_path):
    first = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    second = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    assert not first.hit and second.hit and first.key == second.key
    assert isinstance(second.log_probs, np.memmap) and second.path == tmp_path / first.key
    assert sorted(p.name for p in second.path.iterdir()) == ["logp.npy", "meta.json", "progress.json", "views.npy"]
    meta = json.loads((second.path / "meta.json").read_text())
    assert meta["images"] == 50 and meta["recipe"]["views"] == 3 and meta["view_fields"] == list(VIEW_FIELDS)
    # 50 images x 3 views: 7 int16 parameters and 3 fp16 log-probabilities each.
    assert second.nbytes == 50 * 3 * (7 * 2 + 3 * 2)
    keys = {view_cache_key(teacher, tiny.train, r) for r in (RECIPE, ViewRecipe(views=4, erasing=0.5), ViewRecipe(views=3), ViewRecipe(views=3, erasing=0.5, seed=1))}
    assert len(keys) == 4
    other = FrozenTeacher(TinyNet())
    assert view_cache_key(other, tiny.train, RECIPE) != first.key


def test_a_killed_pass_resumes_where_it_stopped(tiny, teacher, tmp_path, monkeypatch):
    whole = teacher_views(teacher, tiny.train, RECIPE, runtime="torch", batch_size=30)  # in memory, uninterrupted
    real, calls = views_mod._score, []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(views_mod, "_score", dies_on_the_third_batch)
    monkeypatch.setattr(views_mod.time, "monotonic", lambda: float(len(calls)) * 20)  # the progress count is saved after every batch
    with pytest.raises(KeyboardInterrupt):
        teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch", batch_size=30)  # 10 images (30 views) per batch
    partial = tmp_path / f"{whole.key}.partial"
    assert json.loads((partial / "progress.json").read_text()) == {"images": 20}
    monkeypatch.setattr(views_mod, "_score", real)
    lines: list[str] = []
    progress = Progress(False)
    progress.line = lines.append  # type: ignore[method-assign]
    resumed = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch", batch_size=30, progress=progress)
    assert any("resuming after 20 of 50 images" in line for line in lines)
    assert not partial.exists() and resumed.path == tmp_path / whole.key
    assert np.array_equal(np.asarray(resumed.view_rows), whole.view_rows) and np.array_equal(np.asarray(resumed.log_probs), whole.log_probs)


def test_torn_and_foreign_caches_are_scored_again(tiny, teacher, tmp_path):
    found = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    good = np.asarray(found.log_probs).copy()
    logp = found.path / "logp.npy"
    del found
    logp.write_bytes(logp.read_bytes()[:100])  # torn
    again = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    assert not again.hit and np.array_equal(np.asarray(again.log_probs), good)
    del again
    np.save(logp, np.zeros_like(good), allow_pickle=False)  # the right shape, another teacher's numbers
    third = teacher_views(teacher, tiny.train, RECIPE, cache_dir=tmp_path, runtime="torch")
    assert not third.hit and np.array_equal(np.asarray(third.log_probs), good)


def test_top_k_rows_golden():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    full = full_logits(logp, torch.tensor([[2, 0]], dtype=torch.int16), 4)
    torch.testing.assert_close(full.exp(), torch.tensor([[0.3, 0.1, 0.5, 0.1]]))  # the other 0.2 split over classes 1 and 3


def test_top_k_views_keep_the_top_classes(tiny, teacher, tmp_path):
    found = teacher_views(teacher, tiny.train, ViewRecipe(views=2, topk=2), cache_dir=tmp_path, runtime="torch")
    assert found.classes is not None and found.log_probs.shape == (50, 2, 2)
    index, view = torch.arange(50), torch.zeros(50, dtype=torch.long)
    fresh, stored = _fresh_logp(teacher, tiny.train, found, index, view)
    top = fresh.topk(2, dim=1)
    torch.testing.assert_close(stored.gather(1, top.indices), top.values, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(stored.exp().sum(1), torch.ones(50))


def test_image_folder(fmnist, tmp_path):
    images, labels = fmnist.train.images[:40, 0].numpy(), fmnist.train.labels[:40].numpy() % 3
    for split in ("train", "test"):
        write_image_folder(tmp_path / "f", split, images, labels, ("a", "b", "c"))
    data = load_folder(tmp_path / "f")
    torch.manual_seed(0)
    teacher = FrozenTeacher(TinyNet(size=28))
    found = teacher_views(teacher, data.train, RECIPE, cache_dir=tmp_path / "c", runtime="torch")
    index, view = torch.arange(40), torch.arange(40) % 3
    fresh, stored = _fresh_logp(teacher, data.train, found, index, view)
    torch.testing.assert_close(stored, fresh, atol=2e-3, rtol=1e-3)


def test_distillation_trains_on_the_stored_views_without_running_the_teacher(tiny):
    class Counting(TinyNet):
        samples = 0

        def forward(self, x):
            Counting.samples += x.shape[0]
            return super().forward(x)

    torch.manual_seed(3)
    teacher = FrozenTeacher(Counting())
    config = DistillConfig(data="tiny", epochs=3, batch_size=16, device="cpu", threads=1, channels_last=False, cache="memory", views=3,
                           random_erasing=0.5, teacher_runtime="torch")
    torch.manual_seed(0)
    history, used = fit(TinyNet(), tiny.train, config=config, loss=make_loss(config), teacher=teacher, test=tiny.test, progress=False)
    assert isinstance(used, TeacherViews) and used.recipe == ViewRecipe(views=3, erasing=0.5)
    assert Counting.samples == 50 * 3  # one pass over 3 views of 50 images; the epochs read the stored outputs
    assert all(math.isfinite(h["train_kd_loss"]) and h["train_kd_loss"] > 0 for h in history)


@pytest.mark.parametrize("overrides, match", [
    ({"views": 2, "loss": "fitnets", "student_layer": "a", "teacher_layer": "b"}, "views store the teacher's outputs"),
    ({"views": 2, "cache": "off"}, "views are a cache"),
    ({"views": -1}, "views must be >= 0"),
    ({"view_topk": -2}, "view_topk must be >= 0"),
    ({"view_topk": 3}, "view_topk 3 applies to stored views"),
    ({"teacher_runtime": "tvm"}, "teacher_runtime"),
])
def test_bad_view_settings_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**overrides)


def test_views_without_a_teacher_loss_still_augment(tiny):
    """alpha 0 reads no soft targets, so no views are stored, but --views still means augmented inputs: the same steps as --augment."""
    def run(**overrides):
        config = DistillConfig(data="tiny", epochs=2, batch_size=16, device="cpu", threads=1, channels_last=False, alpha=0.0, random_erasing=0.5,
                               **overrides)
        torch.manual_seed(0)
        student = TinyNet()
        _history, used = fit(student, tiny.train, config=config, loss=make_loss(config), progress=False)
        assert used is None
        return student.state_dict()

    views, augmented, plain = run(views=3), run(augment=True), run()
    assert all(torch.equal(views[k], augmented[k]) for k in views)
    assert not all(torch.equal(views[k], plain[k]) for k in views)


def test_views_need_addressable_samples(tiny, teacher):
    config = DistillConfig(data="tiny", epochs=1, device="cpu", cache="memory", views=2)
    plain = torch.utils.data.TensorDataset(tiny.train.inputs(), tiny.train.labels)
    with pytest.raises(ConfigError, match="--views needs a kdedge dataset"):
        fit(TinyNet(), plain, config=config, loss=make_loss(config), teacher=teacher, progress=False)


def test_teacher_pass_matches_torch_and_reports_both_runtimes(tiny, teacher):
    probe = tiny.train.inputs()[:32]
    chosen = teacher_pass(teacher, probe)
    assert {r.runtime for r in chosen.rates} == {"torch", "onnxruntime"} and all(r.images_per_s > 0 for r in chosen.rates)
    ort = next(r for r in chosen.rates if r.runtime == "onnxruntime")
    assert ort.max_abs_diff is not None and ort.max_abs_diff <= 1e-4
    assert chosen.runtime == max(chosen.rates, key=lambda r: r.images_per_s).runtime
    forced = teacher_pass(teacher, probe, runtime="onnxruntime")
    torch.testing.assert_close(forced(probe), teacher(probe), atol=1e-4, rtol=0)
    assert teacher_pass(teacher, probe, runtime="torch").runtime == "torch"


class _ExportsDifferently(TinyNet):
    """Computes other logits when traced for ONNX (by TorchScript's exporter or torch.export): the parity check must catch it."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1.01 if torch.jit.is_tracing() or torch.compiler.is_exporting() else out


class _TracesDifferently(TinyNet):
    """Differs only under TorchScript's tracer: torch.export's ONNX computes what torch computes."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1.01 if torch.jit.is_tracing() else out


def test_a_trace_that_differs_is_retried_with_the_dynamo_export(tiny):
    torch.manual_seed(0)
    t = FrozenTeacher(_TracesDifferently())
    probe = tiny.train.inputs()[:32]
    chosen = teacher_pass(t, probe, runtime="onnxruntime")
    assert chosen.runtime == "onnxruntime"
    torch.testing.assert_close(chosen(probe), t(probe), atol=1e-4, rtol=0)


class _Untraceable(TinyNet):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return super().forward(x)
        return -super().forward(x)


@pytest.mark.parametrize("net, note", [(_ExportsDifferently, "max |Δ|"), (_Untraceable, "cannot export")])
def test_teacher_pass_falls_back_to_torch(tiny, net, note):
    torch.manual_seed(0)
    t = FrozenTeacher(net())
    probe = tiny.train.inputs()[:32]
    chosen = teacher_pass(t, probe)
    assert chosen.runtime == "torch"
    assert note in next(r for r in chosen.rates if r.runtime == "onnxruntime").note
    torch.testing.assert_close(chosen(probe), t(probe), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="teacher_runtime onnxruntime: .*use --teacher-runtime torch"):
        teacher_pass(t, probe, runtime="onnxruntime")


def test_teacher_pass_leaves_an_onnx_teacher_as_it_is(tiny, tmp_path):
    from kdedge.exporters.onnx import export_onnx
    from kdedge.models.onnx_teacher import OnnxTeacherModule

    torch.manual_seed(0)
    path = export_onnx(TinyNet(), tmp_path / "t.onnx", input_shape=(1, 8, 8)).path
    chosen = teacher_pass(FrozenTeacher(OnnxTeacherModule(path, input_shape=(1, 8, 8), num_classes=3)), tiny.train.inputs()[:8])
    assert chosen.runtime == "torch" and chosen.rates[0].note == "already onnxruntime"


def test_stored_views_teach_a_student_on_real_data(fmnist):
    """Threshold on real data: 3,000 Fashion-MNIST images, 3 epochs; the stored views train the student above 75 %."""
    data_train, data_test = fmnist.train.take(3000), fmnist.test.take(1000)
    torch.manual_seed(0)
    teacher_net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    sup = DistillConfig(epochs=2, alpha=0.0, device="cpu", threads=2, cache="off")
    fit(teacher_net, data_train, config=sup, loss=make_loss(sup), progress=False)
    config = DistillConfig(epochs=6, device="cpu", threads=2, cache="memory", views=2, random_erasing=0.25, teacher_runtime="torch")
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    history, used = fit(student, data_train, config=config, loss=make_loss(config), teacher=FrozenTeacher(teacher_net), test=data_test, progress=False)
    assert isinstance(used, TeacherViews) and history[-1]["test_accuracy"] > 0.70, history[-1]["test_accuracy"]

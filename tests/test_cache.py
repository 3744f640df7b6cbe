"""The teacher-logit cache: correct logits, keyed by teacher and data, never for augmented inputs."""

import numpy as np
import torch
from torch import nn

from kdedge.config import DistillConfig
from kdedge.data import ArrayDataset, load_idx_dir
from kdedge.distill import FrozenTeacher, HintonLoss, fit, logit_cache_key, teacher_logits

from conftest import TinyNet, make_idx_dir


class CountingNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.samples = 0

    def forward(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        return super().forward(x)


def _data(tmp_path, seed=0):
    return load_idx_dir(make_idx_dir(tmp_path / f"d{seed}", seed=seed))


def test_cached_logits_equal_direct_inference(tmp_path):
    data = _data(tmp_path)
    torch.manual_seed(0)
    teacher = FrozenTeacher(TinyNet())
    cached = teacher_logits(teacher, data.train, cache_dir=tmp_path / "cache", batch_size=7)
    with torch.no_grad():
        direct = teacher.model(data.train.inputs())
    torch.testing.assert_close(cached.tensor(), direct, atol=1e-6, rtol=0)
    idx = torch.tensor([5, 0, 59])
    torch.testing.assert_close(cached[idx], direct[idx], atol=1e-6, rtol=0)
    assert not cached.hit and cached.path.is_file()


def test_disk_cache_hit_skips_the_teacher(tmp_path):
    data = _data(tmp_path)
    net = CountingNet()
    first = teacher_logits(FrozenTeacher(net), data.train, cache_dir=tmp_path / "c")
    calls = net.calls
    samples = int(net.samples)  # the teacher pass's ONNX trace ran forward too, and left a traced 0-d tensor here (+= adds in place)
    second = teacher_logits(FrozenTeacher(net), data.train, cache_dir=tmp_path / "c")
    # A hit costs one probe batch of 8 samples (the check that the cache is this teacher's), not a pass.
    assert second.hit and net.calls == calls + 1 and net.samples - samples == 8
    assert second.key == first.key
    torch.testing.assert_close(second.tensor(), first.tensor())


def test_key_changes_with_teacher_weights(tmp_path):
    data = _data(tmp_path)
    torch.manual_seed(0)
    net = TinyNet()
    key = logit_cache_key(FrozenTeacher(net), data.train)
    with torch.no_grad():
        net.fc.bias[0] += 1e-3
    assert logit_cache_key(FrozenTeacher(net), data.train) != key


def test_key_changes_with_batchnorm_statistics(tmp_path):
    data = _data(tmp_path)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(2, 1, 8, 8))
    key = logit_cache_key(FrozenTeacher(net), data.train)
    net[1].running_mean += 0.1  # buffers, not parameters, changed
    assert logit_cache_key(FrozenTeacher(net), data.train) != key


def test_key_changes_with_data(tmp_path):
    a, b = _data(tmp_path, 0), _data(tmp_path, 1)
    teacher = FrozenTeacher(TinyNet())
    assert logit_cache_key(teacher, a.train) != logit_cache_key(teacher, b.train)
    # One changed pixel is a different dataset.
    images = a.train.images.clone()
    images[0, 0, 0, 0] ^= 1
    changed = ArrayDataset(images, a.train.labels, a.spec)
    assert logit_cache_key(teacher, changed) != logit_cache_key(teacher, a.train)


def test_torn_cache_file_is_recomputed(tmp_path):
    data = _data(tmp_path)
    teacher = FrozenTeacher(TinyNet())
    first = teacher_logits(teacher, data.train, cache_dir=tmp_path / "c")
    expected = first.tensor().clone()  # `first` maps the file that is overwritten in place next
    np.save(first.path, np.zeros((3, 3), np.float32))  # wrong shape: e.g. another tool wrote it
    again = teacher_logits(teacher, data.train, cache_dir=tmp_path / "c")
    assert not again.hit
    torch.testing.assert_close(again.tensor(), expected)


def _distill(tmp_path, *, augment):
    data = _data(tmp_path)
    teacher_net = CountingNet()
    cfg = DistillConfig(epochs=3, batch_size=16, augment=augment, device="cpu", lr=0.01, teacher_runtime="torch")  # torch: the counting net sees the pass
    history, cached = fit(TinyNet(), data.train, config=cfg, loss=HintonLoss(0.5, 2.0), teacher=FrozenTeacher(teacher_net),
                          cache_dir=tmp_path / "cache", progress=False)
    return teacher_net, history, cached, data


def test_cache_means_one_teacher_pass(tmp_path):
    teacher_net, history, cached, data = _distill(tmp_path, augment=False)
    assert cached is not None
    assert teacher_net.samples == len(data.train)  # once over the data, not once per epoch
    assert all(h["train_kd_loss"] > 0 for h in history)


def test_augmentation_never_uses_the_cache(tmp_path):
    teacher_net, history, cached, data = _distill(tmp_path, augment=True)
    assert cached is None
    assert teacher_net.samples == 3 * len(data.train)  # the teacher saw every augmented batch
    assert not list((tmp_path / "cache").glob("*.npy"))


class Unnormalizing(TinyNet):
    """The same weights as TinyNet, another forward: a teacher wrapped to undo a normalization."""

    def forward(self, x):
        return super().forward(x * 0.3530 + 0.2860)


def test_same_weights_other_forward_gets_another_key(tmp_path):
    """The cache keys what the teacher computes: equal state dicts, different forward -> different keys."""
    data = _data(tmp_path)
    torch.manual_seed(0)
    plain = TinyNet()
    wrapped = Unnormalizing()
    wrapped.load_state_dict(plain.state_dict())
    assert FrozenTeacher(plain).fingerprint() == FrozenTeacher(wrapped).fingerprint()  # the weights are the same
    assert logit_cache_key(FrozenTeacher(plain), data.train) != logit_cache_key(FrozenTeacher(wrapped), data.train)
    patched = TinyNet()
    patched.load_state_dict(plain.state_dict())
    patched.forward = lambda x: TinyNet.forward(patched, 2 * x)  # an instance whose forward was replaced
    assert logit_cache_key(FrozenTeacher(patched), data.train) != logit_cache_key(FrozenTeacher(plain), data.train)
    twin = TinyNet()
    twin.load_state_dict(plain.state_dict())
    assert logit_cache_key(FrozenTeacher(twin), data.train) == logit_cache_key(FrozenTeacher(plain), data.train)  # same computation, same key


def test_a_cache_file_that_is_not_this_teachers_is_recomputed(tmp_path):
    """Even under the right key, logits that differ from the teacher's own outputs on the probe are not used."""
    data = _data(tmp_path)
    torch.manual_seed(0)
    teacher = FrozenTeacher(TinyNet())
    first = teacher_logits(teacher, data.train, cache_dir=tmp_path / "c")
    expected = first.tensor().clone()  # `first` maps the file that is overwritten in place next
    np.save(first.path, (expected.numpy() + 1.0).astype(np.float32))  # someone else's logits under this key
    second = teacher_logits(teacher, data.train, cache_dir=tmp_path / "c")
    assert not second.hit
    torch.testing.assert_close(second.tensor(), expected)
    torch.testing.assert_close(torch.from_numpy(np.load(first.path)), expected)  # and the file is repaired

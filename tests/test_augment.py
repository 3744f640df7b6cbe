"""Batch augmentation: shapes, seeded reproducibility, and what each transform does to pixels."""

import torch

from kdedge.distill import augment_batch


def _x():
    return torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)


def test_identity_when_everything_is_off():
    x = _x()
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)


def test_crop_is_a_shift_of_the_edge_padded_image():
    x = _x()
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(x.shape[0]):  # every output sample is some 5x5 window of its padded input
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_is_horizontal_mirror_or_identity():
    x = _x()
    out = augment_batch(x, torch.Generator().manual_seed(2), pad=0, flip=True)
    for i in range(x.shape[0]):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def test_erasing_zeroes_a_rectangle():
    x = torch.ones(64, 1, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=0, flip=False, erasing=1.0)
    erased = out == 0
    assert erased.any(dim=(1, 2, 3)).all()  # every sample lost a rectangle
    assert (erased.float().mean(dim=(1, 2, 3)) <= 0.5).all()


def test_seeded():
    x = torch.randn(16, 1, 12, 12)
    a = augment_batch(x, torch.Generator().manual_seed(7), erasing=0.5)
    b = augment_batch(x, torch.Generator().manual_seed(7), erasing=0.5)
    assert torch.equal(a, b) and a.shape == x.shape

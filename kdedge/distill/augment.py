"""Batch-level augmentation on normalized ``(B, C, H, W)`` tensors, on any device.

An augmentation is two steps: :func:`sample_views` draws each sample's *view* — its crop offset,
flip and erasing box — as a row of integers, and :func:`apply_views` renders those views from the
images. Kept apart, a view can be stored and rendered again bit for bit: the teacher-view cache
(:mod:`kdedge.distill.views`) scores a view once and the student sees exactly that image later.

Random parameters come from a CPU ``torch.Generator`` so a seed gives the same augmentations on
CPU and GPU; the pixel work runs wherever the batch lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["VIEW_FIELDS", "apply_views", "augment_batch", "sample_views"]

#: The columns of a view row: crop offset (``dy``, ``dx``) into the edge-padded image, horizontal
#: flip (0/1), and the erased rectangle (top, left, height, width; height 0 = nothing erased).
VIEW_FIELDS = ("dy", "dx", "flip", "erase_y", "erase_x", "erase_h", "erase_w")


def sample_views(n: int, height: int, width: int, generator: torch.Generator, *, pad: int = 2, flip: bool = True,
                 erasing: float = 0.0) -> torch.Tensor:
    """Draw ``n`` random views; returns ``(n, 7)`` int16 rows laid out as :data:`VIEW_FIELDS`.

    Args:
        n: How many views.
        height: Image height the views are for.
        width: Image width.
        generator: CPU generator for the random parameters.
        pad: Maximum shift in pixels of the random crop (0 disables it: offset ``pad`` = no shift).
        flip: Flip each view horizontally with probability 1/2.
        erasing: Probability of erasing one random rectangle per view, covering 2–25 % of the
            image (Zhong et al., 2020).
    """
    h, w = height, width
    views = torch.zeros(n, len(VIEW_FIELDS), dtype=torch.int64)
    views[:, 0:2] = pad  # no shift
    if pad > 0:
        views[:, 0] = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        views[:, 1] = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    if flip:
        views[:, 2] = (torch.rand(n, generator=generator) < 0.5).long()
    if erasing > 0:
        area = torch.empty(n).uniform_(0.02, 0.25, generator=generator)
        ratio = torch.exp(torch.empty(n).uniform_(-1.2, 1.2, generator=generator))  # log-uniform in [0.3, 3.3]
        eh = (area * h * w * ratio).sqrt().round().clamp(1, h).long()
        ew = (area * h * w / ratio).sqrt().round().clamp(1, w).long()
        y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
        apply = (torch.rand(n, generator=generator) < erasing).long()
        views[:, 3], views[:, 4], views[:, 5], views[:, 6] = y0, x0, eh * apply, ew * apply
    return views.to(torch.int16)


def apply_views(x: torch.Tensor, views: torch.Tensor, *, pad: int = 2) -> torch.Tensor:
    """Render ``views`` (``(B, 7)`` rows from :func:`sample_views`) of the normalized images ``x`` ``(B, C, H, W)``.

    The crop takes an ``H x W`` window of the image edge-padded by ``pad``, the flip mirrors it,
    and erasing sets the rectangle to 0 (the normalized mean). Deterministic: the same images and
    rows give the same pixels.
    """
    b, c, h, w = x.shape
    dev = x.device
    flipped_any, erased_any = bool(views[:, 2].any()), bool((views[:, 5] > 0).any())  # decided on the rows' device (the CPU): no GPU sync
    v = views.to(device=dev, dtype=torch.long)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H+2p, W+2p)
        rows = (v[:, 0, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (v[:, 1, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]
    if flipped_any:
        x = torch.where(v[:, 2].bool()[:, None, None, None], x.flip(-1), x)
    if erased_any:
        ar = torch.arange(h, device=dev)[None, :]
        ac = torch.arange(w, device=dev)[None, :]
        in_rows = (ar >= v[:, 3, None]) & (ar < (v[:, 3] + v[:, 5])[:, None])  # (B, H)
        in_cols = (ac >= v[:, 4, None]) & (ac < (v[:, 4] + v[:, 6])[:, None])  # (B, W)
        x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)  # (B, 1, H, W) over channels
    return x


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, pad: int = 2, flip: bool = True, erasing: float = 0.0) -> torch.Tensor:
    """Random crop (edge-padded by ``pad``), horizontal flip and random erasing: fresh views of ``x``.

    Args:
        x: Normalized inputs ``(B, C, H, W)``.
        generator: CPU generator for the random parameters.
        pad: Maximum shift in pixels of the random crop (0 disables it).
        flip: Flip each sample horizontally with probability 1/2.
        erasing: Probability of erasing one random rectangle per sample (see :func:`sample_views`).
    """
    b, _c, h, w = x.shape
    return apply_views(x, sample_views(b, h, w, generator, pad=pad, flip=flip, erasing=erasing), pad=pad)

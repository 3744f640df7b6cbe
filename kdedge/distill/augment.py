"""Batch-level augmentation on normalized ``(B, C, H, W)`` tensors, on any device.

Random parameters come from a CPU ``torch.Generator`` so a seed gives the same augmentations on
CPU and GPU; the pixel work runs wherever the batch lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment_batch"]


def _randint(high: int, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (size,), generator=generator).to(device)


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, pad: int = 2, flip: bool = True, erasing: float = 0.0) -> torch.Tensor:
    """Random crop (edge-padded by ``pad``), horizontal flip and random erasing.

    Args:
        x: Normalized inputs ``(B, C, H, W)``.
        generator: CPU generator for the random parameters.
        pad: Maximum shift in pixels of the random crop (0 disables it).
        flip: Flip each sample horizontally with probability 1/2.
        erasing: Probability of zeroing (the normalized mean) one random rectangle per sample,
            covering 2–25 % of the image (Zhong et al., 2020).
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H+2p, W+2p)
        dy = _randint(2 * pad + 1, b, generator, dev)
        dx = _randint(2 * pad + 1, b, generator, dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(dev)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    if erasing > 0:
        area = torch.empty(b).uniform_(0.02, 0.25, generator=generator)
        ratio = torch.exp(torch.empty(b).uniform_(-1.2, 1.2, generator=generator))  # log-uniform in [0.3, 3.3]
        eh = (area * h * w * ratio).sqrt().round().clamp(1, h).long()
        ew = (area * h * w / ratio).sqrt().round().clamp(1, w).long()
        y0 = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
        x0 = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
        apply = torch.rand(b, generator=generator) < erasing
        ar = torch.arange(h)[None, :]
        ac = torch.arange(w)[None, :]
        in_rows = (ar >= y0[:, None]) & (ar < (y0 + eh)[:, None])  # (B, H)
        in_cols = (ac >= x0[:, None]) & (ac < (x0 + ew)[:, None])  # (B, W)
        erase = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]).to(dev)  # (B, H, W)
        x = x.masked_fill(erase[:, None], 0.0)
    return x

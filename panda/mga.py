"""The Mask Guidance Adapter (``ddpm.py:MGA``, PANDA_SPEC.md section 3(b)): conv3x3 8->64->256->512->256->64
(BatchNorm + ReLU each), conv1x1 64->4, on concat(UNet eps, mask repeated to 4 channels). Its output replaces the
UNet's eps prediction (no residual)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

MGA_WIDTHS = (64, 256, 512, 256, 64)
MGA_KERNEL = 3


class MGA(nn.Module):
    """eps_hat = conv(cat[eps, mask x C]); state_dict keys ``conv.<n>.*`` as the release (2 662 532 parameters)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        width = 2 * channels
        for out in MGA_WIDTHS:  # created in the release's order: conv, bn, relu, ... (the seeded init depends on it)
            layers += [nn.Conv2d(width, out, MGA_KERNEL, padding=MGA_KERNEL // 2), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        layers.append(nn.Conv2d(width, channels, 1))
        self.conv = nn.Sequential(*layers)
        self.channels = channels

    def forward(self, eps: Tensor, mask: Tensor) -> Tensor:
        """eps [B, C, h, w], mask [B, 1, h, w] (binary or soft) -> eps_hat [B, C, h, w]."""
        return self.conv(torch.cat([eps, mask.repeat(1, self.channels, 1, 1)], 1))

"""The autoencoder probe of the image-to-image tasks (paper appendix A), scaled to the image.

Appendix A gives the encoder: one convolution (16 output channels, kernel 5, zero padding 2,
stride 4) and two linear layers, (262144, 512) and (512, 128) for 3 x 512 x 512 images, i.e.
16 (H/4)(W/4) -> 512 -> 128. The decoder is not given; here it is two linear layers, code -> hidden -> C H W,
reshaped to the image (a convolutional decoder at full resolution cost ten times the rest of
the probe on a CPU, for these small images). The hidden and
code widths shrink with the image: ``hidden`` is the largest power of two at most
16 (H/4)(W/4) / 3, capped at 512, and ``code = hidden / 4``; that gives the paper's 512 and 128
at 512 x 512, and 784 -> 256 -> 64 for 28 x 28 digits.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS = 16
STRIDE = 4


class AutoencoderProbe(nn.Module):
    """Conv(C -> 16, k5, s4, p2) -> Linear -> Linear (the code) -> Linear -> Linear (C H W
    values) -> reshape, ReLU between layers and none at the output.

    Input and output: (N, C, H, W) with H and W multiples of 4.
    """

    def __init__(self, image_shape: tuple[int, ...], hidden: int, code: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height % STRIDE or width % STRIDE:
            raise ValueError(
                f"the autoencoder probe needs image sides that are multiples of {STRIDE}, got {height}x{width}"
            )
        flat = CHANNELS * (height // STRIDE) * (width // STRIDE)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, CHANNELS, 5, stride=STRIDE, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Linear(hidden, code),
        )
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.Linear(code, hidden),
            nn.ReLU(),
            nn.Linear(hidden, channels * height * width),
            nn.Unflatten(1, (channels, height, width)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def autoencoder_widths(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(hidden, code) for images of ``image_shape`` (see the module doc)."""
    _, height, width = image_shape
    flat = CHANNELS * (height // STRIDE) * (width // STRIDE)
    hidden = min(512, 1 << max(2, (flat // 3).bit_length() - 1))
    return hidden, hidden // 4


def make_autoencoder(image_shape: tuple[int, ...], *, seed: int | None = None) -> AutoencoderProbe:
    """A fresh probe for ``image_shape`` (C, H, W); with ``seed`` its initialisation comes from
    that seed without touching the global random state."""
    hidden, code = autoencoder_widths(image_shape)
    if seed is None:
        return AutoencoderProbe(tuple(image_shape), hidden, code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderProbe(tuple(image_shape), hidden, code)

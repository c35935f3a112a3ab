"""Image filters that turn an image into a dense target or a degraded input (§4.4's tasks).

Every function takes a batch of images ``(N, C, H, W)`` float (values in [0, 1]) and returns a
tensor of the same shape; channels are filtered independently, borders are replicated, so that
every output pixel sees a full neighbourhood. The filters are the usual textbook ones (Sobel,
Gaussian, Laplacian of Gaussian, Harris), written with ``conv2d`` and fixed kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(K,) normalised 1-D Gaussian of standard deviation ``sigma`` pixels, K = 2 ceil(3σ) + 1."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _filter(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of ``images`` (N, C, H, W) with the 2-D ``kernel`` (kh, kw), odd
    sides, replicated borders."""
    channels = images.shape[1]
    kh, kw = kernel.shape
    padded = F.pad(images, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    weight = kernel.to(images).expand(channels, 1, kh, kw)
    return F.conv2d(padded, weight, groups=channels)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels."""
    g = gaussian_kernel(sigma, images.dtype)
    return _filter(_filter(images, g[None, :]), g[:, None])


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
"""Sobel derivative along the width, scaled so that a unit ramp has derivative 1 per pixel."""


def gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dy) by the Sobel operator, per pixel."""
    return _filter(images, SOBEL_X), _filter(images, SOBEL_X.T)


def edge_strength(images: torch.Tensor) -> torch.Tensor:
    """2-D edges: the Sobel gradient magnitude sqrt(gx² + gy²)."""
    gx, gy = gradients(images)
    return torch.sqrt(gx.square() + gy.square())


def laplacian_of_gaussian(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Second-derivative curvature: the 5-point Laplacian of the image blurred by ``sigma``
    (positive in dark valleys, negative on bright ridges)."""
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return _filter(gaussian_blur(images, sigma), laplace)


def harris_response(images: torch.Tensor, sigma: float = 1.0, k: float = 0.05) -> torch.Tensor:
    """2-D keypoints: the Harris corner response det(M) - k tr(M)² of the structure tensor M
    (products of Sobel gradients averaged by a Gaussian window of ``sigma``), kept where it is
    positive (corners; edges and flat regions give 0)."""
    gx, gy = gradients(images)
    xx = gaussian_blur(gx * gx, sigma)
    yy = gaussian_blur(gy * gy, sigma)
    xy = gaussian_blur(gx * gy, sigma)
    response = xx * yy - xy.square() - k * (xx + yy).square()
    return response.clamp_min(0.0)


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """The images plus Gaussian noise of standard deviation ``std`` (not clipped)."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + std * noise.to(images.device)


def mask_square(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """The images with one ``side`` x ``side`` square per image set to 0, at a position drawn
    uniformly among those fully inside the central half of the image (where the content is)."""
    n, _, h, w = images.shape
    if side >= min(h, w):
        raise ValueError(f"the mask side {side} must be smaller than the image ({h}x{w})")
    low_y, low_x = h // 4, w // 4
    high_y, high_x = max(low_y, h - h // 4 - side), max(low_x, w - w // 4 - side)
    top = torch.randint(low_y, high_y + 1, (n,), generator=generator)
    left = torch.randint(low_x, high_x + 1, (n,), generator=generator)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    hole = (
        (rows >= top[:, None, None])
        & (rows < (top + side)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + side)[:, None, None])
    )
    return images.masked_fill(hole[:, None].to(images.device), 0.0)

"""Common corruptions (Family I): accuracy under 15 corruption types × 5 severities.

One algorithm: corrupt every evaluation image with each configured (type, severity) cell —
implemented on tensors in the style of CIFAR-10-C (Hendrycks & Dietterich 2019), seeded —
and count correct predictions. Forward only, so it runs on ONNX models too.

The corruptions work on any image size and channel count. Where CIFAR-10-C used photographs
or libraries, this module uses tensor approximations (documented per function): frost is a
procedural ice texture instead of the frost photographs, snow and fog use multi-octave noise
in place of ImageMagick and the diamond-square plasma, JPEG is 8×8 DCT quantisation with the
standard tables (YCbCr for 3 channels, no chroma subsampling), glass blur shuffles pixels
with vectorised random local displacements, motion blur uses a line kernel at a random angle.
Spatial parameters are in pixels as in CIFAR-10-C (32×32 images) except zoom, elastic and
pixelate, which are relative to the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from robust_cert import stats
from robust_cert.data import EvalSet
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    batches,
)
from robust_cert.models.base import Classifier

Tensor = torch.Tensor
Gen = torch.Generator


# --------------------------------------------------------------------------- helpers


def _rand(shape, g: Gen, x: Tensor) -> Tensor:
    return torch.rand(shape, generator=g).to(x.device, x.dtype)


def _randn(shape, g: Gen, x: Tensor) -> Tensor:
    return torch.randn(shape, generator=g).to(x.device, x.dtype)


def _depthwise(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every channel of every image with ``kernel`` (k×k, shared, or N×k×k per image),
    replicate padding (works for kernels larger than the image)."""
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    p = k // 2
    flat = F.pad(x.reshape(1, n * c, h, w), (p, p, p, p), mode="replicate")
    if kernel.ndim == 2:
        weight = kernel.expand(n * c, 1, k, k)
    else:
        weight = kernel.repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(flat, weight.to(x.dtype), groups=n * c).reshape(n, c, h, w)


def _gauss_kernel(sigma: float, device) -> Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k1[:, None] * k1[None, :]
    return (k / k.sum()).float()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    return _depthwise(x, _gauss_kernel(sigma, x.device)) if sigma > 0 else x


def _plasma(n: int, h: int, w: int, decay: float, g: Gen, x: Tensor) -> Tensor:
    """Multi-octave value noise in [0, 1] (octave k has amplitude decay^-k): fractal clouds,
    a stand-in for the diamond-square plasma of CIFAR-10-C."""
    size = max(h, w)
    out = torch.zeros(n, 1, h, w, device=x.device, dtype=x.dtype)
    octaves = max(1, math.ceil(math.log2(size)) + 1)
    for k in range(octaves):
        cells = 2 ** k + 1
        grid = _rand((n, 1, cells, cells), g, x)
        out += F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True) / decay ** k
    lo = out.amin((2, 3), keepdim=True)
    hi = out.amax((2, 3), keepdim=True)
    return (out - lo) / (hi - lo).clamp_min(1e-12)


def _line_kernels(n: int, radius: float, sigma: float, g: Gen, x: Tensor) -> Tensor:
    """One motion-blur kernel per image: Gaussian weights along a line of the given radius at
    a uniformly random angle, trailing one side as in CIFAR-10-C's motion blur."""
    r = max(1, math.ceil(radius))
    size = 2 * r + 1
    angle = _rand((n,), g, x) * 2 * math.pi
    t = torch.linspace(0, radius, 4 * r + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-t ** 2 / (2 * sigma ** 2))
    xs = (t[None] * torch.cos(angle)[:, None]).round().long() + r
    ys = (t[None] * torch.sin(angle)[:, None]).round().long() + r
    k = torch.zeros(n, size * size, device=x.device, dtype=x.dtype)
    k.scatter_add_(1, ys * size + xs, weights.expand(n, -1).contiguous())
    k = k / k.sum(1, keepdim=True)
    return k.reshape(n, size, size)


def _warp(x: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 3:
        wts = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        return (x * wts.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


# --------------------------------------------------------------------------- noise


def gaussian_noise(x: Tensor, s: int, g: Gen) -> Tensor:
    """Additive N(0, σ²), σ = 0.04, 0.06, 0.08, 0.09, 0.10."""
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + c * _randn(x.shape, g, x)


def shot_noise(x: Tensor, s: int, g: Gen) -> Tensor:
    """Poisson photon noise: Poisson(x·λ)/λ, λ = 500, 250, 100, 75, 50."""
    c = [500, 250, 100, 75, 50][s - 1]
    return torch.poisson((x * c).clamp_min(0).cpu().double(), generator=g).to(x) / c


def impulse_noise(x: Tensor, s: int, g: Gen) -> Tensor:
    """Salt and pepper: each value becomes 0 or 1 (equally likely) with probability
    0.01, 0.02, 0.03, 0.05, 0.07."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = _rand(x.shape, g, x)
    salt = _rand(x.shape, g, x) < 0.5
    return torch.where(u < c, salt.to(x.dtype), x)


# --------------------------------------------------------------------------- blur


def defocus_blur(x: Tensor, s: int, g: Gen) -> Tensor:
    """Disk kernel of radius 0.3, 0.4, 0.5, 1, 1.5 px, anti-aliased by a Gaussian of
    σ = 0.4, 0.5, 0.6, 0.2, 0.1 px."""
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    r = math.ceil(radius) + math.ceil(3 * alias)
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    kernel = _depthwise(disk[None, None], _gauss_kernel(alias, x.device))[0, 0]
    return _depthwise(x, kernel / kernel.sum())


def glass_blur(x: Tensor, s: int, g: Gen) -> Tensor:
    """Gaussian blur (σ), ``iterations`` rounds of moving every pixel to a random neighbour
    at most ``delta`` px away (vectorised stand-in for CIFAR-10-C's sequential swaps), blur
    again. (σ, delta, iterations) = (0.05,1,1), (0.25,1,1), (0.4,1,1), (0.25,1,2), (0.4,1,2)."""
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                           (0.4, 1, 2)][s - 1]
    x = _gaussian_blur(x, sigma)
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    for _ in range(iters):
        dy = (_rand((n, h, w), g, x) * (2 * delta + 1)).long() - delta
        dx = (_rand((n, h, w), g, x) * (2 * delta + 1)).long() - delta
        src = (rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)
        x = x.flatten(2).gather(2, src.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)
    return _gaussian_blur(x, sigma)


def motion_blur(x: Tensor, s: int, g: Gen) -> Tensor:
    """Line kernel of radius 10, 10, 10, 10, 12 px with Gaussian weights σ = 1, 1.5, 2, 2.5, 3
    at a random angle per image."""
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][s - 1]
    return _depthwise(x, _line_kernels(x.shape[0], radius, sigma, g, x))


def zoom_blur(x: Tensor, s: int, g: Gen) -> Tensor:
    """Mean of the image and centre zooms by factors 1…z_max (steps as CIFAR-10-C):
    z_max ≈ 1.06, 1.11, 1.16, 1.21, 1.26."""
    stop, step = [(1.06, 0.01), (1.11, 0.01), (1.16, 0.02), (1.21, 0.02), (1.26, 0.03)][s - 1]
    zooms = np.arange(1, stop, step)[1:]
    n = x.shape[0]
    out = x.clone()
    for z in zooms:
        theta = torch.tensor([[1 / z, 0, 0], [0, 1 / z, 0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
        out += _warp(x, grid)
    return out / (len(zooms) + 1)


# --------------------------------------------------------------------------- weather


def snow(x: Tensor, s: int, g: Gen) -> Tensor:
    """Snow flakes: thresholded Gaussian noise, motion-blurred at a random angle, added twice
    (also rotated by 180°) to an image brightened towards white by (1 − blend)."""
    loc, scale, thr, radius, sigma, blend = [
        (0.1, 0.2, 0.6, 8, 3, 0.95), (0.1, 0.2, 0.5, 10, 4, 0.9), (0.15, 0.3, 0.4, 10, 4, 0.85),
        (0.25, 0.3, 0.45, 12, 5, 0.8), (0.3, 0.3, 0.4, 12, 6, 0.75)][s - 1]
    n, _, h, w = x.shape
    layer = loc + scale * _randn((n, 1, h, w), g, x)
    layer = torch.where(layer < thr, torch.zeros_like(layer), layer)
    layer = _depthwise(layer, _line_kernels(n, radius, sigma, g, x)) * 3
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def frost(x: Tensor, s: int, g: Gen) -> Tensor:
    """x·a + b·frost, (a, b) = (1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45); the
    frost is a procedural ice texture (sharpened fractal noise), not CIFAR-10-C's photographs."""
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    n, c, h, w = x.shape
    tex = _plasma(n, h, w, 1.4, g, x)
    tex = (1 - (2 * tex - 1).abs()) ** 3  # ridges: bright crystal lines
    return a * x + b * tex.expand(n, c, h, w)


def fog(x: Tensor, s: int, g: Gen) -> Tensor:
    """x + a·plasma, rescaled by max/(max + a), with (a, decay) = (0.2,3), (0.5,3), (0.75,2.5),
    (1,2), (1.5,1.75)."""
    a, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    n, c, h, w = x.shape
    peak = x.amax((1, 2, 3), keepdim=True)
    out = x + a * _plasma(n, h, w, decay, g, x)
    return out * peak / (peak + a)


def brightness(x: Tensor, s: int, g: Gen) -> Tensor:
    """HSV value + 0.05, 0.1, 0.15, 0.2, 0.3 (clipped at 1), hue and saturation kept."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


# --------------------------------------------------------------------------- digital


def contrast(x: Tensor, s: int, g: Gen) -> Tensor:
    """(x − mean)·c + mean per image, c = 0.75, 0.5, 0.4, 0.3, 0.15."""
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * c + m


def elastic_transform(x: Tensor, s: int, g: Gen) -> Tensor:
    """A random affine jitter (corners moved up to ``affine``·size) and a smooth random
    displacement field (uniform noise blurred with σ = sigma·size, scaled by alpha·size);
    (alpha, sigma, affine) = (0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05),
    (.1, .03, .03) of the image size, after CIFAR-10-C."""
    alpha, sigma, affine = [(0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05),
                            (.1, .03, .03)][s - 1]
    n, _, h, w = x.shape
    size = min(h, w)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=x.dtype, device=x.device)
    theta = eye + (2 * _rand((n, 2, 3), g, x) - 1) * 2 * affine
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if alpha > 0:
        field = 2 * _rand((n, 2, h, w), g, x) - 1
        field = _gaussian_blur(field, max(sigma * size, 0.5))
        field = field / field.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-12)
        grid = grid + (2 * alpha * field).permute(0, 2, 3, 1)  # α·size px = 2α grid units
    return _warp(x, grid)


def pixelate(x: Tensor, s: int, g: Gen) -> Tensor:
    """Box-downsample to c·size and upsample (nearest), c = 0.95, 0.9, 0.85, 0.75, 0.65."""
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * c)), max(1, round(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]],
    dtype=torch.float64)
_Q_CHROMA = torch.full((8, 8), 99.0, dtype=torch.float64)
_Q_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                                  [47, 66, 99, 99]], dtype=torch.float64)


def _dct_matrix() -> Tensor:
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def jpeg_compression(x: Tensor, s: int, g: Gen) -> Tensor:
    """JPEG at quality 80, 65, 58, 50, 40, approximated by quantising the orthonormal 8×8 DCT
    with the standard tables scaled by quality (luminance table per channel; for 3 channels in
    YCbCr with the chrominance table on Cb and Cr; no chroma subsampling, no entropy coding)."""
    q = [80, 65, 58, 50, 40][s - 1]
    scale = 5000 / q if q < 50 else 200 - 2 * q
    n, c, h, w = x.shape
    v = x.double() * 255
    rgb = c == 3
    if rgb:
        m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]], dtype=torch.float64, device=x.device)
        v = torch.einsum("ij,njhw->nihw", m, v) + torch.tensor(
            [0, 128, 128], dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    ph, pw = (-h) % 8, (-w) % 8
    v = F.pad(v, (0, pw, 0, ph), mode="replicate") - 128
    hh, ww = v.shape[-2:]
    blocks = v.reshape(n, c, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)
    d = _dct_matrix().to(x.device)
    coef = d @ blocks @ d.T
    tables = [_Q_LUMA] + [_Q_CHROMA] * 2 if rgb else [_Q_LUMA] * c
    qt = torch.stack([((t * scale + 50) // 100).clamp_min(1) for t in tables]).to(x.device)
    qt = qt.view(1, c, 1, 1, 8, 8)
    blocks = d.T @ (torch.round(coef / qt) * qt) @ d
    v = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh, ww)[..., :h, :w] + 128
    if rgb:
        inv = torch.tensor([[1, 0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]],
                           dtype=torch.float64, device=x.device)
        off = torch.tensor([0, 128, 128], dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
        v = torch.einsum("ij,njhw->nihw", inv, v - off)
    return (v / 255).to(x.dtype)


#: The 15 corruption types, in CIFAR-10-C order. Each maps (x in [0,1] NCHW, severity 1–5,
#: generator) to a corrupted batch (clipped to [0, 1] by :func:`corrupt`).
CORRUPTIONS: dict[str, Callable[[Tensor, int, Gen], Tensor]] = {
    f.__name__: f for f in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur,
        zoom_blur, snow, frost, fog, brightness, contrast, elastic_transform, pixelate,
        jpeg_compression)
}


def corrupt(x: Tensor, name: str, severity: int, g: Gen) -> Tensor:
    """Apply one corruption to a batch of images (N, C, H, W) in [0, 1]; result in [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity}")
    return CORRUPTIONS[name](x, severity, g).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- metric


class CorruptionsConfig(MetricConfig):
    """Parameters of :class:`CorruptionAccuracy`."""

    corruptions: list[str] = Field(default_factory=lambda: list(CORRUPTIONS), min_length=1)
    severities: list[int] = Field(default=[1, 2, 3, 4, 5], min_length=1)

    @field_validator("corruptions")
    @classmethod
    def _known(cls, v):
        for c in v:
            if c not in CORRUPTIONS:
                raise ValueError(f"unknown corruption {c!r}; valid: {', '.join(CORRUPTIONS)}")
        return list(dict.fromkeys(v))

    @field_validator("severities")
    @classmethod
    def _levels(cls, v):
        bad = [s for s in v if s not in range(1, 6)]
        if bad:
            raise ValueError(f"severities must be in 1..5, got {bad[0]}")
        return sorted(set(v))


class CorruptionAccuracy(Metric[CorruptionsConfig]):
    """Accuracy under common corruptions, per (type, severity) cell and on average.

    Kind: statistical. Each cell's accuracy is k correct of the n evaluation points, corrupted
    with draws from a generator seeded by (run seed, type, severity, index of the batch's first
    point in the whole set), with an exact
    Clopper–Pearson interval. Every proportion has one outcome per point (one corrupted copy
    per point and cell, or one cell per point for the mean; draws are never pooled within a
    point), so the outcomes are i.i.d. across points and the interval covers inputs drawn like
    the evaluation points × the corruption's randomness, not only this evaluation set.
    ``{"corruption": "mean"}`` is the mean corruption accuracy
    (the average over the configured cells) as a gateable proportion: each point is judged in
    one cell drawn uniformly at random (seeded), so its outcomes are i.i.d. Bernoulli with the
    mean corruption accuracy as success rate and the CP interval is exact. The plain average
    over all cells is ``diagnostics["mean_corruption_accuracy"]`` (an estimate), with the
    per-type averages.

    Exact McNemar tests against clean accuracy per cell (``diagnostics["mcnemar"]``: b =
    clean right and corrupted wrong, c = the reverse, two-sided p-value). Inputs must be images
    (C, H, W) or (H, W); other inputs are "not applicable". Inputs in [lo, hi] are mapped to
    [0, 1] for corruption and back. Draws depend on the batch size (seeded per batch).

    Sharding (``shardable``): the engine runs blocks of one batch each; a block's
    corruptions are drawn per batch as above (seeded by the batch's position in the whole set,
    so a block draws the same in any process, and the result equals a one-process run with the
    same batch size), and the mean-cell picks are drawn for the whole set from a generator
    seeded by (seed, label) only, each block keeping its points' part. Proportions and
    per-point arrays merge exactly; :meth:`finalize` recomputes the ``diagnostics`` (clean
    count, McNemar counts and p-values, mean and per-type accuracy) from the merged
    ``per_point``. :meth:`run` on the whole set (``ctx.total`` None) returns it finalized.

    Args (policy ``metrics.corruptions``):
        corruptions: types to run (default all 15: gaussian_noise, shot_noise, impulse_noise,
            defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog, brightness,
            contrast, elastic_transform, pixelate, jpeg_compression).
        severities: subset of 1..5 (default all).

    Example (policy)::

        corruptions: {severities: [3, 5]}
        requirements:
          - {metric: corruptions, corruption: mean, at_least: 0.8}
          - {metric: corruptions, corruption: fog, severity: 5, at_least: 0.5}
    """

    name = "corruptions"
    description = "P[argmax f(corrupt(x)) = y] per corruption type and severity"
    Config = CorruptionsConfig

    #: blocks carry no diagnostics; accuracies and p-values are over all points
    merge_rules = {"clean_correct": "sum", "mean_corruption_accuracy": "recompute",
                   "per_type_accuracy": "recompute",
                   "mcnemar": {"*": {"*": {"b": "sum", "c": "sum", "p_value": "recompute"}}},
                   "cells": "same"}

    def cells(self) -> list[tuple[str, int]]:
        return [(c, s) for c in self.config.corruptions for s in self.config.severities]

    def selectors(self):
        return [{"corruption": c, "severity": s} for c, s in self.cells()] + \
            [{"corruption": "mean"}]

    def cost(self, n_points: int) -> int:
        return n_points * (len(self.cells()) + 1)

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        shape = data.input_shape
        if len(shape) not in (2, 3):
            return self.result([], status="not_applicable",
                               reason=f"corruptions need images (C, H, W); inputs have shape "
                                      f"{list(shape)}")
        cells = self.cells()
        lo, hi = data.input_range
        n = len(data)
        # kept on the device: one copy to the host per call, no sync per batch or cell
        clean_parts: list[Tensor] = []
        cell_parts: list[list[Tensor]] = [[] for _ in cells]
        for sl, x, y in batches(data, ctx.batch_size, ctx.device):
            u = ((x - lo) / (hi - lo)).reshape(x.shape[0], *((1, *shape) if len(shape) == 2
                                                             else shape))
            clean_parts.append(model.logits(x).argmax(1) == y)
            ctx.advance(sl.stop - sl.start)
            first = ctx.offset + sl.start  # the batch's first point in the whole set
            for j, (c, s) in enumerate(cells):
                g = ctx.global_generator(f"{self.name}/{c}/{s}/{first}")
                xc = (lo + (hi - lo) * corrupt(u, c, s, g)).reshape(x.shape)
                cell_parts[j].append(model.logits(xc).argmax(1) == y)
                ctx.advance(sl.stop - sl.start)
        if n:
            clean = torch.cat(clean_parts).cpu().numpy()
            correct = torch.stack([torch.cat(p) for p in cell_parts], 1).cpu().numpy()
        else:
            clean, correct = np.zeros(0, dtype=bool), np.zeros((0, len(cells)), dtype=bool)
        # the cell each point is judged in for the mean: drawn for the whole set at once (the
        # same in every block), this block's part kept
        pick_g = ctx.global_generator(f"{self.name}/mean-cell")
        pick = torch.randint(len(cells), (ctx.n_total(data),), generator=pick_g)
        pick = pick[ctx.offset:ctx.offset + n].numpy()
        picked = correct[np.arange(n), pick]
        props = [Proportion({"corruption": c, "severity": s}, int(correct[:, j].sum()), n)
                 for j, (c, s) in enumerate(cells)]
        props.append(Proportion({"corruption": "mean"}, int(picked.sum()), n))
        res = self.result(props, per_point={"correct": correct, "clean_correct": clean,
                                            "mean_cell": pick.astype(np.int64),
                                            "mean_correct": picked})
        return res if ctx.total is not None else self.finalize(res, model, data, ctx)

    def finalize(self, result: MetricResult, model: Classifier, data: EvalSet,
                 ctx: RunContext) -> MetricResult:
        """The summaries over all points, from the merged per-point arrays: clean count,
        McNemar counts and exact p-values per cell, the mean over all cells and per type."""
        if result.status != "ok":
            return result
        cells = self.cells()
        clean = result.per_point["clean_correct"].astype(bool)
        correct = result.per_point["correct"].astype(bool)
        mcnemar: dict[str, dict[str, dict]] = {}
        for j, (c, s) in enumerate(cells):
            b = int((clean & ~correct[:, j]).sum())
            cc = int((~clean & correct[:, j]).sum())
            mcnemar.setdefault(c, {})[str(s)] = {"b": b, "c": cc,
                                                 "p_value": stats.mcnemar_exact(b, cc)}
        per_type = {c: float(np.mean([correct[:, j].mean() for j, (cj, _) in enumerate(cells)
                                      if cj == c])) for c in self.config.corruptions}
        result.diagnostics = {
            "clean_correct": int(clean.sum()),
            "mean_corruption_accuracy": float(correct.mean()),
            "per_type_accuracy": per_type,
            "mcnemar": mcnemar,
            "cells": [f"{c}@{s}" for c, s in cells],
        }
        return result

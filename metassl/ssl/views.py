"""Batched random views of images in torch: affine and elastic warps, noise, erasing, quarter turns.

Every function works on a whole batch `[B, C, H, W]` at once: one `F.affine_grid` and one
`F.grid_sample` call warp all images, each with its own random parameters. All randomness
comes from the `torch.Generator` passed in, so the output is a deterministic function of
the input, the `AugmentConfig` and the generator's state. Pixels are floats in [0, 1]
with 0 = background (no ink), so whatever a warp moves in from outside the image, and
whatever erasing removes, becomes 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metassl.config import AudioAugmentConfig, AugmentConfig
from metassl.errors import ConfigError, DataError
from metassl.ssl.audio_views import audio_ssl_views, check_audio_augment, random_audio_views

# Aspect ratios (height / width) of erased rectangles are drawn log-uniformly from this range.
ERASE_RATIO = (1.0 / 3.0, 3.0)


def check_augment(cfg: AugmentConfig | AudioAugmentConfig) -> AugmentConfig | AudioAugmentConfig:
    """Returns `cfg` unchanged, or raises ConfigError naming the first out-of-range field.

    An AudioAugmentConfig is for audio clips: `random_views` and `ssl_views` then make audio views
    (metassl.ssl.audio_views), so every generator works on images and audio alike.
    """
    if isinstance(cfg, AudioAugmentConfig):
        return check_audio_augment(cfg)
    if not isinstance(cfg, AugmentConfig):
        raise ConfigError(f"augmentations must be given as an AugmentConfig, got {type(cfg).__name__}")
    for key in ("rotation_deg", "translate", "shear_deg", "elastic_alpha", "elastic_sigma", "noise_std"):
        value = getattr(cfg, key)
        if not value >= 0:  # also rejects NaN
            raise ConfigError(f"augment.{key}={value} must be >= 0")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise ConfigError(f"augment.scale_min={cfg.scale_min}, scale_max={cfg.scale_max}: "
                          "need 0 < scale_min <= scale_max")
    if not cfg.shear_deg < 90:
        raise ConfigError(f"augment.shear_deg={cfg.shear_deg} must be < 90")
    if not 0 <= cfg.erase_prob <= 1:
        raise ConfigError(f"augment.erase_prob={cfg.erase_prob} must be in [0, 1]")
    if not 0 < cfg.erase_max_frac <= 1:
        raise ConfigError(f"augment.erase_max_frac={cfg.erase_max_frac} must be in (0, 1]")
    return cfg


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"images must be a floating-point tensor [B, C, H, W], got {shape}")


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Returns float32 U[0, 1) draws of `shape` from `generator` (on the generator's device)."""
    return torch.rand(shape, generator=generator, device=generator.device)


def affine_thetas(batch: int, height: int, width: int, cfg: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Returns `F.affine_grid` matrices [batch, 2, 3] (float32) of random affine warps.

    Each warp maps an image point p (pixels, from the centre) to A p + t with
    A = R(angle) @ [[1, tan(shear)], [0, 1]] * scale; the matrix returned is its inverse
    (output -> input) in the normalised coordinates of `affine_grid`, so rotations and
    shears stay true to pixel geometry on non-square images.
    """
    u = _uniform((batch, 5), generator) * 2 - 1  # U[-1, 1): angle, shear, scale, tx, ty
    angle = u[:, 0] * math.radians(cfg.rotation_deg)
    shear = u[:, 1] * math.radians(cfg.shear_deg)
    scale = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * (u[:, 2] + 1) / 2
    shift = torch.stack([u[:, 3] * cfg.translate * width, u[:, 4] * cfg.translate * height], dim=1)
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.eye(2, device=u.device).repeat(batch, 1, 1)
    shearing[:, 0, 1] = tan
    forward = rotation @ shearing * scale[:, None, None]  # [B, 2, 2], pixels
    half = torch.tensor([width / 2, height / 2], device=u.device)  # pixels per normalised unit
    inverse = torch.linalg.inv(forward)
    linear = inverse * half[None, :] / half[:, None]  # D^-1 A^-1 D
    offset = -(inverse @ shift[:, :, None])[:, :, 0] / half  # -D^-1 A^-1 t
    return torch.cat([linear, offset[:, :, None]], dim=2)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Returns a normalised 1-d Gaussian kernel [2r + 1] (float32), r = ceil(3 sigma); [1] for sigma 0."""
    radius = math.ceil(3 * sigma)
    if radius == 0:
        return torch.ones(1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x.square() / (2 * sigma**2))
    return kernel / kernel.sum()


def elastic_displacement(batch: int, height: int, width: int, alpha: float, sigma: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Returns random smooth displacements [batch, H, W, 2] (x, y) in `affine_grid` units.

    White Gaussian noise is smoothed with a Gaussian of std `sigma` pixels and rescaled so
    that each component has standard deviation `alpha` pixels everywhere (the noise is drawn
    with a margin, so the field has no border effects).
    """
    kernel = gaussian_kernel(sigma).to(generator.device)
    radius = (len(kernel) - 1) // 2
    noise = torch.randn((batch * 2, height + 2 * radius, width + 2 * radius),
                        generator=generator, device=generator.device)
    # A separable "valid" convolution as two matrix products with banded matrices (much
    # faster on CPU than a one-channel conv2d).
    field = _band(kernel, height) @ noise @ _band(kernel, width).T  # [2B, H, W]
    field = field * (alpha / kernel.square().sum())  # smoothed unit noise has std ||k||^2
    pixels_to_grid = torch.tensor([2 / width, 2 / height], device=field.device)
    return field.view(batch, 2, height, width).permute(0, 2, 3, 1) * pixels_to_grid


def _band(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Returns the [size, size + len(kernel) - 1] matrix whose row i holds `kernel` from column i."""
    offsets = torch.arange(size + len(kernel) - 1, device=kernel.device)[None, :] \
        - torch.arange(size, device=kernel.device)[:, None]
    inside = (offsets >= 0) & (offsets < len(kernel))
    return torch.where(inside, kernel[offsets.clamp(0, len(kernel) - 1)], torch.zeros(()).to(kernel))


def erase_masks(batch: int, height: int, width: int, prob: float, max_frac: float,
                generator: torch.Generator) -> torch.Tensor:
    """Returns bool masks [batch, H, W]: with probability `prob`, one random rectangle per image.

    A rectangle's area is U[0, max_frac] of the image, its height/width ratio log-uniform
    in ERASE_RATIO, its position uniform among those that fit.
    """
    u = _uniform((batch, 5), generator)
    area = u[:, 1] * max_frac * height * width
    low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(low + (high - low) * u[:, 2])
    h = torch.sqrt(area * ratio).round().clamp(0, height)
    w = torch.sqrt(area / ratio).round().clamp(0, width)
    top = torch.minimum(torch.floor(u[:, 3] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 4] * (width - w + 1)), width - w)
    rows = torch.arange(height, device=u.device, dtype=u.dtype)[None, :, None]
    cols = torch.arange(width, device=u.device, dtype=u.dtype)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
    return inside & (u[:, 0] < prob)[:, None, None]


def random_views(x: torch.Tensor, cfg: AugmentConfig | AudioAugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Returns a random view [B, C, H, W] of each image of `x` [B, C, H, W] (values in [0, 1]).

    (With an AudioAugmentConfig: a view `[B, 1, T]` of each clip; see audio_views.random_audio_views.)

    Per image: an affine warp (rotation U[-rotation_deg, rotation_deg], shift U[-translate,
    translate] of the size per axis, zoom U[scale_min, scale_max], shear U[-shear_deg,
    shear_deg]), plus an elastic warp when `elastic_alpha` > 0, sampled bilinearly with
    zeros outside; then Gaussian noise of std `noise_std` clamped to [0, 1]; then, with
    probability `erase_prob`, one rectangle of at most `erase_max_frac` of the area set
    to 0. With all ranges 0 (scale 1) the view equals the input up to float rounding.
    """
    if isinstance(cfg, AudioAugmentConfig):
        return random_audio_views(x, cfg, generator)
    _check_images(x)
    check_augment(cfg)
    batch, channels, height, width = x.shape
    if batch == 0:
        return x.clone()
    theta = affine_thetas(batch, height, width, cfg, generator).to(x)
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    if cfg.elastic_alpha > 0:
        grid = grid + elastic_displacement(batch, height, width, cfg.elastic_alpha,
                                           cfg.elastic_sigma, generator).to(x)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.noise_std > 0:
        noise = torch.randn((batch, channels, height, width), generator=generator, device=generator.device)
        out = (out + cfg.noise_std * noise.to(x)).clamp_(0, 1)
    if cfg.erase_prob > 0:
        mask = erase_masks(batch, height, width, cfg.erase_prob, cfg.erase_max_frac, generator)
        out = out.masked_fill(mask.to(x.device)[:, None], 0.0)
    return out


def rotate_quarters(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Returns `x` [B, C, H, W] with image b turned k[b] quarter turns counter-clockwise.

    `k` is an integer tensor [B] with values 0..3; the turn is torch.rot90 over dims
    (-2, -1). Images are grouped by k, so there are at most three rot90 calls.
    """
    _check_images(x)
    if (not isinstance(k, torch.Tensor) or k.shape != (x.shape[0],)
            or k.is_floating_point() or k.is_complex() or k.dtype == torch.bool):
        shape = list(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise DataError(f"quarter turns k must be an integer tensor [{x.shape[0]}] (one per image), got {shape}")
    k = k.to(x.device)
    if len(k) and (int(k.min()) < 0 or int(k.max()) > 3):
        raise DataError(f"quarter turns k must lie in 0..3, got {int(k.min())}..{int(k.max())}")
    if x.shape[-1] != x.shape[-2] and bool(((k % 2) == 1).any()):
        raise DataError(f"odd quarter turns need square images, got H x W = {x.shape[-2]} x {x.shape[-1]}")
    out = x.clone()
    for turns in (1, 2, 3):
        rows = torch.nonzero(k == turns).flatten()
        if len(rows):
            out[rows] = torch.rot90(x[rows], turns, dims=(-2, -1))
    return out


def ssl_views(x: torch.Tensor, cfg: AugmentConfig | AudioAugmentConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x1, x2, rot_x, rot_y) for images `x` [M, C, H, W].

    (With an AudioAugmentConfig, for clips `[M, 1, T]`: see audio_views.audio_ssl_views.)

    x1, x2 [M, C, H, W]: two independent `random_views` (a SimCLR positive pair);
    rot_y int64 [M]: random quarter turns 0..3; rot_x [M, C, H, W]: `x` turned by rot_y
    (rotation prediction). Drawn in that order from `generator`.
    """
    if isinstance(cfg, AudioAugmentConfig):
        return audio_ssl_views(x, cfg, generator)
    x1 = random_views(x, cfg, generator)
    x2 = random_views(x, cfg, generator)
    rot_y = torch.randint(0, 4, (x.shape[0],), generator=generator, device=generator.device)
    return x1, x2, rotate_quarters(x, rot_y), rot_y.to(x.device)

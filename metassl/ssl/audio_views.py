"""Batched random views of audio clips in torch: time shift, speed, gain, additive noise and equalisation.

Every function works on a whole batch `[B, 1, T]` at once: one `F.grid_sample` call resamples
all clips, each with its own speed and shift. All randomness comes from the `torch.Generator`
passed in, so a view is a deterministic function of the clip, the AudioAugmentConfig and the
generator's state. Whatever a shift or a slower speed moves in from outside the clip is silence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.config import AudioAugmentConfig
from metassl.errors import ConfigError, DataError


def check_audio_augment(cfg: AudioAugmentConfig) -> AudioAugmentConfig:
    """Returns `cfg` unchanged, or raises ConfigError naming the first out-of-range field."""
    if not isinstance(cfg, AudioAugmentConfig):
        raise ConfigError(f"audio augmentations must be given as an AudioAugmentConfig, got {type(cfg).__name__}")
    if not 0 < cfg.speed_min <= cfg.speed_max:
        raise ConfigError(f"audio.speed_min={cfg.speed_min}, speed_max={cfg.speed_max}: need 0 < min <= max")
    if not 0 <= cfg.shift < 1:
        raise ConfigError(f"audio.shift={cfg.shift} must be in [0, 1)")
    if not cfg.gain_db >= 0:
        raise ConfigError(f"audio.gain_db={cfg.gain_db} must be >= 0")
    if not 0 <= cfg.noise_prob <= 1:
        raise ConfigError(f"audio.noise_prob={cfg.noise_prob} must be in [0, 1]")
    if not cfg.snr_db_min <= cfg.snr_db_max:
        raise ConfigError(f"audio.snr_db_min={cfg.snr_db_min} must be <= snr_db_max={cfg.snr_db_max}")
    if not cfg.eq_db >= 0:
        raise ConfigError(f"audio.eq_db={cfg.eq_db} must be >= 0")
    return cfg


def _check_clips(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[1] != 1 or not x.is_floating_point():
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"audio clips must be a floating-point tensor [B, 1, T], got {shape}")


def random_audio_views(x: torch.Tensor, cfg: AudioAugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """A random view `[B, 1, T]` of each clip of `x` `[B, 1, T]` (samples in [-1, 1]).

    Per clip: played at a speed drawn from U[speed_min, speed_max] (linear interpolation:
    tempo and pitch change together) and shifted by U[-shift, shift] of its length, about its
    centre; scaled by a gain of U[-gain_db, gain_db] dB; with probability `noise_prob`, white
    noise added at a signal-to-noise ratio of U[snr_db_min, snr_db_max] dB (of the clip's RMS);
    with `eq_db` > 0, through a random smooth equaliser (`random_equaliser`); clipped to [-1, 1].
    With speeds 1, shift 0, gain 0, no noise and no equaliser the view equals the clip up to
    float rounding (the resampling grid is computed in float32).
    """
    _check_clips(x)
    check_audio_augment(cfg)
    batch, _, length = x.shape
    if batch == 0:
        return x.clone()
    u = torch.rand((batch, 5), generator=generator, device=generator.device).to(x)
    speed = cfg.speed_min + (cfg.speed_max - cfg.speed_min) * u[:, 0]
    shift = (2 * u[:, 1] - 1) * cfg.shift * 2  # grid coordinates span 2 per clip length
    gain = 10.0 ** ((2 * u[:, 2] - 1) * cfg.gain_db / 20)
    theta = torch.zeros(batch, 2, 3).to(x)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1] = speed, shift, 1.0
    grid = F.affine_grid(theta, [batch, 1, 1, length], align_corners=False)
    out = F.grid_sample(x[:, :, None, :], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[:, :, 0] * gain[:, None, None]
    noise = torch.randn((batch, 1, length), generator=generator, device=generator.device).to(x)
    if cfg.noise_prob > 0:
        snr = cfg.snr_db_min + (cfg.snr_db_max - cfg.snr_db_min) * u[:, 4]
        rms = out.pow(2).mean(dim=(1, 2)).sqrt()
        std = torch.where(u[:, 3] < cfg.noise_prob, rms / 10.0 ** (snr / 20), torch.zeros_like(rms))
        out = out + std[:, None, None] * noise
    if cfg.eq_db > 0:  # drawn after the rest, so views without it are those of earlier releases
        out = random_equaliser(out, cfg.eq_db, generator)
    return out.clamp_(-1.0, 1.0)


def random_equaliser(x: torch.Tensor, eq_db: float, generator: torch.Generator) -> torch.Tensor:
    """Each clip of `x` `[B, 1, T]` through its own random smooth filter (another microphone or room).

    The gain in dB at frequency f (0 to Nyquist) is `eq_db / 4 * sum_j w_j cos(pi j f / Nyquist)`,
    j = 1..4, with weights w_j drawn from U[-1, 1], so it stays within +-eq_db dB; applied to
    the clip's real FFT (zero phase), so timing is kept.
    """
    batch, _, length = x.shape
    w = 2 * torch.rand((batch, 4), generator=generator, device=generator.device).to(x) - 1
    spectrum = torch.fft.rfft(x, dim=-1)
    f = torch.linspace(0, 1, spectrum.shape[-1], device=x.device, dtype=x.dtype)
    j = torch.arange(1, 5, device=x.device, dtype=x.dtype)
    gain_db = eq_db / 4 * (w[:, :, None] * torch.cos(torch.pi * j[None, :, None] * f[None, None, :])).sum(1)
    return torch.fft.irfft(spectrum * 10.0 ** (gain_db[:, None, :] / 20), n=length, dim=-1)


def audio_ssl_views(x: torch.Tensor, cfg: AudioAugmentConfig, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x1, x2, clips, zeros) for clips `x` `[M, 1, T]`: two independent views (a SimCLR pair), then the
    clips themselves with no transformation (what CPC predicts along) and their targets, all 0."""
    x1 = random_audio_views(x, cfg, generator)
    x2 = random_audio_views(x, cfg, generator)
    return x1, x2, x.clone(), torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)

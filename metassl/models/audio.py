"""A 1-D convolutional encoder over raw audio with a GRU context network (CPC's architecture).

van den Oord et al. (2018) encode 16 kHz speech with five strided convolutions (a frame every
10 ms) and summarise the frames with a GRU. Here the strides and kernels are set by config;
the default (kernels 10, 8, 4, 4; strides 5, 4, 2, 2) turns 8 kHz audio into a frame every
80 samples (10 ms), 98 frames for a one-second clip. Each convolution is followed by the
normalisation `norm` (metassl.models.backbones' rules: "batch" keeps running statistics, and
under a learner with an inner loop becomes SupportBatchNorm, statistics of the support set over
every frame) and a ReLU.

`frontend: logmel` puts a log-mel spectrogram in front instead of learning from samples: the
power of `torch.stft` (Hann windows of `n_fft` samples, hop `hop`) through librosa's mel
filterbank (`mel_bands` triangles, a buffer of the model, so it is computed on the training
device with the rest), `log(mel + 1e-6)`; the convolutions then run over its frames (their
kernels and strides count frames; `(3, 3, 3)` and `(1, 2, 2)` make a frame every 40 ms). With
`cmn` each band's mean over the clip is subtracted (cepstral mean normalisation), so a fixed
gain per frequency (a microphone's response, the recording level) cancels.

Input `[batch, 1, T]` float32 waveforms. `features` (an AudioEncoder): `forward(x)` gives the
clip's embedding `[batch, context]`, the mean of the GRU's states over the frames (or of the
frames themselves without a context network); `forward(x, frames=True)` gives
`(z, c)`, the frames `[batch, L, hidden]` and the context states `[batch, L, context]` that CPC
predicts from. With `out_features` a linear head follows, as on Conv-4, so every learner (ProtoNet,
Matching Nets, MAML on the whole network or its head) uses it unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metassl.errors import ConfigError
from metassl.models.backbones import SupportBatchNorm, _norm_layer

CONTEXT_NETS = ("gru", "none")
FRONTENDS = ("waveform", "logmel")


def mel_filterbank(sample_rate: int, n_fft: int, bands: int) -> torch.Tensor:
    """librosa's mel filterbank `[bands, n_fft // 2 + 1]` (Slaney scale and normalisation, its defaults)."""
    try:
        from librosa.filters import mel
    except ImportError:
        raise ConfigError("model.frontend='logmel' takes its mel filterbank from librosa: pip install librosa "
                          "(or metassl[speech])") from None
    return torch.from_numpy(mel(sr=sample_rate, n_fft=n_fft, n_mels=bands)).float()


class AudioEncoder(nn.Module):
    """Strided Conv1d blocks (conv, norm, ReLU), then a one-layer GRU over the frames (module doc)."""

    def __init__(self, hidden: int = 128, context: int = 128, norm: str = "batch", support_statistics: bool = False,
                 kernels: Sequence[int] = (10, 8, 4, 4), strides: Sequence[int] = (5, 4, 2, 2),
                 context_net: str = "gru", frontend: str = "waveform", sample_rate: int = 8000, n_fft: int = 256,
                 hop: int = 80, mel_bands: int = 40, cmn: bool = False):
        super().__init__()
        if frontend not in FRONTENDS:
            raise ConfigError(f"model.frontend={frontend!r} is not one of {list(FRONTENDS)}")
        if cmn and frontend != "logmel":
            raise ConfigError("model.cmn=true normalises log-mel bands; it needs model.frontend='logmel'")
        self.frontend, self.n_fft, self.hop, self.cmn = frontend, n_fft, hop, cmn
        if frontend == "logmel":
            self.register_buffer("mel", mel_filterbank(sample_rate, n_fft, mel_bands))
        if len(kernels) != len(strides) or not kernels:
            raise ConfigError(f"model.kernels={list(kernels)} and model.strides={list(strides)} must be lists of "
                              "the same, non-zero length (one per convolution)")
        if min(kernels) < 1 or min(strides) < 1:
            raise ConfigError("model.kernels and model.strides must be positive")
        if context_net not in CONTEXT_NETS:
            raise ConfigError(f"model.context_net={context_net!r} is not one of {list(CONTEXT_NETS)}")
        layers: list[nn.Module] = []
        channels = mel_bands if frontend == "logmel" else 1
        for k, s in zip(kernels, strides):
            layers += [nn.Conv1d(channels, hidden, kernel_size=k, stride=s),
                       _norm_layer(norm, hidden, support_statistics, dims=1), nn.ReLU()]
            channels = hidden
        self.convs = nn.Sequential(*layers)
        self.kernels, self.strides = tuple(kernels), tuple(strides)
        self.gru = nn.GRU(hidden, context, batch_first=True) if context_net == "gru" else None
        self.frame_dim = hidden
        self.embedding_dim = context if self.gru is not None else hidden

    def num_frames(self, samples: int) -> int:
        """The frames of a clip of `samples` samples (0 when it is too short for the convolutions)."""
        if self.frontend == "logmel":  # torch.stft's centred frames
            samples = samples // self.hop + 1 if samples > self.n_fft // 2 else 0
        for k, s in zip(self.kernels, self.strides):
            samples = (samples - k) // s + 1 if samples >= k else 0
        return samples

    def forward(self, x: torch.Tensor, reference: int | None = None, frames: bool = False):
        if x.ndim != 3 or x.shape[1] != 1:
            raise ConfigError(f"the audio encoder reads waveforms [batch, 1, samples], got {list(x.shape)}")
        if self.num_frames(x.shape[-1]) < 1:
            raise ConfigError(f"clips of {x.shape[-1]} samples are too short for the audio encoder's "
                              f"convolutions (kernels {list(self.kernels)}, strides {list(self.strides)})")
        h = self.log_mel(x) if self.frontend == "logmel" else x
        for layer in self.convs:
            h = layer(h, reference) if isinstance(layer, SupportBatchNorm) else layer(h)
        z = h.transpose(1, 2)  # [batch, frames, hidden]
        c = self.gru(z)[0] if self.gru is not None else z
        if frames:
            return z, c
        return c.mean(1)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, mel_bands, frames]` log-mel spectrogram of waveforms `[batch, 1, T]` (module doc)."""
        window = torch.hann_window(self.n_fft, device=x.device, dtype=x.dtype)
        spec = torch.stft(x[:, 0], self.n_fft, hop_length=self.hop, window=window, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [batch, n_fft // 2 + 1, frames]
        logmel = torch.log(torch.matmul(self.mel, power) + 1e-6)
        return logmel - logmel.mean(dim=2, keepdim=True) if self.cmn else logmel


class AudioNet(nn.Module):
    """`features` (an AudioEncoder) and, with `out_features`, a linear classifier head."""

    def __init__(self, out_features: int | None = None, **encoder):
        super().__init__()
        self.features = AudioEncoder(**encoder)
        self.embedding_dim = self.features.embedding_dim
        self.frame_dim = self.features.frame_dim
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def forward(self, x: torch.Tensor, reference: int | None = None) -> torch.Tensor:
        z = self.features(x, reference)
        return self.head(z) if self.head is not None else z

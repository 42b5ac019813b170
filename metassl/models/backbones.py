"""Conv-4 and MLP backbones (the text Transformer is in transformer.py).

Both are plain `nn.Module`s; meta-learners never mutate them but run them with
`torch.func.functional_call` on a dict of parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metassl.errors import ConfigError

# Normalisation layers a Conv-4 block can use, and whether each is transductive at
# test time (statistics computed over the query batch) -- the protocol asks results
# to say which.
NORMS = {
    "layer": "per-sample (GroupNorm with one group), no running statistics",
    "group": "per-sample GroupNorm with 8 groups, no running statistics",
    "batch": "BatchNorm with running statistics (eval mode uses them: non-transductive); under a learner "
             "with an inner loop, statistics of the support set instead (see SupportBatchNorm)",
    "batch_transductive": "BatchNorm without running statistics (batch statistics, also at test time)",
    "none": "no normalisation",
}


class SupportBatchNorm(nn.Module):
    """BatchNorm whose statistics come from the support set, in meta-training and at test time alike.

    `forward(x, reference=None)` normalises each channel of `x` `[B, C, ...]` (images `[B, C, H,
    W]`, sequences `[B, C, L]`) with the mean and (biased) variance of its first `reference`
    rows (all rows when None) over every position, then applies
    the learned affine `weight`, `bias`. Learners with an inner loop (MAML, first-order MAML,
    Meta-SGD, Reptile) adapt on the support set alone, so its statistics are the support's;
    for the query they pass `[support; query]` with `reference = len(support)`, so a query
    is never normalised with other queries (not transductive) and the adapted network is
    the same function at test time as in meta-training. No running statistics are kept:
    nothing depends on train/eval mode, and the layer works under `torch.func.vmap`.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, reference: int | None = None) -> torch.Tensor:
        ref = x if reference is None else x[:reference]
        var, mean = torch.var_mean(ref, dim=(0, *range(2, x.ndim)), correction=0, keepdim=True)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = self.weight.view(shape) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(shape)


def _norm_layer(norm: str, channels: int, support_statistics: bool = False, dims: int = 2) -> nn.Module:
    """The normalisation `norm` of `channels` feature maps of `dims` spatial dimensions (2: images, 1: sequences)."""
    batch_norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    if norm == "batch" and support_statistics:
        return SupportBatchNorm(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "group":
        return nn.GroupNorm(8, channels)
    if norm == "batch":
        return batch_norm(channels, track_running_stats=True)
    if norm == "batch_transductive":
        return batch_norm(channels, track_running_stats=False)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm={norm!r} is not one of {sorted(NORMS)}")


def is_transductive(norm: str) -> bool:
    """True when the model normalises with statistics of the batch it is run on, also at test time."""
    return norm == "batch_transductive"


def norm_mode(norm: str, support_statistics: bool = False) -> str:
    """How a model normalises at test time, as results record it."""
    if is_transductive(norm):
        return "transductive"
    if norm == "batch" and support_statistics:
        return "non-transductive (support-set statistics)"
    if norm == "batch":
        return "non-transductive (running statistics)"
    return "non-transductive"


class ChannelsLastConv2d(nn.Conv2d):
    """A Conv2d that runs with its weight in channels-last (NHWC) memory order.

    The weight is stored, saved and updated in the usual layout; each forward passes a
    channels-last copy to the convolution (a differentiable copy of 64 x 64 x 3 x 3
    values), so the output is channels-last too and the BatchNorm, max-pool and ReLU after
    it run their NHWC kernels. On CPU (oneDNN) this made a Conv-4 step at 28 x 28 about 1.3x
    faster (`experiments/bench_speed_levers.py`, experiments/RESULTS.md). The function is the same; float
    sums run in another order, so values differ by rounding (BatchNorm's NHWC statistics
    are the least exact: ~3e-5 relative against ~1e-7).
    """

    channels_last = True  # what learners that cannot use it (MAML under vmap) look for

    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, _ChannelsLast.apply(weight), bias)


class _ChannelsLast(torch.autograd.Function):
    """`w` copied to channels-last strides; its gradient comes back in the usual (contiguous) layout.

    `.to(memory_format=...)` restrides even a one-input-channel weight, whose default strides
    already count as channels-last (`.contiguous` would keep them and leave the first, largest
    layer in NCHW). The backward is an ordinary differentiable op, so second-order MAML
    differentiates through it.
    """

    @staticmethod
    def forward(w):
        return w.to(memory_format=torch.channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Conv4(nn.Module):
    """Conv-4: 4 x [3x3 conv `hidden`, norm, ReLU, 2x2 max-pool], then flatten.

    Each block applies its ReLU after the max-pool: the same function (max-pool and ReLU
    commute, and the gradient is the same), on a quarter of the values.

    Input `[batch, in_channels, H, W]`; output `[batch, out_features]` when
    `out_features` is set (a linear classifier head, as MAML uses), else the flat
    embedding `[batch, hidden * (H // 16) * (W // 16)]` (ProtoNets, Matching Nets).
    `support_statistics` makes `norm="batch"` a SupportBatchNorm (learners with an
    inner loop); `forward(x, reference)` then normalises with the first `reference` rows.
    `channels_last` runs the convolutions in NHWC memory order (ChannelsLastConv2d): the
    same parameters and function, faster on CPU; False is the NCHW reference path.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        norm: str = "layer",
        out_features: int | None = None,
        image_size: int = 28,
        support_statistics: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        conv = ChannelsLastConv2d if channels_last else nn.Conv2d
        if image_size < 16:
            raise ConfigError(f"data.image_size={image_size}: Conv-4 pools four times and needs at least 16")
        blocks = []
        channels = in_channels
        for _ in range(4):
            blocks += [
                conv(channels, hidden, kernel_size=3, padding=1),
                _norm_layer(norm, hidden, support_statistics),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            channels = hidden
        self.features = nn.Sequential(*blocks, nn.Flatten())
        side = image_size
        for _ in range(4):
            side //= 2
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None

    def forward(self, x, reference: int | None = None):
        for layer in self.features:
            x = layer(x, reference) if isinstance(layer, SupportBatchNorm) else layer(x)
        return self.head(x) if self.head is not None else x


class MLP(nn.Module):
    """Fully connected ReLU network `in_features -> hidden... -> out_features` (MAML's sinusoid net is 1-40-40-1)."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.embedding_dim = out_features

    def forward(self, x):
        return self.net(x)


def build_model(
    backbone: str,
    *,
    out_features: int | None,
    in_channels: int = 1,
    hidden: int = 64,
    norm: str = "layer",
    image_size: int = 28,
    mlp_hidden: Sequence[int] = (40, 40),
    support_statistics: bool = False,
    channels_last: bool = False,
    text: dict | None = None,
    audio: dict | None = None,
) -> nn.Module:
    """Return a fresh backbone by name (`conv4`, `mlp`, `transformer` or `audio`); see Conv4 for
    `support_statistics` and `channels_last` (Conv-4 only).

    `text` holds the Transformer's settings: vocab_size, max_tokens, layers, heads, dropout;
    `audio` the audio encoder's: kernels, strides, context, context_net, frontend and its settings
    (metassl.models.audio).
    """
    if backbone == "audio":
        from metassl.models.audio import AudioNet

        if not audio:
            raise ConfigError("model.backbone='audio' reads waveforms: use an audio dataset "
                              "(arabic_speech_commands, audio:PATH)")
        return AudioNet(out_features, hidden=hidden, norm=norm, support_statistics=support_statistics, **audio)
    if backbone == "transformer":
        from metassl.models.transformer import TextTransformer

        if not text:
            raise ConfigError("model.backbone='transformer' reads texts: use a text dataset (clinc150, text:PATH)")
        return TextTransformer(hidden=hidden, out_features=out_features, **text)
    if backbone == "conv4":
        return Conv4(in_channels, hidden, norm, out_features, image_size, support_statistics, channels_last)
    if backbone == "mlp":
        return MLP(1, tuple(mlp_hidden), out_features or 1)
    raise ConfigError(f"model.backbone={backbone!r} is not one of ['conv4', 'mlp', 'transformer', 'audio']")

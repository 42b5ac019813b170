"""A convolutional VAE and a DCGAN-style GAN as pure functions on parameter dicts.

Both decoders map a latent code by a linear layer to `2h` maps of `S/4 x S/4`, then
double the resolution twice up to `C x S x S` logits (`h` = `hidden`, `S` = image
size, a multiple of 4): the VAE with stride-2 transposed convolutions, the GAN with
resize-convolutions (nearest-neighbour doubling, then 3x3), which do not leave the
checkerboard that transposed convolutions print into a GAN's thin strokes. The VAE's encoder and the GAN's
discriminator mirror it: two stride-2 convolutions and a linear layer.

- VAE: the encoder gives the mean and log-variance of a diagonal Gaussian posterior;
  the decoder is Bernoulli (pixels in [0, 1] as probabilities, the usual choice for
  Omniglot's strokes) or Gaussian with one learned log-scale. `vae_loss` is the
  negative ELBO per image, `recon + beta * kl`.
- GAN: the generator has group normalisation (batch-independent, so a decoded episode
  does not depend on what else is in the batch) and a sigmoid output;
  the discriminator's weights are spectrally normalised (one power iteration per step,
  Miyato et al. 2018) and it is trained with the hinge loss.

Parameters are `{name: tensor}`; the GAN's power-iteration vectors are buffers. Names
start with `enc.`/`dec.` (VAE) or `G.`/`D.` (GAN); `decode` works for either.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]
MODELS = ("vae", "gan")
LEAK = 0.2
GROUPS = 8  # group normalisation in the generator (channels are padded to a multiple by `hidden`)


def _conv_init(out_ch: int, in_ch: int, k: int, generator: torch.Generator, transpose: bool = False):
    """Kaiming-uniform weights (PyTorch's default for conv layers) and uniform biases."""
    shape = (in_ch, out_ch, k, k) if transpose else (out_ch, in_ch, k, k)
    fan_in = (out_ch if transpose else in_ch) * k * k
    bound = 1 / math.sqrt(fan_in)
    w = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    b = (torch.rand(out_ch, generator=generator) * 2 - 1) * bound
    return w, b


def _linear_init(out_f: int, in_f: int, generator: torch.Generator):
    bound = 1 / math.sqrt(in_f)
    return ((torch.rand(out_f, in_f, generator=generator) * 2 - 1) * bound,
            (torch.rand(out_f, generator=generator) * 2 - 1) * bound)


def _add(params: Params, name: str, pair) -> None:
    params[f"{name}.weight"], params[f"{name}.bias"] = pair


def init_params(model: str, *, channels: int, image_size: int, latent_dim: int, hidden: int,
                seed: int, decoder: str = "bernoulli") -> tuple[Params, Params]:
    """Fresh `(params, buffers)` of a `model` ("vae" or "gan") for `channels x image_size^2` images."""
    if model not in MODELS:
        raise ValueError(f"generative model {model!r} is not one of {list(MODELS)}")
    if image_size % 4 or image_size < 4:
        raise ValueError(f"image_size={image_size} must be a multiple of 4 (two stride-2 layers)")
    g = torch.Generator().manual_seed(seed)
    s, h = image_size // 4, hidden
    params: Params = {}
    if model == "vae":
        _add(params, "dec.fc", _linear_init(2 * h * s * s, latent_dim, g))
        _add(params, "dec.deconv1", _conv_init(h, 2 * h, 4, g, transpose=True))
        _add(params, "dec.deconv2", _conv_init(channels, h, 4, g, transpose=True))
    else:  # resize-convolutions: transposed ones leave a checkerboard in a GAN's strokes
        _add(params, "G.fc", _linear_init(2 * h * s * s, latent_dim, g))
        _add(params, "G.up1", _conv_init(h, 2 * h, 3, g))
        _add(params, "G.up2", _conv_init(channels, h, 3, g))
    enc = "enc" if model == "vae" else "D"
    _add(params, f"{enc}.conv1", _conv_init(h, channels, 4, g))
    _add(params, f"{enc}.conv2", _conv_init(2 * h, h, 4, g))
    _add(params, f"{enc}.fc", _linear_init(2 * latent_dim if model == "vae" else 1, 2 * h * s * s, g))
    buffers: Params = {}
    if model == "vae":
        if decoder == "gaussian":
            params["dec.log_sigma"] = torch.zeros(())
    else:
        for name, ch in (("G.norm0", 2 * h), ("G.norm1", h)):
            params[f"{name}.weight"], params[f"{name}.bias"] = torch.ones(ch), torch.zeros(ch)
        for layer in ("D.conv1", "D.conv2", "D.fc"):
            rows = params[f"{layer}.weight"].shape[0]
            buffers[f"{layer}.u"] = F.normalize(torch.randn(rows, generator=g), dim=0)
    return params, buffers


def model_of(params: Params) -> str:
    """"vae" or "gan", read from the parameter names."""
    return "vae" if "dec.fc.weight" in params else "gan"


def latent_dim_of(params: Params) -> int:
    prefix = "dec" if model_of(params) == "vae" else "G"
    return params[f"{prefix}.fc.weight"].shape[1]


def decode_logits(params: Params, z: torch.Tensor) -> torch.Tensor:
    """Logits `[B, C, S, S]` of the VAE decoder or the GAN generator for latent codes `z` `[B, latent_dim]`.

    The VAE upsamples with stride-2 transposed convolutions; the GAN with nearest-neighbour
    doubling then a 3x3 convolution, each after group normalisation.
    """
    gan = model_of(params) == "gan"
    pre = "G" if gan else "dec"
    p = {k[len(pre) + 1:]: v for k, v in params.items() if k.startswith(pre + ".")}
    wide = p["up1.weight" if gan else "deconv1.weight"].shape[1 if gan else 0]  # 2h
    x = F.linear(z, p["fc.weight"], p["fc.bias"])
    s = math.isqrt(x.shape[1] // wide)
    x = x.view(len(z), wide, s, s)
    if not gan:
        x = F.conv_transpose2d(F.relu(x), p["deconv1.weight"], p["deconv1.bias"], stride=2, padding=1)
        return F.conv_transpose2d(F.relu(x), p["deconv2.weight"], p["deconv2.bias"], stride=2, padding=1)
    for i in (1, 2):
        x = F.relu(F.group_norm(x, _groups(x.shape[1]), p[f"norm{i - 1}.weight"], p[f"norm{i - 1}.bias"]))
        x = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), p[f"up{i}.weight"], p[f"up{i}.bias"], padding=1)
    return x


def _groups(channels: int) -> int:
    return math.gcd(GROUPS, channels)


def decode(params: Params, z: torch.Tensor) -> torch.Tensor:
    """Images `[B, C, S, S]` in [0, 1] for latent codes `z`: the decoder's mean (VAE) or the generator's output (GAN)."""
    return torch.sigmoid(decode_logits(params, z))


def _features(params: Params, pre: str, x: torch.Tensor, weights: Params | None = None) -> torch.Tensor:
    """The two stride-2 convolutions and the linear layer of the encoder (`enc`) or discriminator (`D`)."""
    w = weights or {k: params[f"{pre}.{k}.weight"] for k in ("conv1", "conv2", "fc")}
    x = F.leaky_relu(F.conv2d(x, w["conv1"], params[f"{pre}.conv1.bias"], stride=2, padding=1), LEAK)
    x = F.leaky_relu(F.conv2d(x, w["conv2"], params[f"{pre}.conv2.bias"], stride=2, padding=1), LEAK)
    return F.linear(x.flatten(1), w["fc"], params[f"{pre}.fc.bias"])


def encode(params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of images `x` `[B, C, S, S]`: mean and log-variance, each `[B, latent_dim]`."""
    out = _features(params, "enc", x)
    mu, logvar = out.chunk(2, dim=1)
    return mu, logvar.clamp(-12.0, 8.0)


def vae_loss(params: Params, x: torch.Tensor, generator: torch.Generator,
             beta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative ELBO per image (`recon + beta * kl`, in nats) of images `x` in [0, 1], one posterior sample each."""
    mu, logvar = encode(params, x)
    eps = torch.randn(mu.shape, generator=generator).to(mu.device)  # drawn on the CPU: the same on any device
    z = mu + eps * torch.exp(0.5 * logvar)
    logits = decode_logits(params, z)
    if "dec.log_sigma" in params:  # Gaussian decoder with one learned scale
        log_sigma = params["dec.log_sigma"]
        err = (x - torch.sigmoid(logits)) / torch.exp(log_sigma)
        recon = (0.5 * err.pow(2) + log_sigma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1).mean()
    else:
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(1).mean()
    loss = recon + beta * kl
    return loss, {"recon": float(recon.detach()), "kl": float(kl.detach()), "neg_elbo": float((recon + kl).detach())}


def spectral_weights(params: Params, buffers: Params, update: bool) -> Params:
    """The discriminator's weights divided by their largest singular value (one power iteration).

    `update` writes the new power-iteration vectors into `buffers` (once per training
    step); the division stays differentiable in the weights.
    """
    out = {}
    for layer in ("conv1", "conv2", "fc"):
        w = params[f"D.{layer}.weight"]
        mat = w.reshape(w.shape[0], -1)
        with torch.no_grad():
            u = buffers[f"D.{layer}.u"]
            v = F.normalize(mat.t() @ u, dim=0, eps=1e-12)
            u = F.normalize(mat @ v, dim=0, eps=1e-12)
            if update:
                buffers[f"D.{layer}.u"] = u
        sigma = torch.dot(u, mat @ v)
        out[layer] = w / sigma
    return out


def discriminate(params: Params, weights: Params, x: torch.Tensor) -> torch.Tensor:
    """Discriminator scores `[B]` of images `x`, with spectrally normalised `weights` (`spectral_weights`)."""
    return _features(params, "D", x, weights).squeeze(1)


def gan_losses(params: Params, buffers: Params, x: torch.Tensor, generator: torch.Generator,
               update: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Hinge losses `(d_loss, g_loss, metrics)` for real images `x` and as many generated ones.

    `d_loss` sees the generated images detached (its gradient reaches D only);
    `g_loss` reaches G only through D (take its gradient with respect to G's weights).
    """
    z = torch.randn(len(x), latent_dim_of(params), generator=generator).to(x.device)
    fake = decode(params, z)
    w = spectral_weights(params, buffers, update)
    real_scores = discriminate(params, w, x)
    fake_scores = discriminate(params, w, fake.detach())
    d_loss = F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    g_loss = -discriminate(params, w, fake).mean()
    metrics = {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()),
               "d_real": float(real_scores.detach().mean()), "d_fake": float(fake_scores.detach().mean())}
    return d_loss, g_loss, metrics

"""Generative episodes (LASIUM) and mixtures of generator kinds.

`GenerativeEpisodes`: an N-way episode is N far-apart latent anchors with K + Q codes
around each (`metassl.generative.latent`), decoded by a fitted VAE or GAN; class j's
support and query images are decodings of class j's codes. Episode `i` depends only on
(seed, i), the settings and the generative model's weights: the codes come from
`np.random.default_rng([seed, i])`, and decoding runs on one thread so that every
process (trainer or actor) decodes the same pixels.

`MixedEpisodes`: episode `i` comes from the kind `mix_kind(weights, i)` picks, made by
that kind's generator as its own episode `i`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from metassl.config import AugmentConfig
from metassl.data.episodes import Episode, check_int
from metassl.errors import DataError
from metassl.generate.augment import episode_seed
from metassl.generate.record import EpisodeRecord, RecordSource, make_record
from metassl.generative.latent import task_codes
from metassl.generative.models import decode, latent_dim_of
from metassl.ssl import views

GOLDEN = (5 ** 0.5 - 1) / 2  # the Weyl sequence frac((i + 1) * GOLDEN) spreads ids evenly over [0, 1)


class GenerativeEpisodes(RecordSource):
    """LASIUM generator: `record(i)`, `episode(i)`, `batch(start, count)` from a fitted generative model.

    `params` are the model's parameters (`load_generative(...)["params"]`). `strategy`,
    `threshold`, `noise` and `interpolate` place the codes (`task_codes`); `augment`
    (None: decoded images as they are) draws a random view of every image; with
    `ssl_views`, records also carry SimCLR views and rotated copies of the support images.
    """

    def __init__(self, params: dict, n_way: int, k_shot: int, n_query: int, *, strategy: str = "n",
                 threshold: float = 6.0, noise: float = 0.5, interpolate: float = 0.2, seed: int = 0,
                 augment: AugmentConfig | None = None, ssl_views: bool = False,
                 ssl_augment: AugmentConfig | None = None):
        self.params = {k: v.detach().float().cpu() for k, v in params.items()}
        self.n_way = check_int("n_way", n_way, 2)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.seed = check_int("seed", seed, 0)
        episode_seed(self.seed, 0)  # checks seed < 2**32
        self.strategy, self.threshold, self.noise, self.interpolate = strategy, threshold, noise, interpolate
        self.dim = latent_dim_of(self.params)
        self.augment = None if augment is None else views.check_augment(augment)
        self.ssl_views = bool(ssl_views)
        self.ssl_augment = views.check_augment(ssl_augment or augment or AugmentConfig())
        task_codes(np.random.default_rng(0), strategy, self.n_way, 1, self.dim, threshold=threshold,
                   noise=noise, interpolate=interpolate)  # a threshold that cannot be met fails here

    def set_generative(self, params: dict) -> None:
        """Decode with these parameters from now on (a refitted model: `generator.generative.refit_steps`)."""
        params = {k: v.detach().float().cpu() for k, v in params.items()}
        if set(params) != set(self.params) or latent_dim_of(params) != self.dim:
            raise DataError("the refitted generative parameters are not those of the model being decoded")
        self.params = params

    def codes(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """`(codes [N, K + Q, D], anchors [N, D], seed of the view generator)` of episode `index`."""
        rng = np.random.default_rng([self.seed, check_int("episode index", index, 0)])
        codes, anchors = task_codes(rng, self.strategy, self.n_way, self.k_shot + self.n_query, self.dim,
                                    threshold=self.threshold, noise=self.noise, interpolate=self.interpolate)
        return codes, anchors, int(rng.integers(2**63 - 1))

    def decode(self, codes: np.ndarray) -> torch.Tensor:
        """Images `[..., C, H, W]` for codes `[..., D]`, decoded on one thread (the same pixels in every process)."""
        flat = torch.from_numpy(codes.reshape(-1, self.dim)).float()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                images = decode(self.params, flat)
        finally:
            torch.set_num_threads(threads)
        return images.view(*codes.shape[:-1], *images.shape[1:])

    def record(self, index: int) -> EpisodeRecord:
        """Episode `index` (generator "generative", encoder_version 0); label-major, labels 0..N-1."""
        index = check_int("episode index", index, 0)
        codes, _, view_seed = self.codes(index)
        images = self.decode(codes)  # [N, K + Q, C, H, W]
        shape = images.shape[2:]
        generator = torch.Generator().manual_seed(view_seed)
        if self.augment is not None:
            images = views.random_views(images.reshape(-1, *shape), self.augment, generator).view(images.shape)
        support = images[:, : self.k_shot].reshape(-1, *shape)
        episode = Episode(
            support_x=support,
            support_y=torch.arange(self.n_way).repeat_interleave(self.k_shot),
            query_x=images[:, self.k_shot:].reshape(-1, *shape),
            query_y=torch.arange(self.n_way).repeat_interleave(self.n_query),
        )
        ssl = views.ssl_views(support, self.ssl_augment, generator) if self.ssl_views else None
        return make_record(index, "generative", episode_seed(self.seed, index), episode, 0, ssl)


def mix_kind(weights: dict[str, float], index: int) -> str:
    """The kind of episode `index` in a mix: where frac((index + 1) * GOLDEN) falls among the
    normalised cumulative weights of the kinds in name order. Over any n consecutive ids each kind's share is within
    O(log n / n) of its weight."""
    index = check_int("episode index", index, 0)
    u = ((index + 1) * GOLDEN) % 1.0
    total = float(sum(weights.values()))
    edge = 0.0
    kinds = sorted(weights)  # the order the mapping was written in does not matter
    for kind in kinds:
        edge += weights[kind] / total
        if u < edge:
            return kind
    return kinds[-1]


class MixedEpisodes(RecordSource):
    """Several generators behind one stream: episode `i` is `sources[mix_kind(weights, i)].record(i)`.

    Records keep their generator's name; their encoder version is the mixture's (the
    cluster member's, 0 without one), since the trainer checks every episode of a step
    against the step's version. `set_encoder` reaches the members that embed.
    """

    def __init__(self, sources: dict[str, RecordSource], weights: dict[str, float]):
        if set(sources) != set(weights) or not sources:
            raise DataError(f"a mix needs one generator per weight; got {sorted(sources)} and {sorted(weights)}")
        self.sources, self.weights = sources, dict(weights)

    @property
    def encoder_version(self) -> int:
        return max((getattr(s, "encoder_version", 0) for s in self.sources.values()), default=0)

    def set_encoder(self, embed, version: int) -> None:
        embedding = [s for s in self.sources.values() if hasattr(s, "set_encoder")]
        if not embedding:
            raise DataError("no generator of this mix embeds with an encoder")
        for source in embedding:
            source.set_encoder(embed, version)

    def set_generative(self, params: dict) -> None:
        if "generative" not in self.sources:
            raise DataError("this mix has no generative episodes to decode with refitted parameters")
        self.sources["generative"].set_generative(params)

    def record(self, index: int) -> EpisodeRecord:
        record = self.sources[mix_kind(self.weights, index)].record(index)
        return dataclasses.replace(record, encoder_version=self.encoder_version)

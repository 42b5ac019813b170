"""UMTRA episodes (Khodadadeh et al. 2019): each class of an episode is one unlabelled image.

An N-way episode draws N distinct images from the unlabelled pool; image j becomes
class j, and every support and query example of class j is an independent random view
(`metassl.ssl.views.random_views`) of image j. Since the pool is large, the N images are
very likely of N different true classes, and the views teach invariance to the
augmentations.

Episode i depends only on (seed, i) and the settings: `np.random.default_rng([seed, i])`
picks the images and then the seed of the torch.Generator that draws the views, so the
same episode comes out in any order, from any instance, on any worker.
"""
from __future__ import annotations

import numpy as np
import torch

from metassl.config import AudioAugmentConfig, AugmentConfig
from metassl.data.episodes import Episode, check_int
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord, RecordSource, make_record
from metassl.ssl import views

SEED_LIMIT = 2**32  # run seeds are below this, so episode_seed() is exact


def episode_seed(seed: int, index: int) -> int:
    """Returns the int `s` with `np.random.default_rng(s)` equal to `np.random.default_rng([seed, index])`.

    NumPy reads an int seed as its little-endian 32-bit words, and pads short word lists
    with the hash of 0, so for 0 <= seed < 2**32 the int seed + index * 2**32 (words
    [seed, index]) seeds the same generator as the list [seed, index]. Generators record
    it as the seed an episode's randomness was drawn from.
    """
    seed = check_int("seed", seed, 0)
    index = check_int("episode index", index, 0)
    if seed >= SEED_LIMIT:
        raise DataError(f"seed must be < 2**32, got {seed}")
    return seed + index * SEED_LIMIT


def check_pool(images: object) -> torch.Tensor:
    """Returns `images` if it is a float32 tensor [M, C, H, W] (images) or [M, 1, T] (audio clips) with
    M >= 2, else raises DataError."""
    ok = isinstance(images, torch.Tensor) and images.dtype == torch.float32 and (
        images.ndim == 4 or (images.ndim == 3 and images.shape[1] == 1))
    if not ok:
        got = f"{images.dtype} with shape {list(images.shape)}" if isinstance(images, torch.Tensor) \
            else type(images).__name__
        raise DataError(f"the unlabelled pool must be a float32 tensor [M, C, H, W] (images) or [M, 1, T] "
                        f"(audio), got {got}")
    if len(images) < 2:
        raise DataError(f"the unlabelled pool needs at least 2 images, got {len(images)}")
    return images


class AugmentEpisodes(RecordSource):
    """UMTRA generator over an unlabelled pool: `record(i)`, `episode(i)`, `batch(start, count)`.

    `images` [M, C, H, W] float32 in [0, 1] (or audio clips [M, 1, T] with an AudioAugmentConfig:
    UMTRA for audio); each episode has `n_way` classes with `k_shot` support and `n_query` query
    views each, drawn with `augment`. With
    `ssl_views`, records also carry SimCLR views and rotated copies of the N source images.
    """

    def __init__(self, images: torch.Tensor, n_way: int, k_shot: int, n_query: int,
                 augment: AugmentConfig | AudioAugmentConfig, seed: int = 0, ssl_views: bool = False):
        self.images = check_pool(images)
        self.n_way = check_int("n_way", n_way, 2)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.seed = check_int("seed", seed, 0)
        episode_seed(self.seed, 0)  # checks seed < 2**32
        if self.n_way > len(images):
            raise DataError(
                f"n_way={self.n_way} but the unlabelled pool has only {len(images)} images "
                f"(one per class in an augmentation episode); use n_way <= {len(images)}"
            )
        self.augment = views.check_augment(augment)
        self.ssl_views = bool(ssl_views)

    def record(self, index: int) -> EpisodeRecord:
        """Returns episode `index` with its provenance (generator "augment", encoder_version 0).

        Support [N*K, C, H, W] and query [N*Q, C, H, W] are label-major; label j's examples
        are independent views of the j-th drawn image. SSL views (when enabled) are of the
        N source images and are drawn after the episode, so they do not change it.
        """
        index = check_int("episode index", index, 0)
        rng = np.random.default_rng([self.seed, index])
        sources = rng.choice(len(self.images), size=self.n_way, replace=False)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        base = self.images[torch.from_numpy(sources)]  # [N, C, H, W]
        per_class = self.k_shot + self.n_query
        shape = base.shape[1:]
        drawn = views.random_views(base.repeat_interleave(per_class, dim=0), self.augment, generator)
        drawn = drawn.view(self.n_way, per_class, *shape)
        episode = Episode(
            support_x=drawn[:, : self.k_shot].reshape(-1, *shape),
            support_y=torch.arange(self.n_way).repeat_interleave(self.k_shot),
            query_x=drawn[:, self.k_shot :].reshape(-1, *shape),
            query_y=torch.arange(self.n_way).repeat_interleave(self.n_query),
        )
        ssl = views.ssl_views(base, self.augment, generator) if self.ssl_views else None
        return make_record(index, "augment", episode_seed(self.seed, index), episode, 0, ssl)

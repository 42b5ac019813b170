"""`EpisodeRecord`: a generated episode together with where it came from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metassl.data.episodes import Episode


@dataclass(frozen=True, eq=False)
class EpisodeRecord:
    """One pseudo-labelled episode made from unlabelled images.

    `episode` is unbatched (support `[n_way*k_shot, C, H, W]`, labels 0..n_way-1,
    label-major). `seed` is the seed its randomness was drawn from (derived from the
    run seed and `episode_id`), `encoder_version` the embedding a cluster generator
    used (0 for generators without an encoder). The optional SSL views are of the
    `M` source images the episode was built from: two independent augmentations
    `ssl_x1`, `ssl_x2` `[M, C, H, W]` (SimCLR), and `rot_x` `[M, C, H, W]` rotated by
    `rot_y` `[M]` quarter turns (0..3) counter-clockwise.
    """

    episode_id: int
    generator: str
    seed: int
    episode: Episode
    encoder_version: int = 0
    ssl_x1: torch.Tensor | None = None
    ssl_x2: torch.Tensor | None = None
    rot_x: torch.Tensor | None = None
    rot_y: torch.Tensor | None = None

    @property
    def n_way(self) -> int:
        return int(self.episode.support_y.max()) + 1

    @property
    def k_shot(self) -> int:
        return len(self.episode.support_y) // self.n_way

    @property
    def n_query(self) -> int:
        return len(self.episode.query_y) // self.n_way

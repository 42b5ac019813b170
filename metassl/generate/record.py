"""`EpisodeRecord`: a generated episode together with where it came from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metassl.data.episodes import Episode, check_int, stack_episodes


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


def make_record(episode_id: int, generator: str, seed: int, episode: Episode, encoder_version: int,
                    ssl: tuple | None) -> EpisodeRecord:
    """An EpisodeRecord, with `ssl` = `(x1, x2, rot_x, rot_y)` from `views.ssl_views` or None."""
    x1, x2, rot_x, rot_y = ssl if ssl is not None else (None,) * 4
    return EpisodeRecord(episode_id, generator, seed, episode, encoder_version, x1, x2, rot_x, rot_y)


class RecordSource:
    """Mixin for episode sources that define `record(i)`: adds `episode(i)` and `batch(start, count)`."""

    def record(self, index: int) -> EpisodeRecord:
        raise NotImplementedError

    def episode(self, index: int) -> Episode:
        """Returns episode `index` (the `episode` of `record(index)`)."""
        return self.record(index).episode

    def batch(self, start: int, count: int) -> Episode:
        """Returns episodes start..start+count-1 stacked: x [count, N*K, C, H, W], y [count, N*K]."""
        start = check_int("start", start, 0)
        count = check_int("count", count, 1)
        return stack_episodes([self.episode(i) for i in range(start, start + count)])

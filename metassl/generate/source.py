"""The training episode stream of a run: labelled sampler, in-process generator, Ray pool or shards."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from metassl.config import Config
from metassl.data.episodes import Episode, stack_episodes
from metassl.errors import ConfigError
from metassl.generate.record import EpisodeRecord


@dataclass
class TrainBatch:
    """A meta-batch `[tasks, ...]` and, for generated episodes, their records (SSL views, encoder version)."""

    episodes: Episode
    records: list[EpisodeRecord] | None
    wait_s: float  # time spent waiting for the episodes

    def ssl_views(self) -> tuple[torch.Tensor, ...] | None:
        """`(x1, x2, rot_x, rot_y)` concatenated over the batch's records, or None."""
        if not self.records or self.records[0].ssl_x1 is None:
            return None
        return tuple(torch.cat([getattr(r, name) for r in self.records])
                     for name in ("ssl_x1", "ssl_x2", "rot_x", "rot_y"))

    def encoder_versions(self) -> list[int]:
        return [r.encoder_version for r in self.records or []]


class TrainingSource:
    """Meta-batches for step `s` = episodes `[s * meta_batch, (s + 1) * meta_batch)` of the run's stream.

    `generator.kind: labelled` samples true classes; `augment`/`cluster` generate
    pseudo-labelled episodes from the unlabelled train images, in this process
    (`actors` 0) or on `actors` Ray actors (the driver resolves `generator.actors`; None:
    take it from the config, auto meaning in process); `generator.shards` (when
    set) replays episodes written by `metassl generate`. `encoder` = (weights, version)
    starts a cluster generator on the model's embedding.
    """

    def __init__(self, cfg: Config, start_step: int = 0, rank: int = 0, world: int = 1,
                 encoder: tuple[dict, int] | None = None, actors: int | None = None,
                 actor_cpus: float = 1.0):
        from metassl.registry import build_generator, build_sampler, load_unlabelled

        self.cfg, self.pool, self.generator = cfg, None, None
        ep, g = cfg.episodes, cfg.generator
        if ep.meta_batch % world:
            raise ConfigError(f"episodes.meta_batch={ep.meta_batch} must be a multiple of the {world} workers")
        # Worker `rank` takes episodes [step * meta_batch + rank * per, ... + per) of each step.
        self.rank, self.per = rank, ep.meta_batch // world
        self.sampler = None
        if g.shards:  # replay episodes written by `metassl generate`, wrapping around at the end
            from metassl.generate.shards import ShardEpisodes
            self.generator = ShardEpisodes(g.shards)
            _check_shards_fit(cfg, self.generator)
            return
        if g.kind == "labelled":
            self.sampler = build_sampler(cfg, "train", n_way=ep.n_way, k_shot=ep.k_shot,
                                         n_query=ep.n_query, seed=cfg.seed)
            return
        images = load_unlabelled(cfg)
        actors = max(g.actors, 0) if actors is None else actors
        if actors == 0:
            self.generator = build_generator(cfg, images, encoder)
        else:
            from metassl.generate.pool import EpisodePool
            self.pool = EpisodePool(cfg, images, actors=actors, actor_cpus=actor_cpus, start=start_step * self.per,
                                    episode_id=self.episode_id, encoder=encoder)

    def episode_id(self, position: int) -> int:
        """The episode id of this worker's `position`-th episode."""
        step, j = divmod(position, self.per)
        return step * self.cfg.episodes.meta_batch + self.rank * self.per + j

    def batch(self, step: int) -> TrainBatch:
        """This worker's share of the meta-batch of outer step `step`."""
        per = self.per
        ids = [self.episode_id(p) for p in range(step * per, (step + 1) * per)]
        t0 = time.perf_counter()
        if self.sampler is not None:
            return TrainBatch(stack_episodes([self.sampler.episode(i) for i in ids]), None, time.perf_counter() - t0)
        if self.pool is not None:
            records = self.pool.records(step * per, per)
        else:
            size = len(self.generator) if self.cfg.generator.shards else None
            records = [self.generator.record(i % size if size else i) for i in ids]
        episodes = stack_episodes([r.episode for r in records])
        return TrainBatch(episodes, records, time.perf_counter() - t0)

    def refresh_encoder(self, state: dict, version: int) -> None:
        """Hand new encoder weights to the cluster generator (self-improving loop)."""
        from metassl.registry import model_embedder

        if self.pool is not None:
            self.pool.publish_encoder(state, version)
        elif self.generator is not None and not self.cfg.generator.shards:  # shards are fixed
            self.generator.set_encoder(model_embedder(self.cfg, state), version)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _check_shards_fit(cfg: Config, shards) -> None:
    """Raise ConfigError when episodes written by `metassl generate` do not fit this run's config."""
    first = shards.record(0)
    ep = cfg.episodes
    want = (ep.n_way, ep.k_shot, ep.n_query, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    got = (first.n_way, first.k_shot, first.n_query, *first.episode.support_x.shape[1:])
    if want != got:
        raise ConfigError(f"generator.shards={cfg.generator.shards!r} holds {got[0]}-way {got[1]}-shot "
                          f"{got[2]}-query episodes of {list(got[3:])} images, but the config asks for "
                          f"{want[0]}-way {want[1]}-shot {want[2]}-query of {list(want[3:])}")
    if cfg.objective.ssl_weight > 0 and first.ssl_x1 is None:
        raise ConfigError(f"objective.ssl_weight={cfg.objective.ssl_weight} but generator.shards="
                          f"{cfg.generator.shards!r} has no SSL views (generate them with generator.ssl_views=true)")

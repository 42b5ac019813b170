"""The training episode stream of a run: labelled sampler, in-process generator, Ray pool or shards.

Episodes are a function of the config. Episode `i` belongs to training step
`s = i // episodes.meta_batch` and, with `generator.encoder: model`, is made with the
encoder weights of version `encoder_version(cfg, s)`: the network the trainer published at
the last refresh point at or before step `s`. Generating in process or on Ray actors, with
any `max_in_flight` and `episodes_per_task`, and across actor restarts and resumes, gives
the same episodes; the settings change how episodes are made, never which.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from metassl.config import Config
from metassl.data.episodes import Episode, check_int, stack_episodes
from metassl.errors import ConfigError, DataError
from metassl.generate.record import EpisodeRecord, RecordSource


def uses_model_encoder(cfg: Config) -> bool:
    """True when episodes come from clusters of the network being meta-trained (the self-improving loop)."""
    from metassl.config import generator_kinds

    g = cfg.generator
    return "cluster" in generator_kinds(cfg) and g.encoder == "model" and not g.shards


def encoder_version(cfg: Config, step: int) -> int:
    """The encoder version of the episodes of 0-based training step `step`: the run's refresh schedule.

    With `generator.encoder: model`, the trainer publishes its network as version `t + 1`
    after outer step `t` (counting from 1) when `t == W` (`warmup_steps` W > 0) or when
    `t - W > 0` is a multiple of `refresh_every` M > 0; the episodes of step `s` (fetched
    after `s` steps) use the last version published at a `t <= s`. Before the first
    publish they are version 0 (augment episodes) with warm-up, else version 1 (the
    initial network). Every other generator is version 0 throughout.
    """
    step = check_int("step", step, 0)
    if not uses_model_encoder(cfg):
        return 0
    warmup, every = cfg.generator.warmup_steps, cfg.generator.refresh_every
    if warmup:
        if step < warmup:
            return 0
        last = warmup + ((step - warmup) // every * every if every else 0)
    else:
        if not every or step < every:
            return 1
        last = step // every * every
    return last + 1


class MomentumEncoder:
    """The encoder the self-improving loop publishes with `generator.encoder_momentum` m > 0.

    An EMA of the network's parameters, updated after every step taken (w_ema <- m w_ema
    + (1 - m) w), with its buffers (BatchNorm's running statistics) copied as they are, as
    PsCo's momentum network does: clusters of a slowly moving network change less from one
    refresh to the next than clusters of the last iterate. It starts as the network it is
    given and holds tensors of its own; `weights()` is what a refresh publishes.
    """

    def __init__(self, params: dict, buffers: dict, momentum: float):
        self.momentum = momentum
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}

    @torch.no_grad()
    def update(self, params: dict, buffers: dict) -> None:
        """A step was taken: move toward `params`, copy `buffers`."""
        for k, v in self.params.items():
            v.mul_(self.momentum).add_(params[k].detach(), alpha=1 - self.momentum)
        for k, v in self.buffers.items():
            v.copy_(buffers[k])

    def weights(self) -> dict:
        return {**self.params, **self.buffers}

    def state_dict(self) -> dict:
        return {"params": self.params, "buffers": self.buffers}

    def load_state_dict(self, state: dict, name: str) -> None:
        """Restore checkpoint `name`'s state; CheckpointError when it has none or it does not fit."""
        from metassl.errors import CheckpointError

        if not isinstance(state, dict):
            raise CheckpointError(f"{name} holds no momentum encoder for generator.encoder_momentum="
                                  f"{self.momentum} (it was saved by a run without one)")
        for part in ("params", "buffers"):
            mine, saved = getattr(self, part), state.get(part)
            if not isinstance(saved, dict) or any(
                    not isinstance(saved.get(k), torch.Tensor) or saved[k].shape != v.shape for k, v in mine.items()):
                raise CheckpointError(f"{name}: its momentum encoder's {part} do not fit this run's network")
            with torch.no_grad():
                for k, v in mine.items():
                    v.copy_(saved[k])


GENERATIVE = "generative/"  # published weights under this prefix are a refitted generative model's


def with_generative(weights: dict, generative: dict | None) -> dict:
    """An encoder's published weights, with a refitted generative model's parameters beside them."""
    return {**weights, **{GENERATIVE + k: v for k, v in (generative or {}).items()}}


def split_generative(weights: dict | None) -> tuple[dict | None, dict | None]:
    """`(encoder weights, refitted generative parameters or None)` of published weights."""
    if weights is None:
        return None, None
    generative = {k[len(GENERATIVE):]: v for k, v in weights.items() if k.startswith(GENERATIVE)}
    return {k: v for k, v in weights.items() if not k.startswith(GENERATIVE)}, generative or None


class VersionedGenerator:
    """The run's generator (`build_generator`) switched to the encoder version each caller asks for.

    `at(version, weights)` returns the generator embedding with that version: built on
    the first call, re-embedded and re-clustered (seconds for a cluster generator) only
    when the version differs from the last call's, so callers should ask in version
    order. Version 0 is the generator without a model encoder (augment episodes during
    warm-up, PCA clusters otherwise); a version >= 1 needs its weights when it is not
    the current one (`ready(version)` says whether it is). `generative` is the fitted
    generative model of generative (or mixed) episodes; None loads it from the config.
    """

    def __init__(self, cfg: Config, images: torch.Tensor, generative: dict | None = None):
        self.cfg, self.images, self.generative = cfg, images, generative
        self.source: RecordSource | None = None
        self.version: int | None = None
        self.switches = 0  # builds and re-embeddings so far

    def ready(self, version: int) -> bool:
        return self.source is not None and self.version == version

    def at(self, version: int, weights: dict | None) -> RecordSource:
        if self.ready(version):
            return self.source
        from metassl.registry import build_generator, model_embedder

        version = check_int("encoder version", version, 0)
        if version and weights is None:
            raise DataError(f"encoder version {version} is needed but its weights were not given")
        weights, refitted = split_generative(weights)
        # An embedder starts as a freshly initialised network, drawn from torch's global RNG:
        # fork it, so the trainer's random stream does not depend on where episodes are made.
        with torch.random.fork_rng(devices=[]):
            if self.source is None or not version:
                generative = self.generative if refitted is None else {**(self.generative or {}), "params": refitted}
                self.source = build_generator(self.cfg, self.images, (weights, version) if version else None,
                                              generative)
            else:
                self.source.set_encoder(model_embedder(self.cfg, weights), version)
                if refitted is not None:
                    self.source.set_generative(refitted)
        self.version = version
        self.switches += 1
        return self.source


def cpu_weights(state: dict) -> dict:
    """Detached CPU copies of an encoder's tensors (what a publish hands to the generator)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


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

    `generator.kind: labelled` samples true classes; `augment`/`cluster`/`generative`/`mix` generate
    pseudo-labelled episodes from the unlabelled train images, in this process
    (`actors` 0) or on `actors` Ray actors (the driver resolves `generator.actors`; None:
    take it from the config, auto meaning in process); `generator.shards` (when
    set) replays episodes written by `metassl generate`. With `generator.encoder: model`,
    `encoder` = (weights, version) is the encoder of `start_step` (its version must be
    `encoder_version(cfg, start_step)`; None for version 0) and `refresh_encoder` hands
    over each later version before the first batch that needs it.
    """

    def __init__(self, cfg: Config, start_step: int = 0, rank: int = 0, world: int = 1,
                 encoder: tuple[dict, int] | None = None, actors: int | None = None,
                 actor_cpus: float = 1.0, worker_cpus: float = 1.0):
        from metassl.generative.fit import needs_generative
        from metassl.registry import build_sampler, load_generative_for, load_unlabelled

        self.cfg, self.pool, self.generator, self.versioned = cfg, None, None, None
        ep, g = cfg.episodes, cfg.generator
        if ep.meta_batch % world:
            raise ConfigError(f"episodes.meta_batch={ep.meta_batch} must be a multiple of the {world} workers")
        # Worker `rank` takes episodes [step * meta_batch + rank * per, ... + per) of each step.
        self.rank, self.per = rank, ep.meta_batch // world
        self.sampler = None
        from metassl.config import is_text_config
        self.text_vocab = cfg.data.vocab_size if is_text_config(cfg) else None  # shard items are checked
        if g.shards:  # replay episodes written by `metassl generate`, wrapping around at the end
            from metassl.generate.shards import ShardEpisodes
            self.generator = ShardEpisodes(g.shards)
            _check_shards_fit(cfg, self.generator)
            return
        if g.kind == "labelled":
            self.sampler = build_sampler(cfg, "train", n_way=ep.n_way, k_shot=ep.k_shot,
                                         n_query=ep.n_query, seed=cfg.seed)
            return
        version = encoder_version(cfg, start_step)
        given = encoder[1] if encoder is not None else 0
        if given != version:
            raise DataError(f"the episodes of step {start_step} need encoder version {version} "
                            f"(generator.warmup_steps={g.warmup_steps}, refresh_every={g.refresh_every}, "
                            f"encoder={g.encoder!r}) but the encoder given is version {given}")
        weights = cpu_weights(encoder[0]) if encoder is not None and version else None
        images = load_unlabelled(cfg)
        generative = load_generative_for(cfg) if needs_generative(cfg) else None  # loaded once
        actors = max(g.actors, 0) if actors is None else actors
        if actors == 0:
            self.versioned = VersionedGenerator(cfg, images, generative)
            self.versioned.at(version, weights)  # build now: a generator that cannot be built fails early
            self._weights = {version: weights}  # published versions not yet superseded
        else:
            from metassl.generate.pool import EpisodePool
            self.pool = EpisodePool(cfg, images, actors=actors, actor_cpus=actor_cpus, start=start_step * self.per,
                                    episode_id=self.episode_id, encoder=(weights, version) if version else None,
                                    version_of=self.position_version, generative=generative,
                                    waiting_cpus=math.ceil(worker_cpus - 1e-9))  # a tuning trial's 0.9: its core

    def episode_id(self, position: int) -> int:
        """The episode id of this worker's `position`-th episode."""
        step, j = divmod(position, self.per)
        return step * self.cfg.episodes.meta_batch + self.rank * self.per + j

    def position_version(self, position: int) -> int:
        """The encoder version of this worker's `position`-th episode."""
        return encoder_version(self.cfg, position // self.per)

    def batch(self, step: int) -> TrainBatch:
        """This worker's share of the meta-batch of outer step `step`."""
        per = self.per
        ids = [self.episode_id(p) for p in range(step * per, (step + 1) * per)]
        t0 = time.perf_counter()
        if self.sampler is not None:
            return TrainBatch(stack_episodes([self.sampler.episode(i) for i in ids]), None, time.perf_counter() - t0)
        if self.generator is not None:  # shards: their records say which encoder made them
            records = [self.generator.record(i % len(self.generator)) for i in ids]
            if self.text_vocab is not None:
                from metassl.data.tokenizer import check_items
                for r in records:
                    check_items(torch.cat([r.episode.support_x, r.episode.query_x]), self.text_vocab,
                                f"episode {r.episode_id} of generator.shards")
        else:
            version = encoder_version(self.cfg, step)
            if self.pool is not None:
                records = self.pool.records(step * per, per)
            else:
                source = self.versioned.at(version, self._published(version, step))
                records = [source.record(i) for i in ids]
                self._weights = {v: w for v, w in self._weights.items() if v >= version}
            wrong = [(r.episode_id, r.encoder_version) for r in records if r.encoder_version != version]
            if wrong:
                raise DataError(f"episodes of step {step} must use encoder version {version}; "
                                f"(episode, version) {wrong[:3]} do not")
        episodes = stack_episodes([r.episode for r in records])
        return TrainBatch(episodes, records, time.perf_counter() - t0)

    def _published(self, version: int, step: int) -> dict | None:
        if version not in self._weights:
            raise DataError(f"the episodes of step {step} need encoder version {version}, which has not been "
                            f"published (refresh_encoder) or is older than episodes already made")
        return self._weights[version]

    def refresh_encoder(self, state: dict, version: int) -> None:
        """Hand over the encoder weights of `version` (self-improving loop); steps that need it use them."""
        if self.pool is not None:
            self.pool.publish_encoder(state, version)
        elif self.versioned is not None:
            version = check_int("encoder version", version, 1)
            if version in self._weights:
                raise DataError(f"encoder version {version} was already published")
            self._weights[version] = cpu_weights(state)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _check_shards_fit(cfg: Config, shards) -> None:
    """Raise ConfigError when episodes written by `metassl generate` do not fit this run's config."""
    from metassl.config import is_audio_config, is_text_config

    first = shards.record(0)
    ep, d = cfg.episodes, cfg.data
    item = ((2, d.max_tokens) if is_text_config(cfg) else (1, round(d.sample_rate * d.clip_seconds))
            if is_audio_config(cfg) else (d.channels, d.image_size, d.image_size))
    want = (ep.n_way, ep.k_shot, ep.n_query, str(torch.int64 if is_text_config(cfg) else torch.float32), *item)
    x = first.episode.support_x
    got = (first.n_way, first.k_shot, first.n_query, str(x.dtype), *x.shape[1:])
    if want != got:
        raise ConfigError(f"generator.shards={cfg.generator.shards!r} holds {got[0]}-way {got[1]}-shot "
                          f"{got[2]}-query episodes of {got[3]} {list(got[4:])} items, but the config asks for "
                          f"{want[0]}-way {want[1]}-shot {want[2]}-query of {want[3]} {list(want[4:])}")
    if cfg.objective.ssl_weight > 0 and first.ssl_x1 is None:
        raise ConfigError(f"objective.ssl_weight={cfg.objective.ssl_weight} but generator.shards="
                          f"{cfg.generator.shards!r} has no SSL views (generate them with generator.ssl_views=true)")

"""A pool of Ray actors that make episodes in parallel and deliver them in id order.

Episodes are a function of the config: episode `i` depends only on the run seed, `i`
and, for the cluster generator with `generator.encoder: model`, the encoder version the
caller's schedule assigns to its position (`version_of`; in training
`source.encoder_version` of its step). So it is the same whichever actor makes it, with
any chunk size, number in flight or actor restarts:

- every `make` call names the version and carries the weights (an object-store ref
  that the pool holds), so an actor builds the right embedding whatever calls it got
  before, and a restarted actor (rebuilt from its constructor arguments, which hold no
  encoder) needs nothing else;
- a chunk never straddles a version change (chunks are cut there), and no chunk is
  requested before its version is published: at a refresh the requests ahead stop,
  and the consumer waits while the actors re-embed with the new weights;
- chunks are requested in position order, so an actor switches encoder only forward
  (re-embedding and re-clustering costs seconds).

The pool asks for chunks of up to `chunk` consecutive episodes; at most
`max_in_flight` chunks are requested and not yet consumed (backpressure: a consumer
that stops reading stops generation, so memory stays bounded). When an actor dies, Ray
restarts it (`max_restarts=-1`) and the pool asks it again for every chunk it had not
delivered, so no episode id is lost or delivered twice.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray
import torch

from metassl.config import Config, from_dict, refresh_threads, to_dict
from metassl.data.episodes import check_int
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord
from metassl.generate.schema import from_record_batch, to_record_batch
from metassl.generate.source import VersionedGenerator, cpu_weights
from metassl.generative.fit import needs_generative
from metassl.registry import load_generative_for


MAX_RESUBMITS = 5  # times one chunk is asked for again after its actor died
RESTART_WAIT_S = 0.5  # pause before asking an actor that Ray is restarting again


@ray.remote(max_restarts=-1, max_task_retries=0)
class GeneratorActor:
    """Holds one episode generator; makes chunks of episodes with the encoder version each call names."""

    def __init__(self, config: dict, images: torch.Tensor, generative: dict | None = None):
        torch.set_num_threads(1)  # one core per actor: parallelism comes from the actors
        # built by the first call; a generative model's weights come through the object store
        self.generator = VersionedGenerator(from_dict(config), images, generative)
        self.made = 0

    def make(self, episode_ids: list[int], version: int, weights: list | None) -> pa.RecordBatch:
        """The episodes with these ids, made with encoder `version`, as one record batch.

        `weights` is None for version 0, else `[ref]` to the encoder's weights: wrapped in a
        list so that Ray does not fetch them for every call, only when the version changes.
        """
        state = ray.get(weights[0]) if weights is not None and not self.generator.ready(version) else None
        source = self.generator.at(version, state)
        records = [source.record(i) for i in episode_ids]
        self.made += len(records)
        return to_record_batch(records)

    def stats(self) -> dict:
        """pid, episodes made, encoder switches (builds and re-embeddings) and current version."""
        return {"pid": os.getpid(), "made": self.made, "switches": self.generator.switches,
                "version": self.generator.version}


class EpisodePool:
    """Ray generator actors behind an in-order stream of `EpisodeRecord`s.

    The stream is indexed by position `p = start, start + 1, ...`; position `p`
    holds episode `episode_id(p)` (the identity by default; a training worker that
    takes its share of every meta-batch maps its positions to its episode ids), made
    with encoder version `version_of(p)` (non-decreasing in `p`; None: the version of
    `encoder` = (weights, version) throughout, 0 without one). `encoder` and
    `publish_encoder` provide the weights of each version. `generative` is the fitted
    generative model (None: loaded from the config when its episodes need one).
    `waiting_cpus`: the CPUs of the process that consumes the stream, idle while the actors
    refresh (`generator.refresh_threads` auto counts them).
    """

    def __init__(self, cfg: Config, images: torch.Tensor, *, actors: int, actor_cpus: float = 1.0, start: int = 0,
                 chunk: int | None = None, max_in_flight: int | None = None, timeout_s: float = 600.0,
                 episode_id: Callable[[int], int] | None = None, encoder: tuple[dict, int] | None = None,
                 version_of: Callable[[int], int] | None = None, generative: dict | None = None,
                 waiting_cpus: float = 0.0):
        if actors < 1:
            raise DataError(f"generator.actors={actors}: a Ray pool needs at least one actor")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "local"), num_cpus=None, log_to_driver=False)
        cpus = ray.cluster_resources().get("CPU", 0)
        if actors * actor_cpus > cpus:
            raise DataError(f"generator.actors={actors} needs {actors * actor_cpus:g} CPUs but the Ray cluster "
                            f"has {cpus:g}; use generator.actors <= {int(cpus / actor_cpus)}")
        # Held for the pool's lifetime: Ray re-runs an actor's constructor with these
        # arguments when it restarts the actor.
        self._images_ref = ray.put(images)
        if generative is None and needs_generative(cfg):
            generative = load_generative_for(cfg)
        # one copy of the generative model's weights in the object store, shared by the actors
        self._generative_ref = ray.put({"params": generative["params"]}) if generative is not None else None
        # generator.refresh_threads 0 (auto): the actors' CPUs and those of the process that waits
        # for them (`waiting_cpus`, a training worker's), shared by the actors
        self.refresh_threads = refresh_threads(cfg.generator.refresh_threads, actors, actor_cpus, waiting_cpus)
        self._config = to_dict(dataclasses.replace(
            cfg, generator=dataclasses.replace(cfg.generator, refresh_threads=self.refresh_threads)))
        initial = encoder[1] if encoder is not None else 0
        # published version -> [ref to its weights] (None: version 0, no encoder); versions
        # older than the one being consumed are dropped
        self._weights: dict[int, list | None] = {initial: [ray.put(cpu_weights(encoder[0]))] if initial else None}
        self.version_of = version_of or (lambda position: initial)
        self.actors = [GeneratorActor.options(num_cpus=actor_cpus).remote(self._config, self._images_ref,
                                                                          self._generative_ref)
                       for _ in range(actors)]
        self._resubmits: dict[int, int] = {}  # chunk start -> times its actor died
        self._waits: dict[int, int] = {}  # chunk start -> pauses while its actor restarted
        self.chunk = chunk or cfg.generator.episodes_per_task
        self.max_in_flight = max_in_flight or cfg.generator.max_in_flight
        self.restarts = 0
        self.timeout_s = timeout_s
        self.episode_id = episode_id or (lambda position: position)
        self._reset(start)

    def _reset(self, start: int) -> None:
        """Forget requested work and stream from position `start` again."""
        self._next_pos = start  # next position to deliver
        self._next_request = start  # first position of the next chunk to request
        self._requests = 0  # chunks requested: they go round-robin to the actors
        # chunk start -> (end, version, actor index, ref)
        self._in_flight: dict[int, tuple[int, int, int, ray.ObjectRef]] = {}
        self._ready: list[EpisodeRecord] = []  # records of the chunk being consumed
        self._fill()

    def _submit(self, start: int, end: int, version: int, actor_index: int) -> None:
        ids = [self.episode_id(p) for p in range(start, end)]
        ref = self.actors[actor_index].make.remote(ids, version, self._weights[version])
        self._in_flight[start] = (end, version, actor_index, ref)

    def _fill(self) -> None:
        """Request chunks ahead, up to `max_in_flight`, stopping at a version not yet published."""
        while len(self._in_flight) < self.max_in_flight:
            start = self._next_request
            version = self.version_of(start)
            if version not in self._weights:
                break
            end = start + 1
            while end < start + self.chunk and self.version_of(end) == version:
                end += 1  # a chunk ends where the version changes
            self._submit(start, end, version, self._requests % len(self.actors))
            self._requests += 1
            self._next_request = end

    def _take_chunk(self) -> list[EpisodeRecord]:
        start = self._next_pos
        if start not in self._in_flight:
            version = self.version_of(start)
            raise DataError(f"episode {self.episode_id(start)} needs encoder version {version}, which has not "
                            f"been published (publish_encoder) or is older than episodes already delivered")
        while True:
            end, version, actor_index, ref = self._in_flight[start]
            try:
                batch = ray.get(ref, timeout=self.timeout_s)
                break
            except ray.exceptions.GetTimeoutError:
                raise DataError(f"generator actor {actor_index} made no episodes in {self.timeout_s:g} s "
                                f"(episode {self.episode_id(start)} on); is the Ray cluster short of CPUs?") from None
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise DataError(f"generator actor {actor_index} could not start: {e}") from None
                if isinstance(e, ray.exceptions.ActorUnavailableError):
                    waits = self._waits[start] = self._waits.get(start, 0) + 1
                    if waits * RESTART_WAIT_S > self.timeout_s:
                        raise DataError(f"generator actor {actor_index} stayed unavailable for "
                                        f"{self.timeout_s:g} s: {e}") from None
                    time.sleep(RESTART_WAIT_S)  # Ray is restarting it: a pause, not a failed try
                else:
                    tries = self._resubmits[start] = self._resubmits.get(start, 0) + 1
                    if tries > MAX_RESUBMITS:
                        raise DataError(f"generator actor {actor_index} died {tries} times making episode "
                                        f"{self.episode_id(start)}: {e}") from None
                # Ask the (restarted) actor again for every chunk it had not delivered, in
                # order; each call carries its encoder version and weights.
                self.restarts += 1
                for s, (stop, v, a, _) in sorted(self._in_flight.items()):
                    if a == actor_index:
                        self._submit(s, stop, v, a)
            except ray.exceptions.RayTaskError as e:
                raise DataError(f"generator actor {actor_index} failed making episodes "
                                f"{self.episode_id(start)}..{self.episode_id(end - 1)} with encoder version "
                                f"{version}: {e.cause}") from None
        del self._in_flight[start]
        for old in [v for v in self._weights if v < version]:
            del self._weights[old]  # every chunk still to come has this version or a later one
        self._fill()
        return from_record_batch(batch)

    def __iter__(self) -> Iterator[EpisodeRecord]:
        while True:
            yield self.next_record()

    def next_record(self) -> EpisodeRecord:
        """The record at the next position."""
        if not self._ready:
            self._ready = self._take_chunk()
        record = self._ready.pop(0)
        self._next_pos += 1
        return record

    def records(self, start: int, count: int) -> list[EpisodeRecord]:
        """Records at positions `start .. start + count - 1`; a jump elsewhere restarts the stream there."""
        if start != self._next_pos:
            self._reset(start)
        return [self.next_record() for _ in range(count)]

    def publish_encoder(self, state: dict, version: int) -> None:
        """Make encoder `version` available (one copy in the object store) and request the chunks that need it.

        Chunks are made with the version `version_of` gives their positions, never with
        whichever version was published last.
        """
        version = check_int("encoder version", version, 1)
        if version in self._weights:
            raise DataError(f"encoder version {version} was already published")
        self._weights[version] = [ray.put(cpu_weights(state))]
        self._fill()

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

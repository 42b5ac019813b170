"""A pool of Ray actors that make episodes in parallel and deliver them in id order.

Episode `i` depends only on the run seed and `i` (and, for the cluster generator,
the encoder version), so it is the same whichever actor makes it. The pool asks
for chunks of `chunk` consecutive episodes; at most `max_in_flight` chunks are
requested and not yet consumed (backpressure: a consumer that stops reading stops
generation, so memory stays bounded). When an actor dies, Ray restarts it
(`max_restarts=-1`) and the pool asks it again for every chunk it had not
delivered, so no episode id is lost or delivered twice.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray
import torch

from metassl.checkpoint import to_cpu
from metassl.config import Config, from_dict, to_dict
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord
from metassl.generate.schema import from_record_batch, to_record_batch


MAX_RESUBMITS = 5  # times one chunk is asked for again after its actor died
RESTART_WAIT_S = 0.5  # pause before asking an actor that Ray is restarting again


@ray.remote(max_restarts=-1, max_task_retries=0)
class GeneratorActor:
    """Holds one episode generator; makes chunks of episodes as Arrow record batches."""

    def __init__(self, config: dict, images: torch.Tensor, encoder_state: dict | None = None,
                 encoder_version: int = 0):
        from metassl.registry import build_generator

        torch.set_num_threads(1)  # one core per actor: parallelism comes from the actors
        self.cfg = from_dict(config)
        encoder = (encoder_state, encoder_version) if encoder_state is not None else None
        self.source = build_generator(self.cfg, images, encoder)
        self.made = 0

    def make(self, episode_ids: list[int]) -> pa.RecordBatch:
        """The episodes with these ids as one record batch."""
        records = [self.source.record(i) for i in episode_ids]
        self.made += len(records)
        return to_record_batch(records)

    def set_encoder(self, state: dict, version: int) -> int:
        """Re-embed the pool with new encoder weights (cluster generator); returns the version."""
        from metassl.registry import model_embedder

        self.source.set_encoder(model_embedder(self.cfg, state), version)
        return version

    def stats(self) -> dict:
        return {"pid": os.getpid(), "made": self.made}


class EpisodePool:
    """Ray generator actors behind an in-order stream of `EpisodeRecord`s.

    The stream is indexed by position `p = start, start + 1, ...`; position `p`
    holds episode `episode_id(p)` (the identity by default; a training worker that
    takes its share of every meta-batch maps its positions to its episode ids).
    """

    def __init__(self, cfg: Config, images: torch.Tensor, *, actors: int, actor_cpus: float = 1.0, start: int = 0,
                 chunk: int | None = None, max_in_flight: int | None = None, timeout_s: float = 600.0,
                 episode_id: Callable[[int], int] | None = None, encoder: tuple[dict, int] | None = None):
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
        self._config = to_dict(cfg)
        self._encoder: tuple[ray.ObjectRef, int] | None = None  # the last published (weights, version)
        if encoder is not None:
            self._encoder = (ray.put(to_cpu(encoder[0])), encoder[1])
        # Refs must be top-level arguments for Ray to pass their values.
        initial = self._encoder or (None, 0)
        self.actors = [GeneratorActor.options(num_cpus=actor_cpus).remote(self._config, self._images_ref, *initial)
                       for _ in range(actors)]
        self._resubmits: dict[int, int] = {}  # chunk -> times its actor died
        self._waits: dict[int, int] = {}  # chunk -> pauses while its actor restarted
        self.chunk = chunk or cfg.generator.episodes_per_task
        self.max_in_flight = max_in_flight or cfg.generator.max_in_flight
        self.restarts = 0
        self.timeout_s = timeout_s
        self.episode_id = episode_id or (lambda position: position)
        self._reset(start)

    def _reset(self, start: int) -> None:
        """Forget requested work and stream from position `start` again."""
        self._next_pos = start  # next position to deliver
        self._chunk_base = start  # position of chunk 0
        self._next_chunk = 0  # next chunk index to request
        self._in_flight: dict[int, tuple[int, ray.ObjectRef]] = {}  # chunk -> (actor index, ref)
        self._ready: list[EpisodeRecord] = []  # records of the chunk being consumed
        self._fill()

    def _submit(self, chunk_index: int, actor_index: int) -> None:
        start = self._chunk_base + chunk_index * self.chunk
        ids = [self.episode_id(p) for p in range(start, start + self.chunk)]
        ref = self.actors[actor_index].make.remote(ids)
        self._in_flight[chunk_index] = (actor_index, ref)

    def _fill(self) -> None:
        while len(self._in_flight) < self.max_in_flight:
            self._submit(self._next_chunk, self._next_chunk % len(self.actors))
            self._next_chunk += 1

    def _take_chunk(self) -> list[EpisodeRecord]:
        chunk_index = (self._next_pos - self._chunk_base) // self.chunk
        while True:
            actor_index, ref = self._in_flight[chunk_index]
            try:
                batch = ray.get(ref, timeout=self.timeout_s)
                break
            except ray.exceptions.GetTimeoutError:
                raise DataError(f"generator actor {actor_index} made no episodes in {self.timeout_s:g} s "
                                f"(episode {self.episode_id(self._next_pos)} on); is the Ray cluster short of CPUs?") from None
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):
                    raise DataError(f"generator actor {actor_index} could not build its generator: {e}") from None
                if isinstance(e, ray.exceptions.ActorUnavailableError):
                    waits = self._waits[chunk_index] = self._waits.get(chunk_index, 0) + 1
                    if waits * RESTART_WAIT_S > self.timeout_s:
                        raise DataError(f"generator actor {actor_index} stayed unavailable for "
                                        f"{self.timeout_s:g} s: {e}") from None
                    time.sleep(RESTART_WAIT_S)  # Ray is restarting it: a pause, not a failed try
                else:
                    tries = self._resubmits[chunk_index] = self._resubmits.get(chunk_index, 0) + 1
                    if tries > MAX_RESUBMITS:
                        raise DataError(f"generator actor {actor_index} died {tries} times making episode "
                                        f"{self.episode_id(self._next_pos)}: {e}") from None
                # Give the (restarted) actor the current encoder again, then ask again for
                # every chunk it had not delivered.
                self.restarts += 1
                if self._encoder is not None:
                    self.actors[actor_index].set_encoder.remote(*self._encoder)
                for c, (a, _) in sorted(self._in_flight.items()):
                    if a == actor_index:
                        self._submit(c, a)
        del self._in_flight[chunk_index]
        self._fill()
        return from_record_batch(batch)

    def __iter__(self) -> Iterator[EpisodeRecord]:
        while True:
            yield self.next_record()

    def next_record(self) -> EpisodeRecord:
        """The record at the next position."""
        if not self._ready:
            self._ready = self._take_chunk()
            skip = (self._next_pos - self._chunk_base) % self.chunk
            self._ready = self._ready[skip:]
        record = self._ready.pop(0)
        self._next_pos += 1
        return record

    def records(self, start: int, count: int) -> list[EpisodeRecord]:
        """Records at positions `start .. start + count - 1`; a jump elsewhere restarts the stream there."""
        if start != self._next_pos:
            self._reset(start)
        return [self.next_record() for _ in range(count)]

    def publish_encoder(self, state: dict, version: int) -> None:
        """Send new encoder weights to every actor through the object store (one copy).

        Chunks requested before the publish may still come from the previous encoder;
        every record says which version made it.
        """
        self._encoder = (ray.put(to_cpu(state)), version)
        for actor in self.actors:
            actor.set_encoder.remote(*self._encoder)

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

"""Ray generator actors: determinism across actor counts, restarts, backpressure, encoder versions."""
import dataclasses
import time

import pytest
import torch

from metassl import checkpoint, config
from metassl.errors import DataError
from metassl.generate.pool import EpisodePool
from metassl.generate.source import TrainingSource, encoder_version
from metassl.registry import build_generator, load_unlabelled

pytestmark = pytest.mark.usefixtures("ray_session")

CFG = config.load("experiments/digits_protonet.yaml", [
    "generator.kind=augment", "generator.episodes_per_task=3", "generator.max_in_flight=4",
    "episodes.n_way=3", "episodes.k_shot=1", "episodes.n_query=2", "generator.ssl_views=true"])


@pytest.fixture(scope="module")
def images():
    return load_unlabelled(CFG)


def _same(a, b):
    ea, eb = a.episode, b.episode
    return (a.episode_id == b.episode_id and a.seed == b.seed and torch.equal(ea.support_x, eb.support_x)
            and torch.equal(ea.query_x, eb.query_x) and torch.equal(ea.support_y, eb.support_y)
            and torch.equal(a.ssl_x1, b.ssl_x1) and torch.equal(a.rot_y, b.rot_y))


def test_one_and_two_actors_make_byte_identical_episodes(images):
    reference = build_generator(CFG, images)
    records = []
    for actors in (1, 2):  # one pool at a time: the session has 2 CPUs
        pool = EpisodePool(CFG, images, actors=actors)
        try:
            records.append(pool.records(0, 20))
        finally:
            pool.close()
    r1, r2 = records
    assert [r.episode_id for r in r1] == list(range(20)) == [r.episode_id for r in r2]
    for a, b in zip(r1, r2):
        assert _same(a, b)
        assert _same(a, reference.record(a.episode_id))


def test_stream_restarts_at_a_new_position(images):
    pool = EpisodePool(CFG, images, actors=2, start=7)
    try:
        assert [r.episode_id for r in pool.records(7, 4)] == [7, 8, 9, 10]
        assert [r.episode_id for r in pool.records(30, 2)] == [30, 31]  # a resume elsewhere
    finally:
        pool.close()


def test_killed_actor_loses_and_duplicates_no_episode(images, ray_session):
    pool = EpisodePool(CFG, images, actors=2)
    reference = build_generator(CFG, images)
    try:
        got = pool.records(0, 5)
        ray_session.kill(pool.actors[1], no_restart=False)  # Ray restarts it; its chunks are made again
        got += pool.records(5, 25)
        assert pool.restarts >= 1
    finally:
        pool.close()
    assert [r.episode_id for r in got] == list(range(30))
    assert all(_same(r, reference.record(r.episode_id)) for r in got)


def test_consumer_that_never_reads_keeps_generation_bounded(images):
    # Bound: at most max_in_flight chunks of episodes_per_task episodes exist unread.
    pool = EpisodePool(CFG, images, actors=2, chunk=3, max_in_flight=4)
    try:
        time.sleep(3)
        made = sum(s["made"] for s in pool.stats())
        assert made <= 4 * 3
        pool.records(0, 3)  # consuming one chunk lets exactly one more be made
        time.sleep(1)
        assert sum(s["made"] for s in pool.stats()) <= 5 * 3
    finally:
        pool.close()


# --- encoder versions: episodes are a function of the config, whatever the pool settings ----

SELF_IMPROVING = ["generator.kind=cluster", "generator.encoder=model", "generator.clusters=12",
                  "generator.partitions=2", "model.hidden=8", "episodes.n_way=3", "episodes.k_shot=1",
                  "episodes.n_query=2", "episodes.meta_batch=2", "generator.warmup_steps=2",
                  "generator.refresh_every=2"]
STEPS = 8  # versions 0, 0, 3, 3, 5, 5, 7, 7


def self_improving(*overrides):
    return config.load("experiments/digits_protonet.yaml", SELF_IMPROVING + list(overrides))


@pytest.fixture(scope="module")
def weights():
    """Distinct encoder weights for versions 3, 5, 7 (the backbone initialised with seed = version)."""
    from metassl.registry import build_backbone, build_learner

    cfg = self_improving()
    out = {}
    for v in (3, 5, 7):
        model = build_backbone(dataclasses.replace(cfg, seed=v), build_learner(cfg))
        out[v] = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return out


def drive(source, cfg, weights, steps, on_publish=None):
    """Fetch the batches of `steps` as the trainer does: publish each new version just before its first step."""
    records = []
    for step in steps:
        version = encoder_version(cfg, step)
        if step and version != encoder_version(cfg, step - 1):
            source.refresh_encoder(weights[version], version)
            if on_publish:
                on_publish(version)
        records += source.batch(step).records
    return records


def same_record(a, b) -> bool:
    ea, eb = a.episode, b.episode
    return ((a.episode_id, a.generator, a.seed, a.encoder_version) == (b.episode_id, b.generator, b.seed,
                                                                       b.encoder_version)
            and all(torch.equal(getattr(ea, k), getattr(eb, k)) for k in ("support_x", "query_x", "query_y")))


@pytest.fixture(scope="module")
def in_process(weights):
    """The reference: the 16 episodes of steps 0..7 made in this process."""
    cfg = self_improving()
    return drive(TrainingSource(cfg, actors=0), cfg, weights, range(STEPS))


@pytest.mark.parametrize("actors, per_task, in_flight, rank, world, threads, resolved", [
    (1, 3, 4, 0, 1, 0, 2), (2, 5, 1, 0, 1, 2, 2), (2, 3, 2, 1, 2, 0, 1), (1, 3, 2, 0, 1, 1, 1)])
def test_encoder_versions_follow_the_schedule_whatever_the_pool_settings(
        weights, in_process, actors, per_task, in_flight, rank, world, threads, resolved):
    cfg = self_improving(f"generator.episodes_per_task={per_task}", f"generator.max_in_flight={in_flight}",
                         f"generator.refresh_threads={threads}")
    source = TrainingSource(cfg, rank=rank, world=world, actors=actors)
    try:
        # refresh_threads 0 (auto): the actors' CPU and the waiting worker's, shared by the actors
        assert source.pool.refresh_threads == resolved
        got = drive(source, cfg, weights, range(STEPS))
        switches = [s["switches"] for s in source.pool.stats()]
    finally:
        source.close()
    want = in_process[rank::world]  # worker `rank` takes its share of every meta-batch
    assert [r.episode_id for r in got] == [r.episode_id for r in want]
    assert [r.encoder_version for r in got] == [encoder_version(cfg, r.episode_id // 2) for r in got]
    assert all(same_record(a, b) for a, b in zip(got, want))
    assert max(switches) <= 4  # versions 0, 3, 5, 7 at most once each: never back to an old one


def test_actor_killed_while_switching_encoder_makes_the_same_episodes(weights, in_process, ray_session):
    cfg = self_improving("generator.episodes_per_task=3", "generator.max_in_flight=4")
    source = TrainingSource(cfg, actors=2)

    def kill_on_first_refresh(version):
        if version == 3:  # actor 1 was just asked for a chunk of version 3: it is re-embedding
            ray_session.kill(source.pool.actors[1], no_restart=False)

    try:
        got = drive(source, cfg, weights, range(STEPS), on_publish=kill_on_first_refresh)
        assert source.pool.restarts >= 1
    finally:
        source.close()
    assert len(got) == len(in_process) and all(same_record(a, b) for a, b in zip(got, in_process))


def test_pool_waits_for_a_version_before_asking_for_its_episodes(images, weights):
    cfg = self_improving()
    pool = EpisodePool(cfg, images, actors=1, chunk=3, max_in_flight=4,
                       version_of=lambda position: 0 if position < 4 else 3)
    try:
        assert [r.encoder_version for r in pool.records(0, 4)] == [0] * 4
        with pytest.raises(DataError, match="episode 4 needs encoder version 3, which has not been published"):
            pool.records(4, 1)
        assert pool.stats()[0]["made"] == 4  # chunks [0, 3) and [3, 4): nothing ahead with the old encoder
        pool.publish_encoder(weights[3], 3)
        later = pool.records(4, 5)
        with pytest.raises(DataError, match="encoder version 3 was already published"):
            pool.publish_encoder(weights[3], 3)
        with pytest.raises(DataError, match="encoder version must be an integer >= 1, got 0"):
            pool.publish_encoder(weights[3], 0)
    finally:
        pool.close()
    assert [r.encoder_version for r in later] == [3] * 5


def test_training_parameters_do_not_depend_on_actors_chunks_or_resumes(tmp_path, ray_session):
    """Runs that differ only in generator.actors/max_in_flight/episodes_per_task train identically."""
    from metassl.trainer import LocalContext, train_loop

    def run(name, actors, per_task, in_flight, steps=6):
        cfg = self_improving(f"generator.episodes_per_task={per_task}", f"generator.max_in_flight={in_flight}",
                             f"train.steps={steps}", "train.log_every=1", "train.val_every=6",
                             "train.checkpoint_every=6", "train.val_episodes=5", "eval.episodes=5")
        train_loop(cfg, tmp_path / name, LocalContext(generator_actors=actors), log=lambda *_: None,
                   final_eval=False)
        return checkpoint.load(checkpoint.step_path(tmp_path / name, steps))

    # chunks of 3 episodes (steps of 2) cross the refreshes after steps 2 and 4
    reference = run("in_process", actors=0, per_task=3, in_flight=1)
    runs = [run("two_actors", actors=2, per_task=3, in_flight=4)]
    run("resumed", actors=0, per_task=5, in_flight=2, steps=3)  # stops after the first refresh ...
    runs.append(run("resumed", actors=2, per_task=1, in_flight=3))  # ... and resumes on actors
    for state in runs:
        assert state["encoder"]["version"] == reference["encoder"]["version"] == 7  # published after step 6
        assert torch.equal(state["torch_rng"], reference["torch_rng"])  # generating drew nothing from it
        for part in ("params", "buffers"):
            for k, v in reference[part].items():
                assert torch.equal(state[part][k], v), (part, k)
        for k, v in reference["encoder"]["weights"].items():
            assert torch.equal(state["encoder"]["weights"][k], v), k

"""Ray generator actors: determinism across actor counts, restarts, backpressure."""
import time

import pytest
import torch

from metassl import config
from metassl.generate.pool import EpisodePool
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


def test_cluster_actors_take_new_encoder_weights_while_running(images):
    cfg = config.load("experiments/digits_protonet.yaml", [
        "generator.kind=cluster", "generator.encoder=model", "generator.clusters=12", "generator.partitions=2",
        "generator.episodes_per_task=2", "generator.max_in_flight=2", "model.hidden=8",
        "episodes.n_way=3", "episodes.k_shot=1", "episodes.n_query=2"])
    from metassl.registry import build_backbone, build_learner

    model = build_backbone(cfg, build_learner(cfg))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    pool = EpisodePool(cfg, images, actors=1)
    try:
        before = pool.records(0, 4)
        pool.publish_encoder(state, version=7)
        # chunks asked for before the publish may still use version 0; later ones use 7
        later = pool.records(4, 4 * 3)
    finally:
        pool.close()
    assert {r.encoder_version for r in before} == {0}
    assert later[-1].encoder_version == 7
    versions = [r.encoder_version for r in later]
    assert versions == sorted(versions)  # never back to an old encoder

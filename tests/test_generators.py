"""Batched views, UMTRA (augmentation) and CACTUs (cluster) episode generators."""
import dataclasses

import numpy as np
import pytest
import torch

from metassl import config
from metassl.config import AugmentConfig
from metassl.data import load_split
from metassl.errors import ConfigError, DataError
from metassl.generate.augment import AugmentEpisodes, episode_seed
from metassl.generate.cluster import ClusterEpisodes
from metassl.generate.source import TrainingSource, encoder_version
from metassl.ssl.views import random_views, rotate_quarters, ssl_views

IDENTITY = AugmentConfig(rotation_deg=0, translate=0, scale_min=1, scale_max=1, shear_deg=0)
FULL = AugmentConfig(elastic_alpha=1.5, noise_std=0.05, erase_prob=0.5)
SMALL = AugmentConfig(rotation_deg=5, translate=0.03, scale_min=0.95, scale_max=1.05, shear_deg=3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random smooth-ish images [count, 1, size, size] in [0, 1]."""
    return torch.rand(count, 1, size, size, generator=gen(seed))


# --- views ----------------------------------------------------------------------------

def test_random_views_shape_range_and_determinism():
    x = images(12, size=20)
    a = random_views(x, FULL, gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, random_views(x, FULL, gen(1)))
    assert not torch.allclose(a, random_views(x, FULL, gen(2)))
    # each image gets its own warp: the same image twice in a batch gives two different views
    pair = random_views(x[:1].repeat(2, 1, 1, 1), AugmentConfig(), gen(0))
    assert not torch.allclose(pair[0], pair[1])


def test_identity_config_reproduces_the_input():
    x = torch.rand(5, 3, 12, 17, generator=gen(3))  # non-square, several channels
    assert torch.allclose(random_views(x, IDENTITY, gen(0)), x, atol=1e-5)


def test_translation_moves_ink_and_erasing_removes_it():
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1
    shifted = random_views(x, dataclasses.replace(IDENTITY, translate=0.2), gen(0))
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-3)  # ink kept, moved
    assert not torch.allclose(shifted, x)
    erased = random_views(torch.ones(64, 1, 16, 16), dataclasses.replace(IDENTITY, erase_prob=1.0,
                                                                        erase_max_frac=0.5), gen(0))
    lost = 1 - erased.mean((1, 2, 3))
    assert (lost <= 0.5 + 0.1).all() and (lost > 0).float().mean() > 0.8


def test_bad_augment_config_names_the_field():
    with pytest.raises(ConfigError, match="scale_min"):
        random_views(images(2), AugmentConfig(scale_min=0.0), gen(0))
    with pytest.raises(ConfigError, match="noise_std"):
        random_views(images(2), AugmentConfig(noise_std=-1.0), gen(0))


def test_rotate_quarters_matches_rot90_per_image():
    x = torch.rand(9, 2, 7, 7, generator=gen(0))
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1])
    out = rotate_quarters(x, k)
    for b in range(len(x)):
        assert torch.equal(out[b], torch.rot90(x[b], int(k[b]), dims=(-2, -1)))
    with pytest.raises(DataError, match="0..3"):
        rotate_quarters(x, torch.full((9,), 4))
    with pytest.raises(DataError, match=r"\[9\]"):
        rotate_quarters(x, torch.zeros(3, dtype=torch.int64))


def test_ssl_views():
    x = images(6)
    x1, x2, rot_x, rot_y = ssl_views(x, AugmentConfig(), gen(0))
    assert x1.shape == x2.shape == rot_x.shape == x.shape
    assert rot_y.dtype == torch.int64 and rot_y.shape == (6,) and 0 <= rot_y.min() and rot_y.max() <= 3
    assert not torch.allclose(x1, x2)
    assert torch.equal(rot_x, rotate_quarters(x, rot_y))


# --- augmentation episodes (UMTRA) -----------------------------------------------------

def assert_valid(episode, n_way, k_shot, n_query, shape):
    assert episode.support_x.shape == (n_way * k_shot, *shape)
    assert episode.query_x.shape == (n_way * n_query, *shape)
    assert torch.equal(episode.support_y, torch.arange(n_way).repeat_interleave(k_shot))
    assert torch.equal(episode.query_y, torch.arange(n_way).repeat_interleave(n_query))
    assert episode.support_x.dtype == torch.float32


def nearest(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Returns the row of `pool` nearest (L2) to each image of `x`."""
    return torch.cdist(x.flatten(1), pool.flatten(1)).argmin(1)


def test_augment_episode_labels_and_sources():
    pool = images(40)
    gen_ = AugmentEpisodes(pool, 5, 2, 3, SMALL, seed=7)
    record = gen_.record(3)
    assert (record.generator, record.encoder_version, record.episode_id) == ("augment", 0, 3)
    assert record.seed == episode_seed(7, 3)
    assert (record.n_way, record.k_shot, record.n_query) == (5, 2, 3)
    assert record.ssl_x1 is None
    episode = record.episode
    assert_valid(episode, 5, 2, 3, pool.shape[1:])
    support_src, query_src = nearest(episode.support_x, pool), nearest(episode.query_x, pool)
    for label in range(5):
        sources = torch.cat([support_src[episode.support_y == label], query_src[episode.query_y == label]])
        assert (sources == sources[0]).all()  # one source image per label ...
    assert len(set(support_src.tolist())) == 5  # ... and distinct images for distinct labels
    for s in episode.support_x:
        assert not any(torch.equal(s, q) for q in episode.query_x)


def test_episode_seed_reproduces_the_generator():
    a = np.random.default_rng([3, 12345]).integers(2**63 - 1, size=4)
    assert (np.random.default_rng(episode_seed(3, 12345)).integers(2**63 - 1, size=4) == a).all()


def test_augment_determinism_and_batch():
    pool = images(30)
    a = AugmentEpisodes(pool, 3, 1, 2, FULL, seed=1, ssl_views=True)
    fifth = a.record(5)
    again = [a.record(i) for i in range(6)]
    other = AugmentEpisodes(pool, 3, 1, 2, FULL, seed=1, ssl_views=True).record(5)
    for r in (again[5], other):
        for name in ("support_x", "query_x", "support_y", "query_y"):
            assert torch.equal(getattr(fifth.episode, name), getattr(r.episode, name))
        for name in ("ssl_x1", "ssl_x2", "rot_x", "rot_y"):
            assert torch.equal(getattr(fifth, name), getattr(r, name))
    assert fifth.ssl_x1.shape == (3, *pool.shape[1:]) and fifth.rot_y.shape == (3,)
    assert not torch.equal(again[0].episode.support_x, again[1].episode.support_x)
    # SSL views are drawn after the episode: switching them off leaves the episode unchanged
    plain = AugmentEpisodes(pool, 3, 1, 2, FULL, seed=1).episode(5)
    assert torch.equal(plain.query_x, fifth.episode.query_x)
    assert not torch.equal(AugmentEpisodes(pool, 3, 1, 2, FULL, seed=2).episode(5).query_x, plain.query_x)
    batch = a.batch(4, 2)
    assert batch.batched and batch.support_x.shape == (2, 3, *pool.shape[1:])
    assert torch.equal(batch.query_x[1], plain.query_x)


def test_augment_errors():
    with pytest.raises(DataError, match="n_way=11.*10 images"):
        AugmentEpisodes(images(10), 11, 1, 1, SMALL)
    with pytest.raises(DataError, match="k_shot"):
        AugmentEpisodes(images(10), 5, 0, 1, SMALL)
    with pytest.raises(DataError, match="float32"):
        AugmentEpisodes(torch.zeros(10, 16, 16), 5, 1, 1, SMALL)
    with pytest.raises(DataError, match="episode index"):
        AugmentEpisodes(images(10), 5, 1, 1, SMALL).record(-1)


# --- cluster episodes (CACTUs) ---------------------------------------------------------

def blobs(classes: int = 10, per_class: int = 30, size: int = 8, noise: float = 0.02
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images [classes*per_class, 1, size, size], true blob [classes*per_class])."""
    g = gen(0)
    prototypes = torch.rand(classes, 1, size, size, generator=g)
    truth = torch.arange(classes).repeat_interleave(per_class)
    noise = noise * torch.randn(len(truth), 1, size, size, generator=g)
    return (prototypes[truth] + noise).clamp(0, 1), truth


@pytest.fixture(scope="module")
def blob_generator():
    pool, truth = blobs()
    return ClusterEpisodes(pool, 5, 2, 4, clusters=10, partitions=2, seed=3, embedding_dim=8), pool, truth


def test_cluster_episodes_follow_the_true_blobs(blob_generator):
    generator, pool, truth = blob_generator
    record = generator.record(0)
    assert (record.generator, record.encoder_version, record.seed) == ("cluster", 0, episode_seed(3, 0))
    for i in range(8):
        episode = generator.episode(i)
        assert_valid(episode, 5, 2, 4, pool.shape[1:])
        _, _, support, query = generator.episode_indices(i)
        assert torch.equal(episode.support_x, pool[support]) and torch.equal(episode.query_x, pool[query])
        assert not set(support) & set(query)
        s_blob, q_blob = truth[support].view(5, 2), truth[query].view(5, 4)
        assert (s_blob == s_blob[:, :1]).all() and (q_blob == s_blob[:, :1]).all()
        assert len(set(s_blob[:, 0].tolist())) == 5  # distinct labels are distinct blobs


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_cluster_determinism_and_new_embeddings(blob_generator):
    generator, pool, truth = blob_generator
    first = generator.episode(4)
    twin = ClusterEpisodes(pool, 5, 2, 4, clusters=10, partitions=2, seed=3, embedding_dim=8)
    assert torch.equal(twin.episode(4).support_x, first.support_x)
    assert torch.equal(generator.batch(3, 2).query_x[1], first.query_x)

    # An encoder that only sees the blob's parity: two big clusters, the others empty.
    parity = torch.nn.functional.one_hot(truth % 2, 2).float()
    with pytest.raises(DataError, match=r"clusters=10 has only 2 clusters.*k_shot \+ n_query = 6.*n_way=5"):
        twin.set_embeddings(parity, version=1)
    assert twin.encoder_version == 0  # a failed update keeps the previous state
    # A new encoder: the flattened pixels. Partitions follow the blobs again.
    twin.set_encoder(lambda x: x.flatten(1) * 2, version=4)
    assert twin.encoder_version == 4 and twin.record(0).encoder_version == 4
    assert twin.embeddings.shape == (len(pool), 64)
    for p in range(2):  # each cluster is one blob
        for c in range(10):
            members = truth[torch.from_numpy(twin.labels[p] == c)]
            assert len(members) == 0 or (members == members[0]).all()


def test_refresh_threads_give_the_one_thread_result_bitwise(monkeypatch):
    """generator.refresh_threads embeds chunks and runs k-means partitions side by side with the
    run's own encoder (registry.model_embedder); every process relies on the result being bitwise
    what one thread gives, so each job must run on one thread whatever the caller's setting."""
    import threading

    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
    from threadpoolctl import threadpool_info

    from metassl.generate import cluster
    from metassl.meta.functional import forward
    from metassl.registry import build_backbone, build_learner, model_embedder

    cfg = config.load(None, ["data.image_size=28", "model.hidden=16", "model.norm=batch", "learner.name=protonet"])
    model = build_backbone(cfg, build_learner(cfg))
    torch.manual_seed(5)
    state = {k: v.detach() + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in (dict(model.named_parameters()) | dict(model.named_buffers())).items()}
    state["head.weight"] = torch.zeros(3)  # weights the backbone lacks are ignored
    embedder = model_embedder(cfg, state)
    seen = []  # (thread, its torch thread count) of each chunk

    def embed(x):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return embedder(x)

    pool = images(700, size=28, seed=2)
    threads = torch.get_num_threads()
    one = cluster.embed_images(pool, embed, chunk=64, threads=1)
    seen.clear()
    side_by_side = cluster.embed_images(pool, embed, chunk=64, threads=4)
    assert torch.get_num_threads() == threads  # the caller's count is restored after the refresh
    assert torch.equal(one, side_by_side)
    assert len(seen) == 11 and {n for _, n in seen} == {1} and len({t for t, _ in seen}) > 1
    torch.set_num_threads(1)
    try:  # the embedder is the backbone with those weights, as a functional call gives it
        with torch.no_grad():
            reference = forward(model.eval(), {k: state[k] for k, _ in model.named_parameters()},
                                {k: state[k] for k, _ in model.named_buffers()}, pool[:64])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[:64], reference)
    for v in state.values():  # the embedder holds its own copy of the weights
        v.zero_() if v.is_floating_point() else None
    assert torch.equal(cluster.embed_images(pool[:64], embedder, threads=2), one[:64])
    with pytest.raises(DataError, match=r"embeddings \[B, D\]; for B = 64 it returned \[64, 2, 2\]"):
        cluster.embed_images(pool[:128], lambda x: torch.zeros(len(x), 2, 2), chunk=64, threads=2)

    runs = []  # (thread, OpenMP threads, BLAS threads) of each k-means run

    class SpyKMeans(cluster.KMeans):
        def fit_predict(self, x, y=None, sample_weight=None):
            blas = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
            runs.append((threading.get_ident(), _openmp_effective_n_threads(), blas))
            return super().fit_predict(x, y, sample_weight)

    monkeypatch.setattr(cluster, "KMeans", SpyKMeans)
    labels = cluster.kmeans_partitions(one.numpy(), 20, 3, seed=7, threads=1)
    assert labels.dtype == np.int64 and labels.shape == (3, 700)
    runs.clear()
    assert np.array_equal(cluster.kmeans_partitions(one.numpy(), 20, 3, seed=7, threads=3), labels)
    assert len(runs) == 3 and all(n == 1 and blas <= {1} for _, n, blas in runs)
    assert not np.array_equal(labels[0], labels[1])  # each partition has its own seed

    with pytest.raises(ConfigError, match=r"encoder weight 'features.0.weight' is \[2\]"):
        model_embedder(cfg, {**state, "features.0.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="generator.refresh_threads"):
        config.load(None, ["generator.refresh_threads=-1"])
    with pytest.raises(DataError, match="threads must be an integer >= 1"):
        ClusterEpisodes(pool, 5, 1, 1, clusters=10, partitions=1, embedding_dim=4, threads=0)


def test_refresh_threads_auto_shares_the_ray_allotment():
    """0 (auto): the actors' CPUs plus the waiting worker's, shared by the actors, at least 1."""
    from metassl.config import refresh_threads

    assert refresh_threads(0, actors=1, actor_cpus=1.0, waiting_cpus=1.0) == 2  # one worker, one actor
    assert refresh_threads(0, actors=3, actor_cpus=1.0, waiting_cpus=1.0) == 1
    assert refresh_threads(0, actors=1, actor_cpus=3.0, waiting_cpus=1.0) == 4
    assert refresh_threads(0, actors=4, actor_cpus=0.25, waiting_cpus=0.0) == 1  # fractions: at least 1
    assert refresh_threads(0, actors=8, actor_cpus=1.0, waiting_cpus=0.0) == 1  # `metassl generate`
    assert refresh_threads(3, actors=8, actor_cpus=1.0, waiting_cpus=0.0) == 3  # explicit: kept


def test_cluster_augment_and_ssl(blob_generator):
    _, pool, _ = blob_generator
    generator = ClusterEpisodes(pool, 3, 1, 2, clusters=10, partitions=1, embedding_dim=4,
                                augment=SMALL, ssl_views=True)
    record = generator.record(2)
    _, _, support, _ = generator.episode_indices(2)
    assert not torch.equal(record.episode.support_x, pool[support])
    assert record.ssl_x1.shape == record.rot_x.shape == (3, *pool.shape[1:])  # the support images
    assert torch.equal(generator.record(2).ssl_x2, record.ssl_x2)


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_cluster_errors():
    pool, _ = blobs(classes=4, per_class=10, noise=0.0)  # 4 distinct images, 10 copies each
    with pytest.raises(DataError, match="clusters=3 must lie between n_way=5"):
        ClusterEpisodes(pool, 5, 1, 1, clusters=3, partitions=1, embedding_dim=4)
    with pytest.raises(DataError, match="only 4 clusters of at least k_shot \\+ n_query = 2"):
        ClusterEpisodes(pool, 5, 1, 1, clusters=8, partitions=1, embedding_dim=4)
    with pytest.raises(DataError, match="embedding_dim=100"):
        ClusterEpisodes(pool, 2, 1, 1, clusters=4, partitions=1, embedding_dim=100)
    with pytest.raises(DataError, match=r"\[B, D\]"):
        ClusterEpisodes(pool, 2, 1, 1, clusters=4, partitions=1, embed=lambda x: x)


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")
def test_core_fraction_draws_only_the_members_nearest_each_cluster_mean():
    # 6 clusters of 10 points in a 2-D embedding: in each, 6 lie within 0.1 of the centre and 4 far out
    # (5 to 8 away, still nearest their own centre), so k-means finds the 6 and the core of 0.55
    # (ceil(5.5) = 6 members) is exactly the near points
    g = gen(1)
    pool = torch.rand(60, 1, 4, 4, generator=g)
    centre = torch.stack([100 * torch.arange(6.0), torch.zeros(6)], 1).repeat_interleave(10, 0)
    far = torch.tensor([i % 10 >= 6 for i in range(60)])
    angle = 2 * torch.pi * torch.rand(60, generator=g)
    radius = torch.where(far, 5 + 3 * torch.rand(60, generator=g), 0.1 * torch.rand(60, generator=g))
    embeddings = centre + radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    seen = {}
    for fraction in (1.0, 0.55):
        generator = ClusterEpisodes(pool, 3, 1, 2, clusters=6, partitions=1, seed=0, embedding_dim=4,
                                    core_fraction=fraction)
        generator.set_embeddings(embeddings, version=1)
        kept = np.sort(np.concatenate(generator.members[0]))
        assert len(generator.members[0]) == 6
        rows = set()
        for i in range(200):
            _, _, support, query = generator.episode_indices(i)
            rows |= set(support.tolist()) | set(query.tolist())
        seen[fraction] = rows
        if fraction == 1.0:
            assert kept.tolist() == list(range(60))
        else:
            assert kept.tolist() == np.flatnonzero(~far.numpy()).tolist()
    assert seen[1.0] == set(range(60))  # every member, far ones included, gets drawn
    assert seen[0.55] == set(np.flatnonzero(~far.numpy()).tolist())  # only the cores
    # a core too small for k_shot + n_query = 3 (ceil(0.2 * 10) = 2), and a fraction out of range, are refused
    planted = lambda x: embeddings[: len(x)]  # noqa: E731  (the whole pool is one chunk)
    with pytest.raises(DataError, match=r"k_shot \+ n_query = 3 images \(core_fraction=0.2\).*larger core_fraction"):
        ClusterEpisodes(pool, 3, 1, 2, clusters=6, partitions=1, seed=0, embed=planted, core_fraction=0.2)
    for bad in (0.0, 1.5, float("nan"), "0.5", True, None):
        with pytest.raises(DataError, match=r"core_fraction.* must be .*\(0, 1\]"):
            ClusterEpisodes(pool, 3, 1, 2, clusters=6, partitions=1, embedding_dim=4, core_fraction=bad)
    cfg = self_improving(0, 0, "generator.core_fraction=0.5")
    assert cfg.generator.core_fraction == 0.5
    for bad, message in (("0", r"must be in \(0, 1\]"), ("1.5", r"must be in \(0, 1\]"),):
        with pytest.raises(ConfigError, match=rf"generator.core_fraction={bad}.* {message}"):
            self_improving(0, 0, f"generator.core_fraction={bad}")
    with pytest.raises(ConfigError, match="generator.core_fraction=0.5 needs generator.kind 'cluster'"):
        config.load("experiments/digits_protonet.yaml", ["generator.kind=augment", "generator.core_fraction=0.5"])


def test_core_of_a_cluster_rounds_up_and_breaks_ties_by_row():
    from metassl.generate.cluster import eligible_clusters
    # one cluster of 10 rows on a line; rows 0 and 9 tie (both 4.5 from the mean), as do 1 and 8, ...
    line = np.arange(10.0)[:, None]
    labels = np.zeros(10, dtype=np.int64)
    (core,) = eligible_clusters(labels, 1, 1, line, 0.7)  # 0.7 * 10 is 7.000000000000001 in floats: 7 rows
    assert core.tolist() == [1, 2, 3, 4, 5, 6, 7]  # the 6 nearest, then row 1 before row 8
    (core,) = eligible_clusters(labels, 1, 1, line, 0.25)  # ceil(2.5) = 3: rows 4 and 5, then 3 before 6
    assert core.tolist() == [3, 4, 5]
    assert eligible_clusters(labels, 1, 4, line, 0.25) == []  # a core smaller than min_size makes no class


def test_a_mix_keeps_the_cluster_settings_with_its_cluster_member():
    from metassl.registry import build_generator, mix_member
    cfg = self_improving(2, 2, "generator.kind=mix", "generator.mix={cluster: 0.5, augment: 0.5}",
                         "generator.core_fraction=0.5", "generator.encoder_momentum=0.9")
    augment, cluster = mix_member(cfg, "augment").generator, mix_member(cfg, "cluster").generator
    assert (augment.core_fraction, augment.encoder_momentum) == (1.0, 0.0)
    assert (cluster.core_fraction, cluster.encoder_momentum) == (0.5, 0.9)
    pool, _ = blobs(per_class=10)
    assert build_generator(cfg, pool).record(0).episode.support_x.shape[0] == 3


# --- encoder versions: episodes are a function of the config ----------------------------

SELF_IMPROVING = ["generator.kind=cluster", "generator.encoder=model", "generator.clusters=12",
                  "generator.partitions=1", "model.hidden=8", "episodes.n_way=3", "episodes.k_shot=1",
                  "episodes.n_query=2", "episodes.meta_batch=2"]


def self_improving(warmup: int, every: int, *overrides: str):
    return config.load("experiments/digits_protonet.yaml", SELF_IMPROVING + [
        f"generator.warmup_steps={warmup}", f"generator.refresh_every={every}", *overrides])


def published_before(warmup: int, every: int, steps: int) -> list[int]:
    """The version of each step's batch when a trainer publishes as train.py's loop does."""
    version, out = (0 if warmup else 1), []
    for step in range(1, steps + 1):
        out.append(version)  # batch(step - 1) was fetched before this step's publish
        since = step - warmup
        if (warmup and since == 0) or (every and since > 0 and since % every == 0):
            version = step + 1
    return out


def test_encoder_version_is_the_trainers_refresh_schedule():
    for warmup, every in [(0, 0), (0, 2), (0, 3), (2, 0), (2, 2), (3, 2), (1, 3)]:
        cfg = self_improving(warmup, every)
        assert [encoder_version(cfg, s) for s in range(14)] == published_before(warmup, every, 14), (warmup, every)
    assert [encoder_version(self_improving(3, 2), s) for s in range(8)] == [0, 0, 0, 4, 4, 6, 6, 8]
    assert [encoder_version(self_improving(0, 2), s) for s in range(6)] == [1, 1, 3, 3, 5, 5]
    pca = config.load("experiments/digits_protonet.yaml", ["generator.kind=cluster", "generator.encoder=pca"])
    assert {encoder_version(pca, s) for s in range(10)} == {0}
    with pytest.raises(DataError, match="step must be an integer >= 0, got -1"):
        encoder_version(pca, -1)


def version_weights(cfg, versions) -> dict:
    """Distinct encoder weights for each version (the backbone initialised with seed = version)."""
    from metassl.registry import build_backbone, build_learner

    out = {}
    for v in versions:
        model = build_backbone(dataclasses.replace(cfg, seed=v), build_learner(cfg))
        out[v] = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return out


def same_record(a, b) -> bool:
    ea, eb = a.episode, b.episode
    return ((a.episode_id, a.generator, a.seed, a.encoder_version) == (b.episode_id, b.generator, b.seed,
                                                                       b.encoder_version)
            and all(torch.equal(getattr(ea, k), getattr(eb, k)) for k in ("support_x", "query_x", "query_y")))


def test_in_process_episodes_follow_the_schedule_and_leave_the_trainer_rng_alone():
    cfg = self_improving(2, 2)
    weights = version_weights(cfg, (3, 5))
    source = TrainingSource(cfg, actors=0)
    rng = torch.get_rng_state()
    records = []
    for step in range(6):
        if step in (2, 4):  # after outer steps 2 and 4 the trainer publishes versions 3 and 5
            source.refresh_encoder(weights[step + 1], step + 1)
        records += source.batch(step).records
    # building the embedders did not draw from the trainer's random stream
    assert torch.equal(torch.get_rng_state(), rng)
    assert [r.episode_id for r in records] == list(range(12))
    assert [r.encoder_version for r in records] == [0] * 4 + [3] * 4 + [5] * 4
    assert [r.generator for r in records] == ["augment"] * 4 + ["cluster"] * 8
    # a resume at step 5 with version 5's weights makes the same episodes
    resumed = TrainingSource(cfg, start_step=5, encoder=(weights[5], 5), actors=0)
    assert all(same_record(a, b) for a, b in zip(resumed.batch(5).records, records[10:]))
    with pytest.raises(DataError, match="step 6 need encoder version 7, which has not been published"):
        resumed.batch(6)
    with pytest.raises(DataError, match="encoder version 5 was already published"):
        resumed.refresh_encoder(weights[5], 5)
    with pytest.raises(DataError, match="step 4 need encoder version 5 .* the encoder given is version 3"):
        TrainingSource(cfg, start_step=4, encoder=(weights[3], 3), actors=0)
    with pytest.raises(DataError, match="step 0 need encoder version 1 .* given is version 0"):
        TrainingSource(self_improving(0, 2), actors=0)


# --- real data -------------------------------------------------------------------------

def test_generators_on_omniglot(omniglot_root):
    split = load_split("omniglot", "train", root=omniglot_root, protocol="unsupervised")
    pool = split.x[torch.randperm(len(split.x), generator=gen(0))[:2000]]
    umtra = AugmentEpisodes(pool, 5, 1, 3, AugmentConfig(), seed=0, ssl_views=True)
    episode = umtra.batch(0, 2)
    assert episode.support_x.shape == (2, 5, 1, 28, 28) and episode.query_x.shape == (2, 15, 1, 28, 28)
    assert 0 <= episode.query_x.min() and episode.query_x.max() <= 1
    cactus = ClusterEpisodes(pool, 5, 1, 3, clusters=50, partitions=2, seed=0)
    for i in range(3):
        assert_valid(cactus.episode(i), 5, 1, 3, (1, 28, 28))

"""CACTUs episodes (Hsu et al. 2019): classes are k-means clusters of embedded unlabelled images.

The pool is embedded (PCA of the pixels by default, or any encoder such as the network
being meta-trained), and k-means is run P times with different seeds, giving P
partitions of the pool into `clusters` pseudo-classes. An episode picks one partition,
N of its clusters that have at least k_shot + n_query members, and k_shot + n_query
distinct members of each (support and query disjoint). Images are used as they are,
as in CACTUs, unless an AugmentConfig is given.

Embeddings are clustered raw, without L2 normalisation, as in CACTUs: for PCA features the
Euclidean geometry of the pixels is the point, and an encoder that wants cosine geometry
can normalise its own output.

The generator is self-improving when the trainer publishes new encoder weights:
`set_encoder` / `set_embeddings` re-embed and re-cluster the pool (seconds), and later
records carry the new `encoder_version`. Episode i depends only on (seed, i), the
settings and the embeddings, so its encoder version must be chosen by i, never by when
it is made: in training, episode i of step s = i // meta_batch uses version
`metassl.generate.source.encoder_version(cfg, s)` (the weights of the last refresh at
or before step s), whether it is made in process or by a Ray actor (`pool.py`); both
switch their generator to that version (`source.VersionedGenerator`) before making it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from metassl.config import AugmentConfig
from metassl.data.episodes import Episode, check_int
from metassl.errors import DataError
from metassl.generate.augment import check_pool, episode_seed
from metassl.generate.record import EpisodeRecord, RecordSource, make_record
from metassl.ssl import views

EMBED_CHUNK = 1024  # images per call of an encoder
KMEANS_MAX_ITER = 100  # Omniglot's 20k images converge in ~30 Lloyd iterations


def pca_embeddings(images: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Returns float32 [M, dim]: the pool's flattened pixels projected on their top `dim` principal axes."""
    pixels = images.flatten(1).cpu().numpy()
    largest = min(pixels.shape)
    if dim > largest:
        raise DataError(f"embedding_dim={dim} but PCA of {pixels.shape[0]} images of {pixels.shape[1]} "
                        f"pixels gives at most {largest} components; use embedding_dim <= {largest}")
    with threadpool_limits(limits=1):  # one thread: the same result in every process
        features = PCA(n_components=dim, random_state=seed).fit_transform(pixels)
    return torch.from_numpy(features.astype(np.float32))


def embed_images(images: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                 chunk: int = EMBED_CHUNK, threads: int = 1) -> torch.Tensor:
    """Returns float32 [M, D] = `embed` applied to `images` [M, C, H, W] in chunks, without gradients.

    Every chunk is embedded on one thread, so the result is bitwise the same in every
    process; with `threads` > 1 that many chunks go side by side. `embed` must then be
    safe to call from several threads at once (`registry.model_embedder` is: its module
    holds the weights and is only read).
    """
    starts = range(0, len(images), chunk)

    def one_chunk(start: int) -> torch.Tensor:
        # OpenMP's and MKL's thread counts are per thread, so each worker sets its own (this also
        # sets the default of threads started later: the caller's count is restored below)
        torch.set_num_threads(1)
        with torch.no_grad():
            part = embed(images[start : start + chunk])
        rows = len(images[start : start + chunk])
        if not isinstance(part, torch.Tensor) or part.ndim != 2 or len(part) != rows:
            got = list(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise DataError(f"the encoder must map images [B, C, H, W] to embeddings [B, D]; "
                            f"for B = {rows} it returned {got}")
        return part.detach().float().cpu()

    before = torch.get_num_threads()
    try:
        if threads <= 1:
            parts = [one_chunk(start) for start in starts]
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
                parts = list(pool.map(one_chunk, starts))
    finally:
        torch.set_num_threads(before)
    return torch.cat(parts)


def kmeans_partitions(embeddings: np.ndarray, clusters: int, partitions: int, seed: int,
                      threads: int = 1) -> np.ndarray:
    """Returns int64 [partitions, M]: cluster labels 0..clusters-1 of P k-means runs on `embeddings` [M, D].

    Run p uses k-means++ initialisation seeded from (seed, p). Each run is on one thread,
    so that every process (actor or trainer) finds the same partitions; with `threads` > 1
    that many runs go side by side, which changes nothing in their results.
    """
    def one_run(p: int) -> np.ndarray:
        run_seed = int(np.random.SeedSequence([seed, p]).generate_state(1)[0])
        # OpenMP's limit is per thread, so it is set in each worker. BLAS's is process-wide and
        # set once below: KMeans saves and restores it around each fit, which is only safe from
        # several threads because every one of them saves and restores the same value, 1
        with threadpool_limits(limits=1, user_api="openmp"):
            kmeans = KMeans(n_clusters=clusters, n_init=1, algorithm="lloyd", max_iter=KMEANS_MAX_ITER,
                            random_state=run_seed)
            return kmeans.fit_predict(embeddings).astype(np.int64)

    with threadpool_limits(limits=1):
        if threads <= 1:
            runs = [one_run(p) for p in range(partitions)]
        else:
            with ThreadPoolExecutor(max_workers=min(threads, partitions)) as pool:
                runs = list(pool.map(one_run, range(partitions)))
    return np.stack(runs)


def eligible_clusters(labels: np.ndarray, clusters: int, min_size: int, embeddings: np.ndarray | None = None,
                      core_fraction: float = 1.0) -> list[np.ndarray]:
    """Returns the member rows (sorted int64 arrays) of each cluster in `labels` [M] with >= min_size members.

    With `core_fraction` < 1, a cluster's members are first cut to its core: the
    ceil(core_fraction * size) rows of `embeddings` [M, D] nearest the mean of the cluster
    (ties by row), and the core must hold min_size rows. Members far from the mean are
    the likeliest to belong to another class, so the core is a cleaner pseudo-class.
    """
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(labels, minlength=clusters))[:-1])
    if core_fraction < 1:
        groups = [_core(rows, embeddings, core_fraction) for rows in groups]
    return [rows for rows in groups if len(rows) >= min_size]


def _core(rows: np.ndarray, embeddings: np.ndarray, fraction: float) -> np.ndarray:
    """The ceil(fraction * len(rows)) of `rows` whose embeddings lie nearest their mean, sorted."""
    if len(rows) == 0:
        return rows
    points = embeddings[rows].astype(np.float64)
    distance = ((points - points.mean(axis=0)) ** 2).sum(axis=1)
    keep = int(np.ceil(fraction * len(rows) - 1e-9))
    return np.sort(rows[np.argsort(distance, kind="stable")[:keep]])


class ClusterEpisodes(RecordSource):
    """CACTUs generator over an unlabelled pool: `record(i)`, `episode(i)`, `batch(start, count)`.

    `images` [M, C, H, W] float32 in [0, 1]. `embed` maps images [B, C, H, W] to [B, D];
    None uses PCA with `embedding_dim` components on the pixels (fit on the pool); records
    report `encoder_version` until `set_encoder` installs a newer encoder. k-means
    finds `clusters` clusters, `partitions` times. `augment` (None: raw images) draws a
    random view of every episode image; with `ssl_views`, records also carry SimCLR views
    and rotated copies of the episode's support images (drawn with `augment`, or the AugmentConfig
    defaults when it is None). `threads` chunks of the pool (embedding) and k-means runs
    (clustering) go side by side, each on one thread: the partitions are the same for any value,
    provided `embed` (and each encoder `set_encoder` gets) may be called from several threads at
    once, as `registry.model_embedder`'s may. With `core_fraction` < 1, episodes draw each
    cluster's members from its core only (see `eligible_clusters`).
    """

    def __init__(self, images: torch.Tensor, n_way: int, k_shot: int, n_query: int, *,
                 clusters: int, partitions: int, seed: int = 0,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None, embedding_dim: int = 64,
                 augment: AugmentConfig | None = None, ssl_views: bool = False,
                 ssl_augment: AugmentConfig | None = None, encoder_version: int = 0, threads: int = 1,
                 core_fraction: float = 1.0):
        self.images = check_pool(images)
        self.n_way = check_int("n_way", n_way, 2)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.clusters = check_int("clusters", clusters, 1)
        self.partitions = check_int("partitions", partitions, 1)
        self.seed = check_int("seed", seed, 0)
        self.threads = check_int("threads", threads, 1)
        if isinstance(core_fraction, bool) or not isinstance(core_fraction, (int, float)):
            raise DataError(f"core_fraction must be a number in (0, 1], got {core_fraction!r}")
        self.core_fraction = float(core_fraction)
        if not 0 < self.core_fraction <= 1:
            raise DataError(f"core_fraction={core_fraction} must be in (0, 1]")
        episode_seed(self.seed, 0)  # checks seed < 2**32
        if not self.n_way <= self.clusters <= len(images):
            raise DataError(f"clusters={self.clusters} must lie between n_way={self.n_way} and the "
                            f"number of images in the pool, {len(images)}")
        self.augment = None if augment is None else views.check_augment(augment)
        self.ssl_views = bool(ssl_views)
        self.ssl_augment = views.check_augment(ssl_augment or augment or AugmentConfig())
        if embed is None:
            dim = check_int("embedding_dim", embedding_dim, 1)
            embeddings = pca_embeddings(self.images, dim, self.seed)
        else:
            embeddings = embed_images(self.images, embed, threads=self.threads)
        self.set_embeddings(embeddings, encoder_version)

    def set_encoder(self, embed: Callable[[torch.Tensor], torch.Tensor], version: int) -> None:
        """Re-embeds the pool with `embed` ([B, C, H, W] -> [B, D]) and re-clusters it; see set_embeddings."""
        self.set_embeddings(embed_images(self.images, embed, threads=self.threads), version)

    def set_embeddings(self, embeddings: torch.Tensor, version: int) -> None:
        """Clusters precomputed `embeddings` [M, D] into new partitions; later records report `version`.

        Raises DataError (and keeps the previous state) when the embeddings do not fit the
        pool or a partition has fewer than n_way clusters with k_shot + n_query members.
        """
        version = check_int("encoder version", version, 0)
        if (not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2
                or len(embeddings) != len(self.images)):
            got = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise DataError(f"embeddings must be a tensor [M, D] with M = {len(self.images)} "
                            f"(one row per pool image), got {got}")
        embeddings = embeddings.detach().float().cpu()
        if not bool(torch.isfinite(embeddings).all()):
            raise DataError("embeddings contain NaN or infinite values; the encoder has diverged")
        labels = kmeans_partitions(embeddings.numpy(), self.clusters, self.partitions, self.seed, self.threads)
        needed = self.k_shot + self.n_query
        members = [eligible_clusters(row, self.clusters, needed, embeddings.numpy(), self.core_fraction)
                   for row in labels]
        for p, groups in enumerate(members):
            if len(groups) < self.n_way:
                core = f" (core_fraction={self.core_fraction})" if self.core_fraction < 1 else ""
                raise DataError(
                    f"k-means partition {p} with clusters={self.clusters} has only {len(groups)} clusters "
                    f"of at least k_shot + n_query = {needed} images{core}, but an episode needs "
                    f"n_way={self.n_way}; use fewer clusters or a smaller k_shot + n_query"
                    + (" or a larger core_fraction" if core else "")
                )
        self.embeddings = embeddings  # [M, D]
        self.labels = labels  # [P, M] cluster of each image in each partition
        self.members = members  # members[p]: rows (the cores) of the eligible clusters of partition p
        self.encoder_version = version

    def _draw(self, index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int]:
        """Returns (partition, clusters, support rows, query rows, seed of the view generator)."""
        rng = np.random.default_rng([self.seed, index])
        partition = int(rng.integers(self.partitions))
        groups = self.members[partition]
        chosen = rng.choice(len(groups), size=self.n_way, replace=False)
        support, query = [], []
        for c in chosen:
            rows = groups[c]
            picked = rows[rng.choice(len(rows), size=self.k_shot + self.n_query, replace=False)]
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
        view_seed = int(rng.integers(2**63 - 1))
        return partition, chosen, np.concatenate(support), np.concatenate(query), view_seed

    def episode_indices(self, index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Returns (partition, clusters [N], support rows [N*K], query rows [N*Q]) of episode `index`.

        `clusters[j]` indexes `members[partition]` and gets label j; the rows index the pool,
        label-major (support rows j*K .. j*K + K - 1 are members of cluster j, likewise query).
        """
        partition, clusters, support, query, _ = self._draw(check_int("episode index", index, 0))
        return partition, clusters, support, query

    def record(self, index: int) -> EpisodeRecord:
        """Returns episode `index` with its provenance (generator "cluster", the current encoder_version).

        Support [N*K, C, H, W] and query [N*Q, C, H, W] are label-major, labels 0..N-1.
        SSL views (when enabled) are of the N*K support images (with K = 1, one per
        pseudo-class, as many as an augment episode has).
        """
        index = check_int("episode index", index, 0)
        _, _, support, query, view_seed = self._draw(index)
        rows = torch.from_numpy(np.concatenate([support, query]))
        source = self.images[rows]  # [N*(K+Q), C, H, W]
        generator = torch.Generator().manual_seed(view_seed)
        shown = source if self.augment is None else views.random_views(source, self.augment, generator)
        episode = Episode(
            support_x=shown[: len(support)],
            support_y=torch.arange(self.n_way).repeat_interleave(self.k_shot),
            query_x=shown[len(support) :],
            query_y=torch.arange(self.n_way).repeat_interleave(self.n_query),
        )
        ssl = views.ssl_views(source[: len(support)], self.ssl_augment, generator) if self.ssl_views else None
        return make_record(index, "cluster", episode_seed(self.seed, index), episode,
                           self.encoder_version, ssl)


class WarmStartEpisodes(RecordSource):
    """Augment (UMTRA) episodes until the first encoder arrives, then cluster episodes of its embedding.

    The self-improving loop with a network that starts from random weights: clustering
    its initial embedding gives pseudo-classes little better than clusters of pixels, so
    the first `generator.warmup_steps` steps train on augment episodes (encoder version
    0) and the trainer then publishes the network; `set_encoder` builds the cluster
    generator on the first call and re-clusters on later ones. `make_cluster(embed, version)`
    builds it. Episode i depends on (seed, i) and the encoder version, as before; going
    back to version 0 means building a new instance (`VersionedGenerator` does).
    """

    def __init__(self, augment: RecordSource, make_cluster: Callable[[Callable, int], ClusterEpisodes]):
        self.augment = augment
        self.make_cluster = make_cluster
        self.cluster: ClusterEpisodes | None = None

    @property
    def encoder_version(self) -> int:
        return self.cluster.encoder_version if self.cluster is not None else 0

    def set_encoder(self, embed: Callable[[torch.Tensor], torch.Tensor], version: int) -> None:
        if self.cluster is None:
            self.cluster = self.make_cluster(embed, version)
        else:
            self.cluster.set_encoder(embed, version)

    def record(self, index: int) -> EpisodeRecord:
        return (self.cluster or self.augment).record(index)

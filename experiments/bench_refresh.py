"""One refresh of the self-improving loop, timed: the pool re-embedded and re-clustered, as a
generator actor does it while the trainer waits for the first episodes of the new version.

    python experiments/bench_refresh.py CONFIG --root PATH/omniglot [--checkpoint CKPT] [--rounds 2] [--set K=V ...]

Both ways in one process, alternating, on the same network and pool:
- `one thread`: the chunks of the pool embedded one after another, then the P k-means runs one
  after another, all on one thread (what a refresh did before the chunks and partitions were
  spread over threads);
- `threads`: `ClusterEpisodes.set_encoder` as it is now (`cluster.embed_images` and
  `cluster.kmeans_partitions`, one thread per chunk or partition, as many as the CPUs).
Their partitions are checked to be identical. The network is CKPT's (a run's best.pt, so that
k-means sees a trained embedding and runs its usual number of iterations), or the config's
freshly initialised one. Prints the median seconds of each part and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metassl import checkpoint, config  # noqa: E402
from metassl.generate import cluster  # noqa: E402
from metassl.registry import build_backbone, build_learner, load_unlabelled, model_embedder  # noqa: E402


def one_thread(images, embed, clusters, partitions, seed):
    """The reference refresh: every chunk, then every k-means run, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            parts = [embed(images[i : i + cluster.EMBED_CHUNK]).float()
                     for i in range(0, len(images), cluster.EMBED_CHUNK)]
    finally:
        torch.set_num_threads(threads)
    embeddings = torch.cat(parts).numpy()
    t1 = time.perf_counter()
    labels = []
    with threadpool_limits(limits=1):
        for p in range(partitions):
            run_seed = int(np.random.SeedSequence([seed, p]).generate_state(1)[0])
            labels.append(KMeans(n_clusters=clusters, n_init=1, algorithm="lloyd", max_iter=cluster.KMEANS_MAX_ITER,
                                 random_state=run_seed).fit_predict(embeddings))
    return np.stack(labels).astype(np.int64), t1 - t0, time.perf_counter() - t1


def threaded(images, embed, clusters, partitions, seed):
    """The refresh as the generator does it now."""
    t0 = time.perf_counter()
    embeddings = cluster.embed_images(images, embed).numpy()
    t1 = time.perf_counter()
    labels = cluster.kmeans_partitions(embeddings, clusters, partitions, seed)
    return labels, t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--root", help="data.root (the Omniglot folder)")
    parser.add_argument("--checkpoint", help="a run's checkpoint whose network embeds the pool")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    cfg = config.load(args.config, ([f"data.root={args.root}"] if args.root else []) + args.set)
    if args.checkpoint:
        state = checkpoint.load(args.checkpoint)
        weights = {**state["params"], **state["buffers"]}
    else:
        model = build_backbone(cfg, build_learner(cfg))
        weights = dict(model.named_parameters()) | dict(model.named_buffers())
    embed = model_embedder(cfg, weights)
    images = load_unlabelled(cfg)
    g = cfg.generator
    print(f"pool {tuple(images.shape)}, {g.clusters} clusters x {g.partitions} partitions, "
          f"{len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}", flush=True)
    times = {"one thread": [], "threads": []}
    for r in range(args.rounds):
        order = [("one thread", one_thread), ("threads", threaded)]
        results = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            labels, embed_s, kmeans_s = fn(images, embed, g.clusters, g.partitions, cfg.seed)
            results[name] = labels
            times[name].append((embed_s, kmeans_s))
            print(f"round {r + 1} {name:>10}: embed {embed_s:6.1f} s, k-means {kmeans_s:6.1f} s", flush=True)
        assert np.array_equal(results["one thread"], results["threads"]), "the partitions differ"
    med = {name: (statistics.median(e for e, _ in t), statistics.median(k for _, k in t)) for name, t in times.items()}
    for name, (e, k) in med.items():
        print(f"median {name:>10}: embed {e:6.1f} s, k-means {k:6.1f} s, refresh {e + k:6.1f} s")
    ratio = sum(med["one thread"]) / sum(med["threads"])
    print(f"refresh {ratio:.2f}x faster on threads (same partitions)")


if __name__ == "__main__":
    main()

"""One refresh of the self-improving loop, timed: the pool re-embedded and re-clustered, as a
generator actor does it while the trainer waits for the first episodes of the new version.

    python experiments/bench_refresh.py CONFIG --root PATH/omniglot [--checkpoint CKPT]
        [--threads 2] [--rounds 2] [--set K=V ...]

Both ways in one process, alternating, on the same network and pool:
- `1 thread`: `generator.refresh_threads: 1`, the chunks of the pool embedded one after
  another, then the P k-means runs one after another;
- `N threads`: `generator.refresh_threads: N`, N chunks or runs side by side, each on one
  thread.
Their embeddings and partitions are checked to be identical. A small refresh each way
first warms up, untimed. The network is CKPT's (a run's
best.pt, so that k-means sees a trained embedding and runs its usual number of iterations), or
the config's freshly initialised one. Prints the median seconds of each part and the ratio.
Run it with nothing else on the machine: it is a timing.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metassl import checkpoint, config  # noqa: E402
from metassl.generate import cluster  # noqa: E402
from metassl.registry import build_backbone, build_learner, load_unlabelled, model_embedder  # noqa: E402


def refresh(images, embed, clusters, partitions, seed, threads):
    """One refresh with `threads` threads: (embeddings, labels, embed seconds, k-means seconds)."""
    t0 = time.perf_counter()
    embeddings = cluster.embed_images(images, embed, threads=threads)
    t1 = time.perf_counter()
    labels = cluster.kmeans_partitions(embeddings.numpy(), clusters, partitions, seed, threads=threads)
    return embeddings, labels, t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--root", help="data.root (the Omniglot folder)")
    parser.add_argument("--checkpoint", help="a run's checkpoint whose network embeds the pool")
    parser.add_argument("--threads", type=int, default=2, help="threads of the side-by-side refresh")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    if args.threads < 2 or args.rounds < 1:
        parser.error("--threads must be >= 2 and --rounds >= 1")
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
    # warm-up, not timed: first touch of the pool, oneDNN's kernel set-up, threadpoolctl's library scan
    for n in (1, args.threads):
        refresh(images[: 4 * cluster.EMBED_CHUNK], embed, min(g.clusters, 64), g.partitions, cfg.seed, n)
    names = {1: "1 thread", args.threads: f"{args.threads} threads"}
    times = {n: [] for n in names}
    for r in range(args.rounds):
        results = {}
        for n in (1, args.threads) if r % 2 == 0 else (args.threads, 1):
            embeddings, labels, embed_s, kmeans_s = refresh(images, embed, g.clusters, g.partitions, cfg.seed, n)
            results[n] = (embeddings, labels)
            times[n].append((embed_s, kmeans_s))
            print(f"round {r + 1} {names[n]:>10}: embed {embed_s:6.1f} s, k-means {kmeans_s:6.1f} s", flush=True)
        (e1, l1), (en, ln) = results[1], results[args.threads]
        if not (torch.equal(e1, en) and np.array_equal(l1, ln)):
            sys.exit("the embeddings or partitions differ between thread counts")
    med = {n: (statistics.median(e for e, _ in t), statistics.median(k for _, k in t)) for n, t in times.items()}
    for n, (e, k) in med.items():
        print(f"median {names[n]:>10}: embed {e:6.1f} s, k-means {k:6.1f} s, refresh {e + k:6.1f} s")
    print(f"refresh {sum(med[1]) / sum(med[args.threads]):.2f}x faster on {args.threads} threads "
          f"(bitwise the same embeddings and partitions)")


if __name__ == "__main__":
    main()

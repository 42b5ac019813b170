"""How clean are the pseudo-classes a trained network's embedding gives? Scored on meta-val classes.

    python experiments/cluster_purity.py RUN_OR_CHECKPOINT --root PATH/omniglot
        [--protocol unsupervised] [--per-class 1.0 1.5 2.0] [--cores 1.0 0.75 0.5] [--seed 0]

The network embeds the images of the meta-val split (the run's dataset and protocol, or
--protocol), and k-means groups them into `per_class` x (number of val classes) clusters, as a
refresh of the self-improving loop groups the unlabelled train pool (`generator.clusters`
relative to its unknown class count). For each core fraction (`generator.core_fraction`),
every cluster keeps its members nearest its mean, and the script prints:
- purity: the share of kept images whose cluster's most common class is their own;
- kept: the share of images kept;
- NMI of the whole clustering against the classes (the same for every core fraction).
Only the val labels are read, to score; training never reads labels, and a choice made with
this script is a choice on meta-val.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metassl import api  # noqa: E402
from metassl.data import load_split  # noqa: E402
from metassl.generate import cluster  # noqa: E402
from metassl.registry import _image_options, model_embedder  # noqa: E402


def purity(classes: np.ndarray, groups: list[np.ndarray]) -> float:
    """The share of the rows in `groups` whose group's most common class is their own."""
    kept = sum(len(rows) for rows in groups)
    return sum(int(np.bincount(classes[rows]).max()) for rows in groups if len(rows)) / kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run directory (its best.pt) or a .pt checkpoint")
    parser.add_argument("--root", required=True, help="the dataset's local path")
    parser.add_argument("--protocol", default=None, help="data protocol (default: the run's)")
    parser.add_argument("--per-class", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--cores", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    learner = api.load(args.run)
    cfg = learner.config
    options = _image_options(cfg)
    if args.protocol:
        options["protocol"] = args.protocol
    split = load_split(cfg.data.dataset, "val", root=args.root, **options)
    classes = np.unique(np.asarray(split.y), return_inverse=True)[1]
    embed = model_embedder(cfg, {**learner.params, **learner.buffers})
    embeddings = cluster.embed_images(split.x, embed).numpy()
    n_classes = int(classes.max()) + 1
    print(f"{args.run}: step {learner.step}, {len(classes)} val images of {n_classes} classes "
          f"({options.get('protocol')} protocol), embedding {embeddings.shape[1]}-d")
    for per_class in args.per_class:
        k = round(per_class * n_classes)
        labels = cluster.kmeans_partitions(embeddings, k, 1, args.seed)[0]
        nmi = normalized_mutual_info_score(classes, labels)
        scores = []
        for fraction in args.cores:
            groups = cluster.eligible_clusters(labels, k, 1, embeddings, fraction)
            kept = sum(len(rows) for rows in groups) / len(classes)
            scores.append(f"core {fraction:g}: purity {purity(classes, groups):.3f} (kept {kept:.2f})")
        print(f"{k} clusters ({per_class:g} per class), NMI {nmi:.3f} | " + " | ".join(scores), flush=True)


if __name__ == "__main__":
    main()

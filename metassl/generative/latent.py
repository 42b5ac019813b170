"""LASIUM's latent-space task sampling (Khodadadeh et al., ICLR 2021).

An N-way task with `per_class` = K + Q instances per class is a set of latent codes
`[N, per_class, D]`; decoding them gives the task's images. Anchors are drawn from the
prior N(0, I); the strategies differ in how instances are placed around them:

- `n` (LASIUM-N): instance = anchor + noise, noise ~ N(0, noise^2 I).
- `ro` (LASIUM-RO, random out-of-class): instance = anchor + interpolate * (v - anchor)
  for a fresh random vector v ~ N(0, I), then + noise.
- `oc` (LASIUM-OC, other class): instance = anchor + interpolate * (a' - anchor) for the
  anchor a' of another class of the same task, then + noise: classes are made harder by
  pulling their instances toward each other.

Every strategy first redraws anchors until all pairwise distances are at least
`threshold` (LASIUM-N's rule; with `threshold` 0 anchors are plain prior draws), so
that the N classes are far apart in latent space. With `interpolate` < 0.5 and small
noise an instance stays nearer its own anchor than any other anchor.
All randomness comes from the NumPy generator passed in, so a task is a function of it.
"""
from __future__ import annotations

import numpy as np

from metassl.errors import DataError

STRATEGIES = ("n", "ro", "oc")
MAX_REDRAWS = 1000  # rounds of redrawing anchors that are too close


def far_anchors(rng: np.random.Generator, n_way: int, dim: int, threshold: float) -> np.ndarray:
    """`[n_way, dim]` prior draws whose pairwise Euclidean distances are all >= `threshold`.

    Anchors too close to an earlier one are redrawn (the later of each close pair);
    DataError when `MAX_REDRAWS` rounds do not separate them (the threshold is too large
    for the latent dimension: prior draws lie about sqrt(2 * dim) apart).
    """
    anchors = rng.standard_normal((n_way, dim))
    for _ in range(MAX_REDRAWS):
        dist = np.linalg.norm(anchors[:, None] - anchors[None], axis=-1)
        close = np.triu(dist < threshold, k=1).any(axis=0)  # j is close to some i < j
        if not close.any():
            return anchors
        anchors[close] = rng.standard_normal((int(close.sum()), dim))
    raise DataError(f"generator.generative.threshold={threshold} is too large: {MAX_REDRAWS} redraws did not put "
                    f"{n_way} anchors of a {dim}-dimensional N(0, I) that far apart (typical distance "
                    f"{np.sqrt(2 * dim):.2f}); lower the threshold")


def task_codes(rng: np.random.Generator, strategy: str, n_way: int, per_class: int, dim: int, *,
               threshold: float, noise: float, interpolate: float) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [n_way, per_class, dim], anchors [n_way, dim])` of one task, float64."""
    if strategy not in STRATEGIES:
        raise DataError(f"generator.generative.strategy={strategy!r} is not one of {list(STRATEGIES)}")
    anchors = far_anchors(rng, n_way, dim, threshold)
    codes = np.repeat(anchors[:, None], per_class, axis=1)
    if strategy == "ro":
        targets = rng.standard_normal((n_way, per_class, dim))
        codes = codes + interpolate * (targets - codes)
    elif strategy == "oc":
        # each instance moves toward the anchor of a class drawn from the other n_way - 1
        shift = rng.integers(1, n_way, size=(n_way, per_class))
        other = (np.arange(n_way)[:, None] + shift) % n_way
        codes = codes + interpolate * (anchors[other] - codes)
    return codes + noise * rng.standard_normal(codes.shape), anchors

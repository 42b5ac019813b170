"""The sinusoid regression tasks of MAML (Finn et al. 2017).

Each task is a sine wave y = A sin(x - phase) with amplitude A ~ U[0.1, 5] and phase
~ U[0, pi]; its inputs are x ~ U[-5, 5]. A learner sees k_shot (x, y) pairs and is scored
on n_query more from the same wave. There are no classes, so there is no n_way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metassl.data.episodes import Episode, check_int, stack_episodes

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    """Seeded sinusoid task distribution: task i depends only on (seed, i)."""

    def __init__(self, k_shot: int, n_query: int, seed: int = 0):
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.seed = check_int("seed", seed, 0)

    def _rng(self, index: int) -> np.random.Generator:
        """Returns the generator of task `index`; its first two draws are amplitude and phase."""
        return np.random.default_rng([self.seed, check_int("task index", index, 0)])

    def params(self, index: int) -> tuple[float, float]:
        """Returns (amplitude, phase) of task `index`."""
        rng = self._rng(index)
        amplitude = rng.uniform(*AMPLITUDE_RANGE)
        phase = rng.uniform(*PHASE_RANGE)
        return float(amplitude), float(phase)

    def episode(self, index: int) -> Episode:
        """Returns task `index`: support x, y float32 [k_shot, 1]; query x, y float32 [n_query, 1]."""
        rng = self._rng(index)
        amplitude = rng.uniform(*AMPLITUDE_RANGE)
        phase = rng.uniform(*PHASE_RANGE)
        x = rng.uniform(*X_RANGE, size=(self.k_shot + self.n_query, 1))
        y = amplitude * np.sin(x - phase)
        x = torch.from_numpy(x.astype(np.float32))
        y = torch.from_numpy(y.astype(np.float32))
        k = self.k_shot
        return Episode(support_x=x[:k], support_y=y[:k], query_x=x[k:], query_y=y[k:])

    def batch(self, start: int, count: int) -> Episode:
        """Returns tasks start..start+count-1 stacked: x and y [count, k_shot or n_query, 1]."""
        start = check_int("start", start, 0)
        count = check_int("count", count, 1)
        return stack_episodes([self.episode(i) for i in range(start, start + count)])

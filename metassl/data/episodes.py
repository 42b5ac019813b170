"""Few-shot episodes: the `Episode` type, labelled splits, and the seeded N-way K-shot sampler.

An episode (a "task") has a support set, from which a learner adapts, and a query set, on
which the adapted learner is scored. `EpisodeSampler` draws classification episodes from a
`FewShotSplit`; episode `i` depends only on `(seed, i)`, so the same seed gives the same
evaluation episodes to every method and run, in any order and on any worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from metassl.errors import DataError


@dataclass(frozen=True, eq=False)
class Episode:
    """One few-shot task, or a batch of tasks when `batched` (every tensor then has a leading
    [tasks] dimension).

    Classification (from `EpisodeSampler`), for N = n_way, K = k_shot, Q = n_query and items
    of shape S (images `[C, H, W]` float32, texts `[2, L]` int64: token ids, attention mask,
    audio `[1, T]` float32 waveforms):
        support_x: [N*K, *S]; support_y: [N*K] int64 labels 0..N-1
        query_x:   [N*Q, *S]; query_y:   [N*Q] int64
    Both sets are label-major: all examples of label 0 first, then label 1, and so on.
    Regression (from `SinusoidTasks`): x and y are float32 [K, 1] and [Q, 1].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    batched: bool = False

    @property
    def num_tasks(self) -> int | None:
        """Returns the number of tasks of a batched episode, or None for a single task."""
        return int(self.support_x.shape[0]) if self.batched else None

    def to(self, device: torch.device | str) -> Episode:
        """Returns a copy with every tensor moved to `device`."""
        return replace(
            self,
            support_x=self.support_x.to(device),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device),
            query_y=self.query_y.to(device),
        )


def stack_episodes(episodes: Sequence[Episode]) -> Episode:
    """Returns a batched Episode whose tensors stack `episodes` along a new leading [tasks] dim."""
    if len(episodes) == 0:
        raise DataError("stack_episodes needs at least one episode, got an empty sequence")
    if any(episode.batched for episode in episodes):
        raise DataError("stack_episodes takes single-task episodes; got one that is already batched")
    return Episode(
        support_x=torch.stack([e.support_x for e in episodes]),
        support_y=torch.stack([e.support_y for e in episodes]),
        query_x=torch.stack([e.query_x for e in episodes]),
        query_y=torch.stack([e.query_y for e in episodes]),
        batched=True,
    )


@dataclass(frozen=True, eq=False)
class FewShotSplit:
    """Labelled items (images, texts or audio clips) of one split.

    x: images [N, C, H, W] float32 in [0, 1], texts [N, 2, L] int64 (token ids, attention
    mask; see metassl.data.tokenizer), or audio [N, 1, T] float32 waveforms in [-1, 1] (see
    metassl.data.audio); y: [N] int64 in 0..num_classes-1, where class `c` is
    named `class_names[c]`. `name` says where the split came from, e.g.
    "omniglot/supervised/train"; error messages quote it. `query_only` (a bool per row, or
    None) splits each class into a support pool (False) and a query pool (True): CLINC150's
    held-out protocol draws shots from an intent's `train` utterances and queries from its
    `test` ones; None lets any row be either. `groups` (an int per row, or None) says who or
    what else each row comes from, e.g. the speaker of a spoken keyword, named by `group_names`
    (`group_kind` says what they are, e.g. "speakers"); an `EpisodeSampler` with
    `disjoint_groups` draws an episode's support and queries from disjoint halves of the groups.
    """

    x: torch.Tensor = field(repr=False)
    y: torch.Tensor = field(repr=False)
    class_names: tuple[str, ...] = field(repr=False)
    name: str
    query_only: np.ndarray | None = field(default=None, repr=False)
    groups: np.ndarray | None = field(default=None, repr=False)
    group_names: tuple[str, ...] = field(default=(), repr=False)
    group_kind: str = field(default="groups", repr=False)
    # Row indices of each class, filled in by __post_init__: class_indices[c] is a 1-d int64
    # numpy array of the rows of x whose label is c, in ascending order.
    class_indices: tuple[np.ndarray, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        image = self.x.ndim == 4 and self.x.dtype == torch.float32
        text = self.x.ndim == 3 and self.x.dtype == torch.int64 and self.x.shape[1] == 2
        audio = self.x.ndim == 3 and self.x.dtype == torch.float32 and self.x.shape[1] == 1
        if not (image or text or audio):
            raise DataError(
                f"split {self.name!r}: x must be images (float32 [N, C, H, W]), texts (int64 [N, 2, L]) or "
                f"audio (float32 [N, 1, T]), got {self.x.dtype} with shape {list(self.x.shape)}"
            )
        if self.groups is not None:
            g = self.groups
            if g.shape != (len(self.x),) or not np.issubdtype(g.dtype, np.integer) or (
                    len(g) and (g.min() < 0 or g.max() >= len(self.group_names))):
                raise DataError(f"split {self.name!r}: groups must be an integer array with one value per row, "
                                f"each in 0..{len(self.group_names) - 1} (one per group name)")
        if self.query_only is not None and (self.query_only.dtype != bool or self.query_only.shape != (len(self.x),)):
            raise DataError(f"split {self.name!r}: query_only must be a bool array with one value per row")
        if self.y.ndim != 1 or self.y.dtype != torch.int64 or len(self.y) != len(self.x):
            raise DataError(
                f"split {self.name!r}: y must be an int64 tensor [N] with N = {len(self.x)} "
                f"(the number of images), got {self.y.dtype} with shape {list(self.y.shape)}"
            )
        labels = self.y.numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DataError(
                f"split {self.name!r}: labels must lie in 0..{len(self.class_names) - 1} "
                f"(one per class name), got {labels.min()}..{labels.max()}"
            )
        order = np.argsort(labels, kind="stable")
        bounds = np.cumsum(np.bincount(labels, minlength=len(self.class_names)))[:-1]
        groups = tuple(np.split(order, bounds)) if self.class_names else ()
        object.__setattr__(self, "class_indices", groups)

    def pools(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(support rows, query rows) of class `c`: the same rows twice unless `query_only` is set."""
        rows = self.class_indices[c]
        if self.query_only is None:
            return rows, rows
        return rows[~self.query_only[rows]], rows[self.query_only[rows]]

    @property
    def num_classes(self) -> int:
        """Returns the number of classes."""
        return len(self.class_names)

    @property
    def min_class_size(self) -> int:
        """Returns the number of images of the smallest class (0 for a split with no classes)."""
        return min((len(rows) for rows in self.class_indices), default=0)


def check_int(name: str, value: object, minimum: int) -> int:
    """Returns `value` as an int, or raises DataError when it is not an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class EpisodeSampler:
    """Seeded N-way K-shot sampler over a FewShotSplit: episode i depends only on (seed, i).

    `disjoint_groups` (a split with `groups`, e.g. speakers): each episode splits the groups
    present in the split into two random halves (the first floor(G/2) of a seeded permutation
    for the support, the rest for the queries), so no query shares a group with a shot.
    """

    def __init__(self, split: FewShotSplit, n_way: int, k_shot: int, n_query: int, seed: int = 0,
                 disjoint_groups: bool = False):
        self.split = split
        self.disjoint_groups = bool(disjoint_groups)
        self.n_way = check_int("n_way", n_way, 2)
        self.k_shot = check_int("k_shot", k_shot, 1)
        self.n_query = check_int("n_query", n_query, 1)
        self.seed = check_int("seed", seed, 0)
        if self.n_way > split.num_classes:
            raise DataError(
                f"n_way={self.n_way} but split {split.name!r} has only {split.num_classes} "
                f"classes; use n_way <= {split.num_classes}"
            )
        if self.disjoint_groups:
            self._check_groups()
        elif split.query_only is None:
            needed = self.k_shot + self.n_query
            sizes = [len(rows) for rows in split.class_indices]
            smallest = int(np.argmin(sizes))
            if sizes[smallest] < needed:
                raise DataError(
                    f"k_shot + n_query = {self.k_shot} + {self.n_query} = {needed} examples per class, "
                    f"but class {split.class_names[smallest]!r} of split {split.name!r} has only "
                    f"{sizes[smallest]}; use k_shot + n_query <= {sizes[smallest]}"
                )
        else:
            for c in range(split.num_classes):
                for pool, rows, want, key in zip(("support", "query"), split.pools(c),
                                                 (self.k_shot, self.n_query), ("k_shot", "n_query")):
                    if len(rows) < want:
                        raise DataError(f"{key}={want} but class {split.class_names[c]!r} of split "
                                        f"{split.name!r} has only {len(rows)} {pool} examples; use "
                                        f"{key} <= {len(rows)}")

    def _check_groups(self) -> None:
        """Raises DataError unless every episode can find its shots and queries in its halves of the groups."""
        split = self.split
        if split.groups is None:
            raise DataError(f"split {split.name!r} has no groups (e.g. speakers), so support and queries cannot "
                            "come from disjoint groups; turn disjoint groups off")
        if split.query_only is not None:
            raise DataError(f"split {split.name!r} already fixes which rows are queries (query_only); disjoint "
                            "groups cannot be added to that")
        self._group_ids = np.unique(split.groups)
        if len(self._group_ids) < 2:
            raise DataError(f"split {split.name!r} has {len(self._group_ids)} group(s); disjoint support and "
                            "queries need at least 2")
        half = len(self._group_ids) // 2
        for c, rows in enumerate(split.class_indices):
            counts = np.sort(np.bincount(np.searchsorted(self._group_ids, split.groups[rows]),
                                         minlength=len(self._group_ids)))
            # the worst case: the class's smallest groups all land in one half
            for key, want, size in (("k_shot", self.k_shot, half),
                                    ("n_query", self.n_query, len(self._group_ids) - half)):
                if counts[:size].sum() < want:
                    raise DataError(f"{key}={want} but class {split.class_names[c]!r} of split {split.name!r} can "
                                    f"have only {counts[:size].sum()} examples in {size} of its "
                                    f"{len(self._group_ids)} groups; use {key} <= {counts[:size].sum()}, or "
                                    "turn disjoint groups off")

    def episode_indices(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (classes [n_way], support rows [n_way*k_shot], query rows [n_way*n_query]).

        `classes[j]` is the split's class that gets episode label j; the rows index the split's
        x and y, label-major. Draws come from np.random.default_rng([seed, index]).
        """
        index = check_int("episode index", index, 0)
        rng = np.random.default_rng([self.seed, index])
        # choice without replacement returns the classes in random order, so episode label j
        # is a uniformly random class.
        classes = rng.choice(self.split.num_classes, size=self.n_way, replace=False)
        if self.disjoint_groups:
            order = rng.permutation(self._group_ids)
            in_support = np.isin(self.split.groups, order[: len(order) // 2])
        support, query = [], []
        for c in classes:
            if self.disjoint_groups:  # shots from one half of the groups, queries from the other
                rows = self.split.class_indices[c]
                shots, queries = rows[in_support[rows]], rows[~in_support[rows]]
                support.append(shots[rng.choice(len(shots), size=self.k_shot, replace=False)])
                query.append(queries[rng.choice(len(queries), size=self.n_query, replace=False)])
            elif self.split.query_only is None:
                rows = self.split.class_indices[c]
                picked = rows[rng.choice(len(rows), size=self.k_shot + self.n_query, replace=False)]
                support.append(picked[: self.k_shot])
                query.append(picked[self.k_shot :])
            else:  # shots from the class's support pool, queries from its query pool
                shots, queries = self.split.pools(c)
                support.append(shots[rng.choice(len(shots), size=self.k_shot, replace=False)])
                query.append(queries[rng.choice(len(queries), size=self.n_query, replace=False)])
        return classes, np.concatenate(support), np.concatenate(query)

    def episode(self, index: int) -> Episode:
        """Returns episode `index`: tensors as documented on Episode, labels 0..n_way-1."""
        _, support, query = self.episode_indices(index)
        x = self.split.x
        return Episode(
            support_x=x[torch.from_numpy(support)],
            support_y=torch.arange(self.n_way).repeat_interleave(self.k_shot),
            query_x=x[torch.from_numpy(query)],
            query_y=torch.arange(self.n_way).repeat_interleave(self.n_query),
        )

    def batch(self, start: int, count: int) -> Episode:
        """Returns episodes start..start+count-1 stacked: x [count, n_way*k, C, H, W], y [count, n_way*k]."""
        start = check_int("start", start, 0)
        count = check_int("count", count, 1)
        return stack_episodes([self.episode(i) for i in range(start, start + count)])

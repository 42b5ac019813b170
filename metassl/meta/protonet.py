"""Prototypical Networks (Snell et al. 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metassl.data.episodes import Episode
from metassl.meta.functional import MetaOutput, Params, forward, full_precision
from metassl.meta.metric import batched_labels, embed_episodes, metric_metrics, one_hot


def prototypes(support: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
    """Class means `[T, n_way, D]` of support embeddings `[T, S, D]` with labels `[T, S]`."""
    onehot = one_hot(support_y, support.dtype)           # [T, S, N]
    return onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)


def squared_distances(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `[T, Q, N]` between queries `[T, Q, D]` and prototypes `[T, N, D]`."""
    return (query.unsqueeze(2) - protos.unsqueeze(1)).pow(2).sum(-1)


class ProtoNet:
    """Classify each query by softmax over negative squared distances to class prototypes.

    `eval_features="l2"` scales every embedding to unit length at test time (prediction and
    validation; never in training) before prototypes are averaged: with one shot per class the
    nearest prototype is then the most cosine-similar shot. `eval_shifts=R` averages each test
    image's embeddings over its (2R+1)^2 shifts (`test_embed`; final evaluation and prediction).
    """

    needs_head = False

    def __init__(self, eval_features: str = "raw", eval_shifts: int = 0):
        if eval_features not in ("raw", "l2"):
            raise ValueError(f"eval_features={eval_features!r} is not 'raw' or 'l2'")
        if eval_shifts < 0:
            raise ValueError(f"eval_shifts={eval_shifts} must be >= 0")
        self.eval_features, self.eval_shifts = eval_features, eval_shifts

    @property
    def test_views(self) -> int:
        """Backbone passes per item at test time: one, or one per shift of `eval_shifts`."""
        return (2 * self.eval_shifts + 1) ** 2

    def _view(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.eval_features == "l2" else z

    def test_embed(self, model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """Embeddings `[B, D]` of items `x` `[B, ...]` as compared at test time.

        With `eval_shifts` r, each image `[C, H, W]` is embedded at every shift by -r..r pixels
        in x and y (edges replicated), and the `eval_features` views of those embeddings are averaged.
        """
        if not self.eval_shifts:
            return full_precision(forward(model, params, buffers, x))
        r, (h, w) = self.eval_shifts, x.shape[-2:]
        padded = F.pad(x, (r, r, r, r), mode="replicate")
        views = torch.cat([padded[..., r + dy:r + dy + h, r + dx:r + dx + w]
                           for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
        z = self._view(full_precision(forward(model, params, buffers, views)))
        return z.reshape(self.test_views, len(x), -1).mean(0)

    def logits(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> torch.Tensor:
        """Return `-distance` logits `[T, Q, n_way]` for a batch of episodes."""
        support, query = embed_episodes(model, params, buffers, batch)
        return self.from_embeddings(support, batched_labels(batch.support_y), query)

    @staticmethod
    def from_embeddings(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Logits `[T, Q, n_way]` of embedded queries `[T, Q, D]` given embedded support `[T, S, D]`, labels `[T, S]`."""
        return -squared_distances(query, prototypes(support, support_y))

    def test_logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """`from_embeddings` as used at test time, on the `eval_features` view of the embeddings."""
        return self.from_embeddings(self._view(support), support_y, self._view(query))

    def meta_step(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> MetaOutput:
        """Return the mean query cross-entropy over the meta-batch."""
        logits = self.logits(model, params, buffers, batch)
        query_y = batched_labels(batch.query_y)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten())
        return MetaOutput(loss, metric_metrics(loss, logits, query_y))

    def predict(self, model: nn.Module, params: Params, buffers: Params, episode: Episode,
                inner_steps: int | None = None) -> torch.Tensor:
        """Return query logits `[Q, n_way]` for one episode (`inner_steps` is unused)."""
        with torch.no_grad():
            if self.eval_shifts:  # one episode: its support, then its queries, each image on its own
                n = len(episode.support_x)
                z = self.test_embed(model, params, buffers, torch.cat([episode.support_x, episode.query_x]))
                support, query = z[None, :n], z[None, n:]
            else:
                support, query = embed_episodes(model, params, buffers, episode)
            return self.test_logits(support, batched_labels(episode.support_y), query)[0]

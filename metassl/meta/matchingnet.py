"""Matching Networks (Vinyals et al. 2016) with cosine attention, without full context embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metassl.data.episodes import Episode
from metassl.meta.functional import MetaOutput, Params, forward, full_precision
from metassl.meta.metric import batched_labels, embed_episodes, metric_metrics, one_hot


def cosine_attention(query: torch.Tensor, support: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Softmax over the support of `scale * cos(query, support)`: `[T, Q, S]`."""
    sims = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
    return torch.softmax(scale * sims, dim=-1)


class MatchingNet:
    """Predict `p(y|x) = sum_i a(x, x_i) onehot(y_i)` with cosine attention `a` over the support set.

    `scale` multiplies the cosine similarities before the softmax (1.0 is the
    original formulation; larger values sharpen the attention).
    """

    needs_head = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def log_probs(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> torch.Tensor:
        """Return class log-probabilities `[T, Q, n_way]` for a batch of episodes."""
        support, query = embed_episodes(model, params, buffers, batch)
        return self.from_embeddings(support, batched_labels(batch.support_y), query)

    def from_embeddings(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Log-probabilities `[T, Q, n_way]` of embedded queries `[T, Q, D]` given embedded support `[T, S, D]`."""
        attention = cosine_attention(query, support, self.scale)        # [T, Q, S]
        probs = attention @ one_hot(support_y, attention.dtype)          # [T, Q, N]
        return torch.log(probs.clamp_min(1e-12))

    test_views = 1  # backbone passes per item at test time

    def test_embed(self, model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
        """Embeddings `[B, D]` of items `x` at test time: the backbone's."""
        return full_precision(forward(model, params, buffers, x))

    # at test time the same scores: cosine attention is scale-free, so `eval.features` stays raw
    test_logits = from_embeddings

    def meta_step(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> MetaOutput:
        """Return the mean query negative log-likelihood over the meta-batch."""
        log_probs = self.log_probs(model, params, buffers, batch)
        query_y = batched_labels(batch.query_y)
        loss = F.nll_loss(log_probs.flatten(0, 1), query_y.flatten())
        return MetaOutput(loss, metric_metrics(loss, log_probs, query_y))

    def predict(self, model: nn.Module, params: Params, buffers: Params, episode: Episode,
                inner_steps: int | None = None) -> torch.Tensor:
        """Return query log-probabilities `[Q, n_way]` for one episode."""
        with torch.no_grad():
            return self.log_probs(model, params, buffers, episode)[0]

"""Shared pieces of the metric-based learners (Prototypical and Matching Networks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metassl.data.episodes import Episode
from metassl.meta.functional import Params, forward, full_precision


def embed_episodes(model: nn.Module, params: Params, buffers: Params, batch: Episode):
    """Embed support and query of a batch in one backbone call.

    Returns `(support [T, S, D], query [T, Q, D])`. An unbatched episode is treated
    as a batch of one task. All tasks go through the backbone together, which is
    the vectorised form of a meta-batch for learners without an inner loop.
    """
    sx, qx = batch.support_x, batch.query_x
    if not batch.batched:
        sx, qx = sx.unsqueeze(0), qx.unsqueeze(0)
    tasks, n_support, n_query = sx.shape[0], sx.shape[1], qx.shape[1]
    x = torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)])
    z = full_precision(forward(model, params, buffers, x))  # under autocast: distances in fp32
    support = z[: tasks * n_support].reshape(tasks, n_support, -1)
    query = z[tasks * n_support:].reshape(tasks, n_query, -1)
    return support, query


def batched_labels(y: torch.Tensor) -> torch.Tensor:
    """Return labels with a leading tasks dim: `[T, S]`."""
    return y.unsqueeze(0) if y.dim() == 1 else y


def one_hot(y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot labels `[..., n_way]` of `dtype` (that of the embeddings they weigh), n_way = max label + 1."""
    return F.one_hot(y, int(y.max()) + 1).to(dtype)


def metric_metrics(loss: torch.Tensor, log_probs: torch.Tensor, query_y: torch.Tensor) -> dict[str, float]:
    acc = (log_probs.argmax(-1) == query_y).float().mean()
    return {"query_loss": float(loss.detach()), "query_acc": float(acc)}

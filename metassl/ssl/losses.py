"""Self-supervised losses as pure functions of embeddings and labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            anchors: tuple[int, int] | None = None) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over `B` positive pairs.

    `z1`, `z2`: `[B, D]` projections of two views of the same `B` images. Each of
    the `2B` views must pick out its partner among the other `2B - 1`.

    `anchors = (start, stop)` averages the loss over pairs `start..stop-1` only (views
    `z1[start:stop]` and `z2[start:stop]`), still against all `2B` views: a worker that
    holds those pairs of a batch gathered from several workers computes its share, and
    the shares of equal-sized blocks average to the loss of the whole batch.
    """
    b = z1.shape[0]
    if z2.shape != z1.shape:
        raise ValueError(f"nt_xent needs two views of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    start, stop = (0, b) if anchors is None else anchors
    if not 0 <= start < stop <= b:
        raise ValueError(f"nt_xent anchors={anchors} must satisfy 0 <= start < stop <= {b}")
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    rows = torch.cat([torch.arange(start, stop), torch.arange(b + start, b + stop)]).to(z.device)
    sims = z[rows] @ z.t() / temperature  # [2n, 2B]: each anchor against every view
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[torch.arange(len(rows), device=z.device), rows] = True
    sims = sims.masked_fill(own, float("-inf"))  # a view is not its own positive
    targets = (rows + b) % (2 * b)  # the partner: z1[i] <-> z2[i]
    return F.cross_entropy(sims, targets)


def rotation_loss(logits: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting the rotation (0..3 quarter turns) of each image; `logits` `[B, 4]`."""
    return F.cross_entropy(logits, quarter_turns)

"""Self-supervised losses as pure functions of embeddings and labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over `B` positive pairs.

    `z1`, `z2`: `[B, D]` projections of two views of the same `B` images. Each of
    the `2B` views must pick out its partner among the other `2B - 1`.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sims = z @ z.t() / temperature
    sims.fill_diagonal_(float("-inf"))  # a view is not its own positive
    b = z1.shape[0]
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sims, targets)


def rotation_loss(logits: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting the rotation (0..3 quarter turns) of each image; `logits` `[B, 4]`."""
    return F.cross_entropy(logits, quarter_turns)

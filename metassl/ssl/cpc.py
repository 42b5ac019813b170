"""Contrastive predictive coding (van den Oord et al. 2018) as a pure loss function.

From the context state `c[b, t]` of clip b at frame t, a linear map `W_k` predicts the frame
`k` steps ahead, `z[b, t + k]`, for k = 1..K. Each prediction is scored (a dot product, CPC's
bilinear score) against its true frame and two sets of negatives: the frame at the same time
`t + k` of every other clip of the batch, and every other frame of the same clip. InfoNCE is
the cross-entropy of picking the true frame among them, averaged over clips, frames and steps.
The candidates are the same for every prediction of a clip and step, so the loss is
deterministic: no negatives are sampled.

Across workers: `others` holds every worker's frames (`distributed.gather_rows`), with this
worker's clips at rows `start..start + B`; its clips' predictions are then scored against the
other clips of the whole meta-batch, and averaging the workers' losses gives the loss of the
meta-batch (as NT-Xent's `anchors` do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cpc_loss(z: torch.Tensor, c: torch.Tensor, predictors: torch.Tensor, *, others: torch.Tensor | None = None,
             start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE loss, accuracy of picking the true frame) of predicting `z` from `c`.

    z: `[B, L, D]` frames; c: `[B, L, C]` context states; predictors: `[K, C, D]`, one map per
    step ahead (K < L). `others`: `[B_all, L, D]` frames of every clip of the meta-batch, this
    batch's at rows `start..start + B` (default: `z` itself, start 0).
    """
    b, length, _ = z.shape
    steps = predictors.shape[0]
    if c.shape[:2] != z.shape[:2]:
        raise ValueError(f"cpc_loss: frames {tuple(z.shape)} and context {tuple(c.shape)} differ in batch or length")
    if not 1 <= steps < length:
        raise ValueError(f"cpc_loss: {steps} steps ahead need more than {steps} frames, got {length}")
    everyone = z if others is None else others
    if everyone.shape[1:] != z.shape[1:] or not 0 <= start <= len(everyone) - b:
        raise ValueError(f"cpc_loss: others {tuple(everyone.shape)} must hold this batch's {b} clips at row {start}")
    losses, correct, count = [], torch.zeros(()), 0
    targets = torch.arange(start, start + b, device=z.device)
    for k in range(1, steps + 1):
        n = length - k
        pred = c[:, :n] @ predictors[k - 1]  # [B, n, D]
        across = torch.einsum("btd,atd->bta", pred, everyone[:, k:])  # every clip's frame t + k
        within = torch.einsum("btd,bsd->bts", pred, z)  # every frame of the same clip
        true_frame = torch.arange(n, device=z.device) + k
        within = within.masked_fill(F.one_hot(true_frame, length).bool()[None], float("-inf"))  # scored in `across`
        logits = torch.cat([across, within], dim=-1).reshape(b * n, -1)
        labels = targets.repeat_interleave(n)
        losses.append(F.cross_entropy(logits, labels))
        correct = correct + (logits.detach().argmax(-1) == labels).sum()
        count += b * n
    return torch.stack(losses).mean(), correct / count

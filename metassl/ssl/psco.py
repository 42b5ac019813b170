"""PsCo (Jang et al., ICLR 2023): few-shot pseudo-supervised contrastive learning, as an SSL term.

Each image of a batch comes as two views x1, x2. The online network (backbone, projector,
predictor) maps x1 to `p1`; a momentum network (exponential moving averages of the backbone
and the projector) maps x2 to `z2`, without gradients. Sinkhorn-Knopp balances the
similarities of `z2` to a queue of earlier momentum projections into a soft assignment of
every image to queue entries; each image's top-K entries are its K pseudo-shots. So every
batch is a B-way K-shot pseudo-task whose queries are the `p1`, and the loss is

    SupCon over the task: logsumexp_j(p1 . shot_j / t2) - p1 . prototype / t2, over all B*K shots
  + MoCo: cross-entropy of the positive p1 . z2 against the negatives p1 . queue, temperature t.

After the step, `z2` (of every worker) enters the queue, oldest out, and the momentum
network moves toward the online one. The pieces here are pure functions of tensors; the
trainer holds the state (`PscoState`) and checkpoints it.

What follows PsCo's public code (`alinlab/PsCo`, models.py: `PsCoMoCo.compute_loss`,
`distributed_sinkhorn` with `normalization='row'`, epsilon 0.05; utils.py: the projector
`D -> 4096 -> 256` with BatchNorm (the last without affine) and the predictor `256 -> 4096 ->
256`): the loss, the Sinkhorn variant and the heads. What differs, by design of this
package: views come from the episode generator's augmentations, the momentum update follows
the optimiser step of the combined objective, and with several workers the shots of every
worker enter each worker's SupCon denominator (so 2 workers compute the 1-worker loss).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metassl.meta.functional import full_precision

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over workers (identity on one worker)


def mlp(*sizes: int, last_norm: bool) -> nn.Sequential:
    """`Linear` (no bias) layers with BatchNorm and ReLU between them, as PsCo's projector and predictor.

    `last_norm` ends with a BatchNorm without affine parameters (the projector). The BatchNorm
    layers keep no running statistics: the heads run in training only, on batch statistics.
    """
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(sizes[i + 1], track_running_stats=False), nn.ReLU()]
        elif last_norm:
            layers.append(nn.BatchNorm1d(sizes[i + 1], affine=False, track_running_stats=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             reduce: Reduce | None = None) -> torch.Tensor:
    """Soft assignments `[B, K]` of `B` rows to `K` queue entries, each row summing to 1.

    `scores` are cosine similarities (in [-1, 1]). `exp(scores / epsilon)` is scaled by
    Sinkhorn-Knopp iterations so that every entry gets an equal share of the batch (column
    sums over all workers' rows, through `reduce`) and then every row is a distribution
    (PsCo's `normalization='row'`). The exponent is shifted by its bound `1 / epsilon`, a
    constant the normalisations cancel, so that it cannot overflow.
    """
    reduce = reduce or (lambda t: t)
    entries = scores.shape[1]
    total_rows = reduce(torch.tensor(float(scores.shape[0]), device=scores.device))
    q = torch.exp((full_precision(scores) - 1.0) / epsilon)
    q /= reduce(q.sum())
    for _ in range(iterations):
        q /= reduce(q.sum(dim=0, keepdim=True))
        q /= entries
        q /= q.sum(dim=1, keepdim=True)
        q /= total_rows
    return q * total_rows


def psco_loss(p1: torch.Tensor, z2: torch.Tensor, queue: torch.Tensor, *, shots: int = 1,
              temperature: float = 0.2, temperature2: float = 1.0, sinkhorn_iterations: int = 3,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
              reduce: Reduce | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PsCo's loss of a batch and its parts (`psco_supcon`, `psco_moco`).

    `p1` `[B, d]`: the online network's predictions for the first views (L2-normalised here);
    `z2` `[B, d]`: the momentum network's projections of the second views (normalised here,
    no gradient); `queue` `[K, d]` normalised momentum projections of earlier batches.
    `gather` (rows of every worker, rank order) and `reduce` (sum over workers) make the
    pseudo-task span every worker's batch: Sinkhorn balances over all rows and each
    worker's SupCon denominator holds every worker's shots. The loss is the mean over this
    worker's rows; averaged over equally loaded workers it is the loss of the whole batch.
    """
    p1 = F.normalize(full_precision(p1), dim=-1)
    with torch.no_grad():
        z2 = F.normalize(full_precision(z2.detach()), dim=-1).to(p1.dtype)
        queue = queue.detach().to(p1.dtype)
        assignment = sinkhorn(z2 @ queue.T, iterations=sinkhorn_iterations, reduce=reduce)  # [B, K]
        picked = torch.topk(assignment, k=shots, dim=1).indices  # [B, shots]
        own_shots = queue[picked]  # [B, shots, d]
        prototypes = own_shots.mean(dim=1)  # [B, d]
        every_shot = own_shots.reshape(-1, queue.shape[1])
        if gather is not None:
            every_shot = gather(every_shot)
    supcon = (torch.logsumexp(p1 @ every_shot.T / temperature2, dim=1)
              - (p1 * prototypes).sum(dim=1) / temperature2).mean()
    logits = torch.cat([(p1 * z2).sum(dim=1, keepdim=True), p1 @ queue.T], dim=1) / temperature
    moco = F.cross_entropy(logits, torch.zeros(len(p1), dtype=torch.long, device=p1.device))
    return supcon + moco, {"psco_supcon": float(supcon.detach()), "psco_moco": float(moco.detach())}


class PscoState:
    """What PsCo keeps between steps, and its settings: the momentum network and the queue.

    The momentum network is an EMA copy of the backbone's parameters (its buffers, BatchNorm's
    running statistics, are copied as they are, as PsCo does) and of the projector's (the SSL
    heads' `psco_projector.*`): `params`, `buffers`, `projector`. `queue` `[size, dim]` holds
    normalised momentum projections, the oldest overwritten first (`position`); it starts as
    random unit vectors drawn from `seed`. `pending` holds the projections of the step being
    taken, which enter the queue when the step is (`after_step`).
    """

    def __init__(self, params: dict, buffers: dict, projector: dict, *, size: int, dim: int, momentum: float,
                 seed: int, shots: int = 1, temperature: float = 0.2, temperature2: float = 1.0,
                 sinkhorn_iterations: int = 3):
        self.momentum, self.shots = momentum, shots
        self.temperature, self.temperature2, self.sinkhorn_iterations = temperature, temperature2, sinkhorn_iterations
        self.params, self.buffers, self.projector = (
            {k: v.detach().clone() for k, v in d.items()} for d in (params, buffers, projector))
        g = torch.Generator().manual_seed(seed)
        device = next(iter(params.values())).device
        self.queue = F.normalize(torch.randn(size, dim, generator=g), dim=-1).to(device)
        self.position = 0
        self.pending: torch.Tensor | None = None

    @torch.no_grad()
    def after_step(self, params: dict, buffers: dict, projector: dict) -> None:
        """A step was taken: the momentum weights move toward the online ones, the step's projections are queued."""
        for mine, online in ((self.params, params), (self.projector, projector)):
            for k, v in mine.items():
                v.mul_(self.momentum).add_(online[k].detach(), alpha=1 - self.momentum)
        for k, v in self.buffers.items():
            v.copy_(buffers[k])
        if self.pending is not None:
            self.enqueue(self.pending)
        self.pending = None

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write `rows` `[n, dim]` over the oldest entries (the last `size` rows when n > size)."""
        size = len(self.queue)
        rows = rows[-size:].to(self.queue)
        end = self.position + len(rows)
        if end <= size:
            self.queue[self.position:end] = rows
        else:  # wrap around
            first = size - self.position
            self.queue[self.position:] = rows[:first]
            self.queue[: end - size] = rows[first:]
        self.position = end % size

    def state_dict(self) -> dict:
        return {"params": self.params, "buffers": self.buffers, "projector": self.projector,
                "queue": self.queue, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state; CheckpointError when it does not fit this run's shapes."""
        from metassl.errors import CheckpointError

        for part in ("params", "buffers", "projector"):
            mine, saved = getattr(self, part), state.get(part, {})
            wrong = sorted(k for k in mine if k not in saved or saved[k].shape != mine[k].shape)
            if wrong:
                raise CheckpointError(f"the checkpoint's PsCo momentum network does not fit this run ({part}: "
                                      f"{wrong[:3]} missing or of another shape)")
        if state["queue"].shape != self.queue.shape:
            raise CheckpointError(f"the checkpoint's PsCo queue is {list(state['queue'].shape)}, this run's "
                                  f"{list(self.queue.shape)} (objective.psco_queue, objective.psco_dim)")
        for part in ("params", "buffers", "projector"):
            for k, v in getattr(self, part).items():
                v.copy_(state[part][k])
        self.queue.copy_(state["queue"])
        self.position = int(state["position"]) % len(self.queue)

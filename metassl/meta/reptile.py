"""Reptile (Nichol et al. 2018): move the initialisation towards the adapted weights."""
from __future__ import annotations

import torch
from torch import nn

from metassl.data.episodes import Episode
from metassl.meta.functional import MetaOutput, Params, adapt, detached, query_forward, task_loss
from metassl.meta.maml import _metrics


class Reptile:
    """Reptile on a params dict.

    Per task: `inner_steps` SGD steps on the support set give phi. The returned
    pseudo-gradient is `theta - mean_t(phi_t)`, so an outer SGD step with learning
    rate epsilon gives exactly `theta + epsilon * (mean phi - theta)`.
    """

    needs_head = True
    inner_loop = True  # adapts by gradient steps: BatchNorm uses support-set statistics (see backbones)

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 5, eval_inner_steps: int | None = None):
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps if eval_inner_steps is not None else inner_steps

    def meta_step(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> MetaOutput:
        """Return the pseudo-gradient averaged over the tasks and the query loss of each phi."""
        theta = {k: v.detach() for k, v in params.items()}
        phi_sum = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses, outputs = [], []
        for t in range(batch.support_x.shape[0]):
            with torch.enable_grad():
                phi = adapt(model, detached(theta), buffers, batch.support_x[t], batch.support_y[t],
                            inner_lr=self.inner_lr, steps=self.inner_steps, first_order=True)
            with torch.no_grad():
                for k in phi_sum:
                    phi_sum[k] += phi[k]
                out = query_forward(model, phi, buffers, batch.support_x[t], batch.query_x[t])
                losses.append(task_loss(out, batch.query_y[t]))
                outputs.append(out)
        n_tasks = batch.support_x.shape[0]
        pseudo_grad = {k: theta[k] - phi_sum[k] / n_tasks for k in theta}
        loss = torch.stack(losses).mean()
        return MetaOutput(loss, _metrics(loss, torch.stack(outputs), batch.query_y), grads=pseudo_grad)

    def predict(self, model: nn.Module, params: Params, buffers: Params, episode: Episode,
                inner_steps: int | None = None) -> torch.Tensor:
        """Return query outputs after fine-tuning on the support set."""
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        with torch.enable_grad():
            phi = adapt(model, detached(params), buffers, episode.support_x, episode.support_y,
                        inner_lr=self.inner_lr, steps=steps, first_order=True)
        with torch.no_grad():
            return query_forward(model, phi, buffers, episode.support_x, episode.query_x)

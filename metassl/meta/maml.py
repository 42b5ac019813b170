"""MAML (Finn et al. 2017), second order by default, first order as a flag."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metassl.data.episodes import Episode
from metassl.errors import ConfigError
from metassl.meta.functional import (
    MetaOutput,
    Params,
    accuracy,
    adapt,
    detached,
    INNER_LR,
    query_forward,
    sgd_step,
    split_inner_lr,
    task_loss,
)


class MAML:
    """Model-agnostic meta-learning on a params dict.

    Per task: `inner_steps` SGD steps with `inner_lr` on the support set, then the
    loss of the adapted parameters on the query set. The outer loss is the mean over
    the tasks of a meta-batch. `first_order=True` drops the second-order terms.
    `vectorize=True` maps the tasks with `torch.func.vmap` instead of a Python loop
    (needs a model without batch statistics that are tracked in place).
    `split_query=True` (the default) differentiates each task's query loss with respect to
    its adapted weights at once, as a first-order pass whose graph is freed before the next
    task, and carries the rest of the chain rule (through the inner loop, to the initial
    weights) in a surrogate `sum(adapted * d loss / d adapted)`: the meta-gradient is the same
    as differentiating the query losses through the inner loop, without keeping every task's
    query graph alive until the outer backward. `split_query=False` is that reference path.
    The surrogate carries first derivatives only: the returned loss cannot be differentiated
    twice, it keeps every task's inner-loop graph and its query gradient alive until the outer
    backward, and gradients reach the params dict only (not the inputs or the buffers).
    `split_query` applies to the per-task loop; `vectorize=True` ignores it.
    `learn_inner_lr=True` is Meta-SGD (Li et al. 2017): every weight has its own inner
    step size, a tensor of its shape that starts at `inner_lr` and is learned in the
    outer loop; `extra_params` makes them and they travel in the params dict as
    `inner_lr.<name>`.
    `zero_head=True` is the zeroing trick (Kao et al., ICLR 2022, "MAML is a noisy
    contrastive learner in classification"): every task's inner loop starts from a head of
    zeros as wide as the episode has classes, so one inner step sets each class's weights
    to (a scaled, centred) mean of its support features, the classifier no longer depends
    on how classes are numbered, and one model serves any N-way (train 64-way, test 5-way).
    The model's own head weights are then never used.
    `head_only=True` adapts the classifier head alone in the inner loop (ANIL, Raghu et al.
    2020): the body is shared by every task and learned in the outer loop only.
    """

    needs_head = True
    inner_loop = True  # adapts by gradient steps: BatchNorm uses support-set statistics (see backbones)

    def __init__(
        self,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        eval_inner_steps: int | None = None,
        vectorize: bool = False,
        split_query: bool = True,
        learn_inner_lr: bool = False,
        zero_head: bool = False,
        head_only: bool = False,
    ):
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.eval_inner_steps = eval_inner_steps if eval_inner_steps is not None else inner_steps
        self.vectorize = vectorize
        self.split_query = split_query
        self.learn_inner_lr = learn_inner_lr
        self.zero_head = zero_head
        self.only = "head." if head_only else None
        if zero_head and learn_inner_lr:
            raise ConfigError("learner.zero_head and learner.learn_inner_lr (Meta-SGD) do not combine: a head "
                              "of zeros as wide as each episode has no fixed shape to learn step sizes for")

    def extra_params(self, weights: Params) -> Params:
        """The outer-loop parameters this learner adds to the model's: Meta-SGD step sizes, or none."""
        if not self.learn_inner_lr:
            return {}
        return {INNER_LR + k: torch.full_like(v, self.inner_lr) for k, v in weights.items()
                if self.only is None or k.startswith(self.only)}

    def task_start(self, weights: Params, support_y: torch.Tensor) -> Params:
        """The weights every task's inner loop starts from: `weights`, or with `zero_head` the
        same with a zero head as wide as the episode has classes (labels are 0..N-1)."""
        if not self.zero_head:
            return weights
        if "head.weight" not in weights:
            raise ConfigError("learner.zero_head needs a model with a linear head (head.weight, head.bias)")
        n_way = int(support_y.max()) + 1
        w = weights["head.weight"]
        return {**weights, "head.weight": w.new_zeros(n_way, w.shape[1]).requires_grad_(),
                "head.bias": w.new_zeros(n_way).requires_grad_()}

    def meta_step(self, model: nn.Module, params: Params, buffers: Params, batch: Episode) -> MetaOutput:
        """Return the mean query loss after adaptation over a batch `[tasks, ...]` of episodes."""
        weights, lr = split_inner_lr(params, self.inner_lr)
        weights = self.task_start(weights, batch.support_y)
        if self.vectorize and buffers:
            raise ConfigError(f"learner.vectorize=true needs a model without running statistics (vmap cannot "
                              f"update them in place); this one has {sorted(buffers)[:2]}...")
        if self.vectorize and any(getattr(m, "channels_last", False) for m in model.modules()):
            raise ConfigError("learner.vectorize=true runs the convolutions under vmap, which cannot restride "
                              "their weights to channels-last; build the model with channels_last=False "
                              "(model.channels_last: false)")
        if self.vectorize:
            losses, outputs = self._vmapped(model, weights, lr, buffers, batch)
        else:
            losses, outputs, terms = [], [], []
            for t in range(batch.support_x.shape[0]):
                adapted = adapt(
                    model, weights, buffers, batch.support_x[t], batch.support_y[t],
                    inner_lr=lr, steps=self.inner_steps, first_order=self.first_order, only=self.only,
                )
                if self.split_query:
                    loss_t, out, v = query_gradient(model, adapted, buffers, batch.support_x[t],
                                                    batch.query_x[t], batch.query_y[t])
                    terms.append(sum(((adapted[k] * g).sum() for k, g in v.items()), loss_t.new_zeros(())))
                else:
                    out = query_forward(model, adapted, buffers, batch.support_x[t], batch.query_x[t])
                    loss_t = task_loss(out, batch.query_y[t])
                losses.append(loss_t)
                outputs.append(out)
            losses, outputs = torch.stack(losses), torch.stack(outputs)
            if self.split_query:
                # value: the mean query loss; gradient: that of the surrogate, which is the meta-gradient
                surrogate = torch.stack(terms).mean()
                loss = losses.mean() + (surrogate - surrogate.detach())
                return MetaOutput(loss, _metrics(loss, outputs, batch.query_y))
        loss = losses.mean()
        return MetaOutput(loss, _metrics(loss, outputs, batch.query_y))

    def _vmapped(self, model, params, lr, buffers, batch):
        adaptable = [k for k in params if self.only is None or k.startswith(self.only)]

        def inner_loss(a, fixed, x, y):
            return task_loss(functional_call(model, ({**fixed, **a}, buffers), (x,)), y)

        def one_task(p, sx, sy, qx, qy):
            a = {k: p[k] for k in adaptable}
            fixed = {k: v for k, v in p.items() if k not in a}
            step = {k: lr[k] for k in adaptable} if isinstance(lr, dict) else lr
            for _ in range(self.inner_steps):
                g = grad(inner_loss)(a, fixed, sx, sy)
                if self.first_order:
                    g = {k: v.detach() for k, v in g.items()}
                a = sgd_step(a, g, step)
            out = query_forward(model, {**fixed, **a}, buffers, sx, qx)
            return task_loss(out, qy), out

        # randomness="different": each task draws its own dropout masks (the Transformer's)
        return vmap(one_task, in_dims=(None, 0, 0, 0, 0), randomness="different")(
            params, batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )

    def predict(self, model: nn.Module, params: Params, buffers: Params, episode: Episode,
                inner_steps: int | None = None) -> torch.Tensor:
        """Return query outputs `[n_query_total, out]` after adapting on the support set."""
        steps = self.eval_inner_steps if inner_steps is None else inner_steps
        weights, lr = split_inner_lr(params, self.inner_lr, detach=True)
        weights = self.task_start(weights, episode.support_y)
        with torch.enable_grad():
            adapted = adapt(model, detached(weights), buffers, episode.support_x, episode.support_y,
                            inner_lr=lr, steps=steps, first_order=True, only=self.only)
        with torch.no_grad():
            return query_forward(model, adapted, buffers, episode.support_x, episode.query_x)


def query_gradient(model: nn.Module, adapted: Params, buffers: Params, support_x: torch.Tensor,
                   query_x: torch.Tensor, query_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """One task's query pass, first order: `(loss, outputs, d loss / d adapted)`, all detached.

    The adapted weights are cut from their graph, so this pass's own graph is freed on return;
    only weights that require a gradient and reach the loss get one.
    """
    leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in adapted.items()}
    with torch.enable_grad():
        out = query_forward(model, leaves, buffers, support_x, query_x)
        loss = task_loss(out, query_y)
        names = [k for k, v in leaves.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return loss.detach(), out.detach(), {k: g for k, g in zip(names, grads) if g is not None}


def _metrics(loss: torch.Tensor, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metrics = {"query_loss": float(loss.detach())}
    if not target.dtype.is_floating_point:
        metrics["query_acc"] = float(accuracy(outputs.detach(), target))
    return metrics

"""The functional core: a model's parameters live in a dict, adaptation returns a new dict.

Nothing here mutates the `nn.Module`; it is only ever run with
`torch.func.functional_call(model, (params, buffers), x)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


@dataclass
class MetaOutput:
    """What a meta-learner returns for one meta-batch.

    `loss` is the scalar outer loss. When `grads` is None the outer gradient is
    `d loss / d params`; when set (Reptile) it is the pseudo-gradient itself and
    `loss` is only reported. `metrics` holds plain floats for logging.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    grads: Params | None = None


def forward(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """Run `model` on `x` with the given parameters and buffers."""
    return functional_call(model, (params, buffers), (x,))


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 when autocast made it bf16 or fp16 (distances, similarities, contrastive logits)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def uses_support_statistics(model: nn.Module) -> bool:
    """True when `model` normalises with support-set statistics (SupportBatchNorm layers)."""
    from metassl.models.backbones import SupportBatchNorm

    return any(isinstance(m, SupportBatchNorm) for m in model.modules())


def query_forward(model: nn.Module, params: Params, buffers: Params, support_x: torch.Tensor,
                  query_x: torch.Tensor) -> torch.Tensor:
    """Outputs for `query_x` of a network adapted on `support_x`, normalised as in its inner loop.

    With support-statistics BatchNorm the support set is run too, and every layer uses its
    statistics (so queries never see each other); any other model runs on the queries alone.
    """
    if not uses_support_statistics(model):
        return forward(model, params, buffers, query_x)
    n = support_x.shape[0]
    out = functional_call(model, (params, buffers), (torch.cat([support_x, query_x]),), {"reference": n})
    return out[n:]


def task_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, mean squared error for float targets."""
    if target.dtype.is_floating_point:
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows of `logits` whose argmax equals `target`."""
    return (logits.argmax(dim=-1) == target).float().mean()


INNER_LR = "inner_lr."  # Meta-SGD: params["inner_lr." + name] is the learned step size of params[name]


def split_inner_lr(params: Params, default: float, detach: bool = False) -> tuple[Params, float | Params]:
    """Return `(model weights, inner step sizes)` of `params`.

    The step sizes are the learned per-parameter tensors (Meta-SGD) when `params`
    holds `inner_lr.*` entries, else the float `default`; `detach` (evaluation) cuts
    them from the graph.
    """
    weights = {k: v for k, v in params.items() if not k.startswith(INNER_LR)}
    if len(weights) == len(params):
        return weights, default
    return weights, {k: params[INNER_LR + k].detach() if detach else params[INNER_LR + k] for k in weights
                     if INNER_LR + k in params}


def sgd_step(params: Params, grads: Params | tuple, lr: float | Params) -> Params:
    """Return `{k: p - lr_k * g_k}`; `lr` is one float or a per-parameter dict (Meta-SGD)."""
    names = list(params)
    grad_list = list(grads.values()) if isinstance(grads, dict) else list(grads)
    out = {}
    for name, g in zip(names, grad_list):
        step = lr[name] if isinstance(lr, dict) else lr
        out[name] = params[name] - step * g
    return out


def adapt(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    inner_lr: float | Params,
    steps: int,
    first_order: bool = False,
    only: str | None = None,
) -> Params:
    """Return the parameters after `steps` SGD steps on the loss of `(x, y)`.

    With `first_order=False` the graph through each step is kept (`create_graph`),
    so the result stays differentiable w.r.t. `params` to second order. With
    `first_order=True` the inner gradients are treated as constants. `only` (a name
    prefix such as "head.") adapts those parameters alone; the others stay as given.
    """
    names = [k for k in params if only is None or k.startswith(only)]
    if not names:
        raise ValueError(f"no parameter name starts with {only!r}")
    for _ in range(steps):
        loss = task_loss(forward(model, params, buffers, x), y)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=not first_order)
        lr = {k: inner_lr[k] for k in names} if isinstance(inner_lr, dict) else inner_lr
        params = {**params, **sgd_step({k: params[k] for k in names}, grads, lr)}
    return params


def detached(params: Params, requires_grad: bool = True) -> Params:
    """Return leaf copies of `params` (for evaluation or first-order inner loops)."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in params.items()}

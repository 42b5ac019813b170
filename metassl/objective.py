"""The combined objective `meta_loss + ssl_weight * ssl_loss` and its SSL heads.

SSL heads are outer-loop parameters only: they never enter a learner's inner loop.
Their parameters live in a dict beside the backbone's and receive gradients only
from the SSL loss. Every part is returned separately for logging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metassl.meta.functional import MetaOutput, Params, forward
from metassl.ssl.losses import nt_xent, rotation_loss


class SSLHeads(nn.Module):
    """A SimCLR projection MLP (`dim -> dim -> proj_dim`) and a 4-way rotation classifier."""

    def __init__(self, dim: int, proj_dim: int = 64):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.rotation = nn.Linear(dim, 4)


def features(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """The backbone's embedding `[B, D]` of `x`, without a classifier head if the model has one."""
    body = getattr(model, "features", None)
    if body is None or getattr(model, "head", None) is None:
        return forward(model, params, buffers, x)
    return forward(body, _sub(params, "features."), _sub(buffers, "features."), x)


@dataclass
class SSLWeights:
    """Which SSL losses to use and how much each counts inside `ssl_loss`."""

    simclr: float = 1.0
    rotation: float = 1.0
    temperature: float = 0.5


def ssl_loss(model: nn.Module, params: Params, buffers: Params, heads: SSLHeads, head_params: Params,
             views: tuple[torch.Tensor, ...], weights: SSLWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the SSL loss of a batch of views `(x1, x2, rot_x, rot_y)` and its parts."""
    x1, x2, rot_x, rot_y = views
    parts: dict[str, float] = {}
    total = torch.zeros(())
    if weights.simclr:
        z = features(model, params, buffers, torch.cat([x1, x2]))
        proj = forward(heads.projection, _sub(head_params, "projection."), {}, z)
        loss = nt_xent(proj[: len(x1)], proj[len(x1):], weights.temperature)
        parts["simclr_loss"] = float(loss.detach())
        total = total + weights.simclr * loss
    if weights.rotation:
        logits = forward(heads.rotation, _sub(head_params, "rotation."), {}, features(model, params, buffers, rot_x))
        loss = rotation_loss(logits, rot_y)
        parts["rotation_loss"] = float(loss.detach())
        parts["rotation_acc"] = float((logits.argmax(-1) == rot_y).float().mean())
        total = total + weights.rotation * loss
    return total, parts


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def combined_gradients(out: MetaOutput, ssl: torch.Tensor | None, ssl_weight: float,
                       params: Params, head_params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Meta-gradients of `meta_loss + ssl_weight * ssl_loss` for the backbone and the SSL heads.

    The meta part is the learner's pseudo-gradient when it gives one (Reptile),
    else `d meta_loss / d params`; the SSL part is always a true gradient. One
    backward pass covers both parts when the learner has a differentiable loss.
    """
    names, heads = list(params), list(head_params.values())
    use_ssl = ssl is not None and ssl_weight != 0
    if out.grads is None:
        loss = out.loss + ssl_weight * ssl if use_ssl else out.loss
        g = _grads(loss, [params[k] for k in names] + (heads if use_ssl else []))
        return g[: len(names)], g[len(names):] if use_ssl else [torch.zeros_like(h) for h in heads]
    meta = [out.grads[k] for k in names]
    if not use_ssl:
        return meta, [torch.zeros_like(h) for h in heads]
    g = _grads(ssl_weight * ssl, [params[k] for k in names] + heads)
    return [m + s for m, s in zip(meta, g[: len(names)])], g[len(names):]


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

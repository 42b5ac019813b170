"""The combined objective `meta_loss + ssl_weight * ssl_loss` and its SSL heads.

SSL heads are outer-loop parameters only: they never enter a learner's inner loop.
Their parameters live in a dict beside the backbone's and receive gradients only
from the SSL loss. Every part is returned separately for logging.

The SSL forward passes leave the model's buffers alone: BatchNorm running statistics
describe the episodes' images, not augmented views or rotated copies. With several
workers, NT-Xent takes its negatives from the whole meta-batch through the `gather`
function passed in (`distributed.gather_rows`); the losses themselves stay pure.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from metassl.meta.functional import MetaOutput, Params, forward, full_precision
from metassl.ssl.cpc import cpc_loss
from metassl.ssl.losses import nt_xent, rotation_loss
from metassl.ssl.psco import PscoState, Reduce, mlp, psco_loss


class SSLHeads(nn.Module):
    """A SimCLR projection MLP (`dim -> dim -> proj_dim`) and the pretext head: a 4-way rotation
    classifier for images, or for texts (`vocab_size` set) a masked-token predictor over the
    vocabulary (`token_dim -> token_dim`, GELU, LayerNorm, `-> vocab_size`, as BERT's; `token_dim`
    is the width of a token's state, `dim` by default). `psco` = (hidden, out) adds PsCo's
    projector (`dim -> hidden -> out`) and predictor (`out -> hidden -> out`). `cpc` = (steps,
    context, frame) adds CPC's predictors `[steps, context, frame]` (audio; no rotation head)."""

    def __init__(self, dim: int, proj_dim: int = 64, vocab_size: int | None = None, token_dim: int | None = None,
                 psco: tuple[int, int] | None = None, cpc: tuple[int, int, int] | None = None):
        super().__init__()
        if cpc:
            steps, context, frame = cpc
            # std 1 / context: the first predictions are small, so the first scores are near 0 (chance)
            self.cpc_predictors = nn.Parameter(torch.randn(steps, context, frame) / context)
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        if psco:
            hidden, out = psco
            self.psco_projector = mlp(dim, hidden, out, last_norm=True)
            self.psco_predictor = mlp(out, hidden, out, last_norm=False)
        if vocab_size:
            t = token_dim or dim
            self.mlm = nn.Sequential(nn.Linear(t, t), nn.GELU(), nn.LayerNorm(t), nn.Linear(t, vocab_size))
        elif not cpc:
            self.rotation = nn.Linear(dim, 4)


def features(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """The backbone's embedding `[B, D]` of `x`, without a classifier head if the model has one."""
    body = getattr(model, "features", None)
    if body is None or getattr(model, "head", None) is None:
        return forward(model, params, buffers, x)
    return forward(body, _sub(params, "features."), _sub(buffers, "features."), x)


def frames(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(z, c)`: an audio model's frames `[B, L, D]` and context states `[B, L, C]` for clips `x` `[B, 1, T]`."""
    from torch.func import functional_call

    return functional_call(model.features, (_sub(params, "features."), _sub(buffers, "features.")), (x,),
                           {"frames": True})


def token_states(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """Per-token states `[B, L, D]` of a text model's encoder (`model.features`) for items `x` `[B, 2, L]`."""
    from torch.func import functional_call

    return functional_call(model.features, (_sub(params, "features."), _sub(buffers, "features.")), (x,),
                           {"tokens": True})


@dataclass
class SSLWeights:
    """Which SSL losses to use and how much each counts inside `ssl_loss`."""

    simclr: float = 1.0
    rotation: float = 1.0
    temperature: float = 0.5
    mlm: float = 1.0
    psco: float = 0.0
    cpc: float = 0.0


Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # rows -> (every worker's rows, own start)


def ssl_loss(model: nn.Module, params: Params, buffers: Params, heads: SSLHeads, head_params: Params,
             views: tuple[torch.Tensor, ...], weights: SSLWeights,
             gather: Gather | None = None, psco: PscoState | None = None,
             reduce: Reduce | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the SSL loss of a batch of views `(x1, x2, rot_x, rot_y)` and its parts.

    `x1`, `x2`: `[B, C, H, W]` two views of `B` images; `rot_x` `[R, C, H, W]` with its
    quarter turns `rot_y` `[R]`. For texts (int64 items `[B, 2, L]`): `x1`, `x2` are the same
    texts, whose two passes differ by dropout (SimCSE), and `rot_x` `[R, 2, L]` a masked view
    with targets `rot_y` `[R, L]` (-100: not a target): masked-language modelling, weighted by
    `weights.mlm` in place of rotation. The backbone runs on throw-away copies of `buffers`, so
    running statistics are not updated by the views. `gather` (`distributed.gather_rows`
    when training on several workers) makes NT-Xent compare this worker's pairs with the
    projections of every worker's views; this worker's loss is the mean over its own pairs
    and averaging the workers' gradients gives the gradient of the whole meta-batch's loss.
    `psco` (with `weights.psco`): PsCo's loss on the same two views, with its momentum network
    and queue (`metassl.ssl.psco`); `reduce` sums over workers (Sinkhorn's balancing). This
    step's momentum projections are left in `psco.pending` for `psco.after_step`.
    For audio clips (float `[B, 1, T]`), `rot_x` holds the source clips unchanged and `rot_y`
    zeros: there is no rotation to predict, and `weights.cpc` weighs CPC on `rot_x` (its
    negatives from every worker's clips through `gather`).
    """
    x1, x2, rot_x, rot_y = views
    parts: dict[str, float] = {}
    total = torch.zeros(())
    if weights.simclr:
        b = len(x1)
        z = features(model, params, _scratch(buffers), torch.cat([x1, x2]))
        # under autocast: NT-Xent and its gather in fp32
        proj = full_precision(forward(heads.projection, _sub(head_params, "projection."), {}, z))
        if gather is None:
            loss = nt_xent(proj[:b], proj[b:], weights.temperature)
        else:
            # one collective for both views: rows are [worker, view, pair] in rank order
            rows, start = gather(proj)
            views_of_all = rows.reshape(-1, 2, b, rows.shape[-1])
            z1, z2 = (views_of_all[:, v].reshape(-1, rows.shape[-1]) for v in (0, 1))
            first = start // 2  # this worker's first pair among all workers' pairs
            loss = nt_xent(z1, z2, weights.temperature, anchors=(first, first + b))
        parts["simclr_loss"] = float(loss.detach())
        total = total + weights.simclr * loss
    if weights.psco and psco is not None:
        loss, psco_parts = _psco_term(model, params, buffers, heads, head_params, x1, x2, psco, gather, reduce)
        parts.update(psco_parts, psco_loss=float(loss.detach()))
        total = total + weights.psco * loss
    if rot_x.dtype == torch.int64:  # texts: masked-language modelling
        picked = rot_y != -100
        count = picked.sum().to(torch.float32)
        # the mean over every worker's masked pieces: each worker's sum over the pieces of all
        # workers (times the workers, since their gradients are averaged)
        counts = count.reshape(1, 1) if gather is None else gather(count.reshape(1, 1))[0]  # a collective
        share = counts.sum() / len(counts)
        if weights.mlm and share > 0:  # a batch of very short texts may have no piece masked
            states = token_states(model, params, _scratch(buffers), rot_x)
            logits = forward(heads.mlm, _sub(head_params, "mlm."), {}, states[picked])
            loss = torch.nn.functional.cross_entropy(logits, rot_y[picked], reduction="sum") / share
            parts["mlm_loss"] = float(loss.detach())
            parts["mlm_acc"] = float((logits.argmax(-1) == rot_y[picked]).float().mean()) if count else 0.0
            total = total + weights.mlm * loss
    elif rot_x.ndim == 3:  # audio: contrastive predictive coding on the clean clips
        if weights.cpc:
            z, c = frames(model, params, _scratch(buffers), rot_x)
            z, c = full_precision(z), full_precision(c)
            others, start = gather(z) if gather is not None else (z, 0)
            loss, acc = cpc_loss(z, c, head_params["cpc_predictors"], others=others, start=start)
            parts["cpc_loss"], parts["cpc_acc"] = float(loss.detach()), float(acc)
            total = total + weights.cpc * loss
    elif weights.rotation:
        embedded = features(model, params, _scratch(buffers), rot_x)
        logits = forward(heads.rotation, _sub(head_params, "rotation."), {}, embedded)
        loss = rotation_loss(logits, rot_y)
        parts["rotation_loss"] = float(loss.detach())
        parts["rotation_acc"] = float((logits.argmax(-1) == rot_y).float().mean())
        total = total + weights.rotation * loss
    return total, parts


def _psco_term(model, params, buffers, heads, head_params, x1, x2, psco: PscoState, gather, reduce):
    """PsCo's loss: online predictions of `x1` against momentum projections of `x2` and the queue."""
    projector, predictor = psco_projector(head_params), _sub(head_params, "psco_predictor.")
    z1 = forward(heads.psco_projector, projector, {}, features(model, params, _scratch(buffers), x1))
    p1 = full_precision(forward(heads.psco_predictor, predictor, {}, z1))
    with torch.no_grad():
        z2 = features(model, psco.params, _scratch(psco.buffers), x2)
        z2 = torch.nn.functional.normalize(full_precision(forward(heads.psco_projector, psco.projector, {}, z2)),
                                           dim=-1)
    rows = (lambda t: gather(t)[0]) if gather is not None else None
    loss, parts = psco_loss(p1, z2, psco.queue, shots=psco.shots, temperature=psco.temperature,
                            temperature2=psco.temperature2, sinkhorn_iterations=psco.sinkhorn_iterations,
                            gather=rows, reduce=reduce)
    with torch.no_grad():
        psco.pending = rows(z2) if rows is not None else z2  # every worker's, in rank order
    return loss, parts


def psco_projector(head_params: Params) -> Params:
    """The online projector's parameters among the SSL heads' (what PsCo's momentum network follows)."""
    return _sub(head_params, "psco_projector.")


def _scratch(buffers: Params) -> Params:
    """Copies of `buffers` for a forward pass whose BatchNorm updates are to be thrown away."""
    return {k: v.clone() for k, v in buffers.items()}


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def combined_gradients(out: MetaOutput, ssl: torch.Tensor | None, ssl_weight: float,
                       params: Params, head_params: Params,
                       meta_weight: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Meta-gradients of `meta_weight * meta_loss + ssl_weight * ssl_loss` for the backbone and the SSL heads.

    `meta_weight` is 1 except in ablations that train on the SSL loss alone (0).
    The meta part is the learner's pseudo-gradient when it gives one (Reptile),
    else `d meta_loss / d params`; the SSL part is always a true gradient. One
    backward pass covers both parts when the learner has a differentiable loss.
    """
    names, heads = list(params), list(head_params.values())
    use_ssl = ssl is not None and ssl_weight != 0
    if out.grads is None:
        meta = out.loss if meta_weight == 1 else meta_weight * out.loss
        loss = meta + ssl_weight * ssl if use_ssl else meta
        g = _grads(loss, [params[k] for k in names] + (heads if use_ssl else []))
        return g[: len(names)], g[len(names):] if use_ssl else [torch.zeros_like(h) for h in heads]
    meta = [meta_weight * out.grads[k] for k in names]
    if not use_ssl:
        return meta, [torch.zeros_like(h) for h in heads]
    g = _grads(ssl_weight * ssl, [params[k] for k in names] + heads)
    return [m + s for m, s in zip(meta, g[: len(names)])], g[len(names):]


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

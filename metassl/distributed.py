"""The only module that calls collectives: averaging meta-gradients across training workers.

Meta-learners are not wrapped in DDP (second-order gradients and DDP do not mix);
each worker computes the meta-gradient of its share of the meta-batch and one
explicit all-reduce averages them, so every worker takes the same outer step.

Losses that compare examples across the whole meta-batch (NT-Xent's negatives) see
every worker's rows through `gather_rows`, a differentiable all-gather.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """`(rank, world_size)` of this process; `(0, 1)` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives take their tensors: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return the element-wise mean of `grads` over all workers (one flat all-reduce)."""
    _, size = world()
    if size == 1:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    out, i = [], 0
    for g in grads:
        out.append(flat[i:i + g.numel()].view_as(g))
        i += g.numel()
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every worker's gradient for this worker's rows.

    Worker r's loss `L_r` depends on the rows of every worker, so the gradient that
    reaches worker s's rows is `sum_r dL_r / dx_s`: an all-reduce of the gathered
    gradient, then this worker's slice. Averaging the resulting parameter gradients
    over the `W` workers (`average_gradients`) then gives exactly the gradient of
    `(1/W) sum_r L_r`, the loss over the whole meta-batch when each `L_r` is the mean
    over worker r's equally many rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return `(rows of every worker's x, in rank order; where this worker's rows start)`.

    `x` is `[n, ...]` with the same shape on every worker. The gather is differentiable:
    see `_GatherRows` for how gradients reach each worker's own rows. Every worker must
    call it at the same point (it is a collective), and the backward pass is one too.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    return _GatherRows.apply(x), rank * x.shape[0]


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all workers (a new tensor; `t` itself on one worker). Not differentiable."""
    _, size = world()
    if size == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Return each metric averaged over all workers (same keys on every worker)."""
    _, size = world()
    if size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / size for k, v in zip(keys, t)}


def any_true(flag: bool) -> bool:
    """True on every worker when `flag` is true on any of them (e.g. a time limit reached)."""
    _, size = world()
    if size == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_buffers_(buffers: dict[str, torch.Tensor]) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all workers, in place."""
    floats = [b for b in buffers.values() if b.dtype.is_floating_point]
    if floats:
        for b, avg in zip(floats, average_gradients(floats)):
            b.copy_(avg)

"""The only module that calls collectives: averaging meta-gradients across training workers.

Meta-learners are not wrapped in DDP (second-order gradients and DDP do not mix);
each worker computes the meta-gradient of its share of the meta-batch and one
explicit all-reduce averages them, so every worker takes the same outer step.
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

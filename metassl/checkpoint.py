"""Checkpoints that load without executing code (`torch.load(weights_only=True)`).

A checkpoint is one dict of tensors, numbers, strings and lists: parameters,
buffers, optimiser and scheduler state, step, RNG state, best validation score
and the resolved config, so that a resume or an evaluation rebuilds the same model.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from metassl.errors import CheckpointError

FORMAT = "metassl-checkpoint-v1"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def to_cpu(obj):
    """`obj` (tensors in dicts, lists and tuples) with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save(path: str | Path, state: dict) -> None:
    """Write `state` atomically (a crash mid-write never leaves a half file under `path`).

    Tensors are stored on the CPU, so a checkpoint written on a GPU loads anywhere.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, **to_cpu(state)}, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    """Read a checkpoint, raising `CheckpointError` naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a metassl checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT} file")
    missing = [k for k in ("config", "params", "buffers", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    for key in ("params", "buffers", "head_params"):
        tensors = state.get(key, {})
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise CheckpointError(f"checkpoint {str(path)!r}: {key!r} must map names to tensors")
        bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise CheckpointError(f"checkpoint {str(path)!r}: {key}[{bad!r}] holds NaN or infinite values")
    if not isinstance(state["config"], dict) or isinstance(state["step"], bool) or not isinstance(state["step"], int):
        raise CheckpointError(f"checkpoint {str(path)!r}: 'config' must be a mapping and 'step' an integer")
    return state


def step_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def best_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "best.pt"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    """The newest step checkpoint of a run, or None."""
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for p in step_checkpoints(run_dir)[:-keep]:
        p.unlink()


def mark_best(run_dir: str | Path, source: Path) -> None:
    """Copy a step checkpoint to `best.pt`."""
    tmp = best_path(run_dir).with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, best_path(run_dir))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or for a run directory its `best.pt` (else its newest step checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if best_path(path).is_file():
            return best_path(path)
        newest = latest(path)
        if newest is None:
            raise CheckpointError(f"run directory {str(path)!r} has no checkpoints/ with a .pt file")
        return newest
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is neither a run directory nor a checkpoint file")
    return path

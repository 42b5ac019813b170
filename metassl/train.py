"""Meta-training: the per-process loop, run in-process (`--backend local`).

The loop reads episodes `[step * meta_batch, (step + 1) * meta_batch)` of a seeded
sampler, so a run is reproducible from its config and a resume continues the same
stream. Rank 0 writes `config.yaml`, checkpoints, TensorBoard events and `result.json`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import yaml

from metassl import checkpoint
from metassl.config import Config, dump, from_dict, to_dict
from metassl.errors import ConfigError
from metassl.evaluate import EvalResult, eval_shape, evaluate_model
from metassl.generate.source import TrainingSource
from metassl.registry import build_backbone, build_learner, build_sampler, is_regression

# Sections that may change between a run and its resume (length, logging, evaluation).
_RESUMABLE_CHANGES = ("train", "eval")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse (without writing anything) a run directory that holds a different experiment."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and checkpoint.latest(run_dir) is not None:
        old = yaml.safe_load(saved.read_text()) or {}
        new = to_dict(cfg)
        changed = [f"{s}.{k}" for s in new if s not in _RESUMABLE_CHANGES and isinstance(new[s], dict)
                   for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
        changed += [s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s]]
        if changed:
            raise ConfigError(f"run directory {str(run_dir)!r} holds a run with a different config "
                              f"({', '.join(changed)} differ); use another --run-dir to start a new run")


def make_optimizer(cfg: Config, params):
    """Return the outer optimiser and its learning-rate scheduler."""
    o = cfg.optim
    if o.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=o.outer_lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=o.outer_lr, weight_decay=o.weight_decay)
    if o.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def outer_gradients(out, params: dict) -> list[torch.Tensor]:
    """The meta-gradient of a learner's output: its pseudo-gradient, or d loss / d params."""
    if out.grads is not None:
        return [out.grads[k] for k in params]
    grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]


def _weights(params: dict, buffers: dict) -> dict:
    """Detached copies of a model's parameters and buffers (what an encoder refresh sends)."""
    return {k: v.detach().clone() for k, v in {**params, **buffers}.items()}


class Progress:
    """Console progress lines: step, loss, accuracy, validation, episodes/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, log=print):
        self.total, self.log = total_steps, log
        self.t0, self.s0 = time.perf_counter(), start_step

    def rate(self, step: int) -> float:
        """Outer steps per second since the start (or resume)."""
        return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, step: int, metrics: dict, episodes_per_s: float, val: float | None) -> None:
        eta = (self.total - step) / max(self.rate(step), 1e-9)
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]
        if val is not None:
            parts.append(f"val {val:.4f}")
        parts += [f"{episodes_per_s:.1f} episodes/s", f"ETA {eta / 60:.1f} min"]
        self.log(" | ".join(parts))


def run_local(cfg: Config, run_dir: str | Path, log=print) -> dict:
    """Meta-train in this process, evaluate the best checkpoint on meta-test, return `result.json`'s dict."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    learner = build_learner(cfg)
    model = build_backbone(cfg, learner)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    opt, sched = make_optimizer(cfg, list(params.values()))
    ep = cfg.episodes
    check_resumable(cfg, run_dir)

    start, best, history, losses = 0, None, [], []
    resume_from = checkpoint.latest(run_dir)
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        buffers.update(state["buffers"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, best = state["step"], state.get("best_val")
        history, losses = list(state.get("val_history", [])), list(state.get("loss_history", []))
        log(f"resuming {run_dir} from {resume_from.name} (step {start})")

    # Both splits load before the run directory is written, so bad data fails without
    # leaving anything behind. Validation uses the evaluation episode shape.
    n_way, k_shot, n_query = eval_shape(cfg)
    val_tasks = build_sampler(cfg, "val", n_way=n_way, k_shot=k_shot, n_query=n_query, seed=cfg.eval.seed)
    train_tasks = TrainingSource(cfg, start_step=start)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, run_dir / "config.yaml")
    refresh = cfg.generator.kind == "cluster" and cfg.generator.encoder == "model"
    if refresh:  # the cluster generator embeds with the network being meta-trained
        train_tasks.refresh_encoder(_weights(params, buffers), version=start)
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    progress = Progress(cfg.train.steps, start, log)
    higher_is_better = not is_regression(cfg)
    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else math.inf

    def validate(step: int) -> float:
        res = evaluate_model(cfg, learner, model, params, buffers, split="val", episodes=cfg.train.val_episodes,
                             seed=cfg.eval.seed, baseline=False, sampler=val_tasks)
        writer.add_scalar("val/acc" if higher_is_better else "val/mse", res.mean, step)
        writer.add_scalar("val/ci95", res.ci95, step)
        return res.mean

    def save(step: int, val: float | None) -> None:
        nonlocal best
        is_best = val is not None and (best is None or (val > best if higher_is_better else val < best))
        if is_best:
            best = val
        path = checkpoint.step_path(run_dir, step)
        checkpoint.save(path, {
            "step": step, "config": to_dict(cfg),
            "params": {k: v.detach() for k, v in params.items()}, "buffers": buffers,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "best_val": best, "val_history": history,
            "loss_history": losses,
        })
        if is_best or not checkpoint.best_path(run_dir).exists():
            checkpoint.mark_best(run_dir, path)
        checkpoint.prune(run_dir, cfg.train.keep_checkpoints)

    step, window_t, window_steps, window_wait, val = start, time.perf_counter(), 0, 0.0, None
    while step < cfg.train.steps:
        fetched = train_tasks.batch(step)
        window_wait += fetched.wait_s
        out = learner.meta_step(model, params, buffers, fetched.episodes)
        grads = outer_gradients(out, params)
        for p, g in zip(params.values(), grads):
            p.grad = g
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        step += 1
        window_steps += 1
        if refresh and cfg.generator.refresh_every and step % cfg.generator.refresh_every == 0:
            train_tasks.refresh_encoder(_weights(params, buffers), version=step)
        out_of_time = time.perf_counter() > deadline
        last = step == cfg.train.steps or out_of_time
        if step % cfg.train.log_every == 0 or last:
            window_s = max(time.perf_counter() - window_t, 1e-9)
            eps = window_steps * ep.meta_batch / window_s
            for k, v in out.metrics.items():
                writer.add_scalar(f"train/{k}", v, step)
            losses.append([step, float(out.loss.detach())])
            writer.add_scalar("train/meta_loss", losses[-1][1], step)
            writer.add_scalar("perf/episodes_per_s", eps, step)
            writer.add_scalar("perf/wait_frac", window_wait / window_s, step)
            if fetched.records:
                versions = fetched.encoder_versions()
                writer.add_scalar("gen/encoder_version", max(versions), step)
            writer.add_scalar("lr", opt.param_groups[0]["lr"], step)
            progress.line(step, out.metrics, eps, val)
            window_t, window_steps, window_wait = time.perf_counter(), 0, 0.0
        val_now = last or (cfg.train.val_every and step % cfg.train.val_every == 0)
        if val_now:
            val = validate(step)
            history.append([step, val])
        if val_now or step % cfg.train.checkpoint_every == 0:
            save(step, val if val_now else None)
        if out_of_time:
            log(f"stopping at step {step}: train.max_minutes={cfg.train.max_minutes} reached")
            break
    writer.flush()
    train_tasks.close()

    result = final_evaluation(cfg, run_dir, learner, model, log)
    result.update({"steps": step, "best_val": best, "val_history": history, "loss_history": losses,
                   "train_minutes": (time.perf_counter() - progress.t0) / 60})
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    writer.add_scalar("test/" + result["test"]["metric"], result["test"]["mean"], step)
    writer.close()
    return result


def final_evaluation(cfg: Config, run_dir: Path, learner, model, log=print) -> dict:
    """Evaluate `best.pt` on the meta-test split with the config's eval protocol."""
    state = checkpoint.load(checkpoint.best_path(run_dir))
    params, buffers = state["params"], state["buffers"]
    res: EvalResult = evaluate_model(cfg, learner, model, params, buffers, split=cfg.eval.split,
                                     episodes=cfg.eval.episodes, seed=cfg.eval.seed,
                                     inner_steps=cfg.eval.inner_steps)
    log(res.summary())
    return {"name": cfg.name, "best_step": state["step"], "test": res.to_dict()}


def load_trained(path: str | Path):
    """Return `(cfg, learner, model, params, buffers, state)` from a run directory or checkpoint."""
    state = checkpoint.load(checkpoint.resolve(path))
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {e}") from None
    learner = build_learner(cfg)
    model = build_backbone(cfg, learner)
    expected = dict(model.named_parameters())
    if set(state["params"]) != set(expected) or any(
            state["params"][k].shape != v.shape for k, v in expected.items()):
        raise checkpoint.CheckpointError(f"checkpoint {str(path)!r}: parameters do not match the model its config builds")
    return cfg, learner, model, state["params"], state["buffers"], state

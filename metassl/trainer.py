"""Meta-training: one loop for every backend, run in-process or on each Ray Train worker.

The loop reads episodes `[step * meta_batch, (step + 1) * meta_batch)` of a seeded
stream (each of `world` workers takes its share), so a run is reproducible from its
config and a resume continues the same stream. Meta-gradients of
`meta_loss + ssl_weight * ssl_loss` are averaged across workers with one explicit
all-reduce. Rank 0 writes `config.yaml`, checkpoints, TensorBoard and `result.json`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import yaml

from metassl import checkpoint, distributed
from metassl.config import Config, dump, from_dict, is_audio_config, is_text_config, to_dict, with_values
from metassl.errors import CheckpointError, ConfigError, DataError, MetasslError
from metassl.evaluation import EvalResult, eval_shape, evaluate_model
from metassl.generate.source import (MomentumEncoder, TrainingSource, cpu_weights, encoder_version, uses_model_encoder,
                                     with_generative)
from metassl.generative.fit import needs_generative
from metassl.meta.functional import INNER_LR
from metassl.storage import RunStore, is_uri
from metassl.objective import SSLHeads, SSLWeights, combined_gradients, psco_projector, ssl_loss
from metassl.ssl.psco import PscoState
from metassl.registry import (build_backbone, build_learner, build_sampler, has_inner_loop, is_regression,
                              read_tokenizer_text, text_settings)

# Sections that may change between a run and its resume (length, logging, evaluation, tuning).
_RESUMABLE_CHANGES = ("train", "eval", "tune")
# Settings of those sections that define the meta-val score checkpoints are ranked by: a resumed
# run keeps them, or its best.pt would be chosen among scores measured two ways.
_VALIDATION_KEYS = ("eval.n_way", "eval.k_shot", "eval.n_query", "eval.seed", "eval.features",
                    "train.val_episodes")
# Settings that change how episodes are made, never which: a resumed run may change them.
# `storage` only says where the run directory lives.
_RESUMABLE_KEYS = ("generator.actors", "generator.max_in_flight", "generator.episodes_per_task",
                   "generator.refresh_threads", "storage")


def check_resumable(cfg: Config, run_dir: Path, saved: dict | None = None) -> None:
    """Refuse (without writing anything) to resume a different experiment.

    `saved` is the config stored in the checkpoint being resumed; without it the run
    directory's `config.yaml` is compared when the directory has checkpoints.
    """
    if saved is None:
        path = run_dir / "config.yaml"
        if not (path.is_file() and checkpoint.latest(run_dir) is not None):
            return
        saved = yaml.safe_load(path.read_text()) or {}
    new = to_dict(cfg)
    try:  # keys added since the run started take their defaults
        saved = to_dict(from_dict(saved))
    except ConfigError as e:
        raise ConfigError(f"run directory {str(run_dir)!r} holds a config this metassl cannot read ({e}); "
                          "use another --run-dir") from None
    changed = [f"{s}.{k}" + _nested_diff(saved.get(s, {}).get(k), new[s][k])
               for s in new if s not in _RESUMABLE_CHANGES and isinstance(new[s], dict)
               for k in new[s] if saved.get(s, {}).get(k) != new[s][k] and f"{s}.{k}" not in _RESUMABLE_KEYS]
    changed += [s for s in new if not isinstance(new[s], dict) and saved.get(s) != new[s]
                and s not in _RESUMABLE_KEYS]
    changed += [key for key in _VALIDATION_KEYS if _get_dotted(saved, key) != _get_dotted(new, key)]
    if changed:
        raise ConfigError(f"run directory {str(run_dir)!r} holds a run with a different config "
                          f"({', '.join(changed)} differ); use another --run-dir to start a new run")


def _get_dotted(values: dict, key: str):
    section, name = key.split(".")
    return values.get(section, {}).get(name)


def _nested_diff(old, new) -> str:
    """For two differing sections of a section (generator.generative): `.key` of the first that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in new if old.get(k) != new[k]]
        return f".{keys[0]}" if keys else ""
    return ""


def check_data(cfg: Config) -> None:
    """Load what a run will read (validation split, training split or shards) so bad data fails early.

    Used by drivers before they start workers; the cluster generator's k-means is
    not run here (only the pool's size is checked).
    """
    n_way, k_shot, n_query = eval_shape(cfg)
    build_sampler(cfg, "val", n_way=n_way, k_shot=k_shot, n_query=n_query, seed=cfg.eval.seed,
                  disjoint_groups=cfg.eval.disjoint_groups)
    g, ep = cfg.generator, cfg.episodes
    if g.shards:
        from metassl.generate.shards import read_manifest
        read_manifest(g.shards)
    elif g.kind == "labelled":
        build_sampler(cfg, "train", n_way=ep.n_way, k_shot=ep.k_shot, n_query=ep.n_query, seed=cfg.seed)
    else:
        from metassl.registry import load_generative_for, load_unlabelled
        if needs_generative(cfg) and cfg.generator.generative.checkpoint is not None:
            load_generative_for(cfg)  # a missing, foreign or ill-fitting generative model fails here
        images = load_unlabelled(cfg)
        if g.kind == "smlmt":  # its word list is cheap to build; too few words fail here, not on a worker
            from metassl.registry import build_generator
            build_generator(cfg, images)
        if len(images) < ep.n_way:
            raise DataError(f"episodes.n_way={ep.n_way} but the unlabelled pool has only {len(images)} images")


def make_optimizer(cfg: Config, named: dict):
    """Return the outer optimiser over the named parameters and its learning-rate scheduler.

    Meta-SGD step sizes (`inner_lr.*`) get no weight decay: decay would only shrink the
    inner-loop learning rates. They form a second group only when decay is on, so runs
    without it keep one group and their saved optimiser states still load.
    """
    o = cfg.optim
    step_sizes = [p for k, p in named.items() if k.startswith(INNER_LR)]
    if step_sizes and o.weight_decay:
        groups = [{"params": [p for k, p in named.items() if not k.startswith(INNER_LR)]},
                  {"params": step_sizes, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(named.values())}]
    if o.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=o.outer_lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=o.outer_lr, weight_decay=o.weight_decay)
    if o.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _extra_params(learner, weights: dict) -> dict:
    """Outer-loop parameters a learner adds to the model's (Meta-SGD step sizes), detached."""
    extra = getattr(learner, "extra_params", None)
    return {k: v.detach().clone() for k, v in extra(weights).items()} if extra else {}


def local_device(setting: str) -> torch.device:
    """The device `train.device` names in this process: auto is the first GPU when there is one."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
    return torch.device("cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu")


def has_bf16_units(device: torch.device) -> bool:
    """True where bf16 matrix products run on their own units: a CPU with AMX, a CUDA GPU with bf16."""
    if device.type == "cuda":  # Ampere and later; older GPUs only emulate bf16
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def training_precision(cfg: Config, device: torch.device) -> str:
    """`train.precision` resolved for this device: "fp32" or "bf16" (autocast of the training step).

    auto picks bf16 only where it was measured to speed the step up: image runs of the metric
    learners (no inner loop) on hardware with bf16 units (its accuracy cost: experiments/RESULTS.md).
    """
    chosen = cfg.train.precision
    if chosen != "auto":
        return chosen
    metric_images = not (has_inner_loop(cfg) or is_text_config(cfg) or is_audio_config(cfg) or is_regression(cfg))
    return "bf16" if metric_images and has_bf16_units(device) else "fp32"


class LocalContext:
    """The in-process backend: one worker, checkpoints read from the run directory."""

    rank, world = 0, 1

    actor_cpus = 1.0  # what each generator actor asks Ray for (with generator.actors > 0)
    worker_cpus = 1.0  # what this process counts as its own CPUs beside them

    def __init__(self, generator_actors: int = 0, device: torch.device | str = "cpu"):
        # generator.actors -1 (auto) generates in this process
        self.generator_actors = generator_actors
        self.device = torch.device(device)

    def resume_state(self, run_dir: Path) -> tuple[dict, str] | None:
        path = checkpoint.latest(run_dir)
        return (checkpoint.load(path), path.name) if path is not None else None

    def report(self, metrics: dict, checkpoint_path: Path | None) -> None:
        pass


class NonFiniteError(MetasslError):
    """A step's loss or meta-gradient was NaN or infinite and `train.on_nonfinite` stops the run."""


class NonFiniteGuard:
    """What a step whose loss or meta-gradient is NaN/inf does: stop the run, or skip the step.

    Every worker computes a local flag; it travels as one more element of the gradient
    all-reduce, so all workers agree without a collective of their own. `skip` leaves the
    weights, optimiser and running statistics as they were before the step and counts it;
    more than `max_in_a_row` skipped steps in a row stop the run.
    """

    def __init__(self, policy: str, max_in_a_row: int, skipped: int = 0):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.skipped, self.in_a_row = skipped, 0

    @staticmethod
    def norm(grads: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of a list of gradients (not finite when any element is not)."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    @classmethod
    def flag(cls, loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """`[1.0]` when the loss or any gradient element is not finite, else `[0.0]`."""
        return (~(torch.isfinite(loss.detach().float()) & torch.isfinite(cls.norm(grads)))).float().reshape(1)

    def on_bad_step(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> str | None:
        """Count a bad step; return the message to stop with, or None to skip it."""
        self.skipped += 1
        self.in_a_row += 1
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                 else "no checkpoint was saved before it")
        what = f"step {step}: the loss ({loss:.4g}) or the meta-gradient (norm {grad_norm:.4g}) is not finite"
        if self.policy == "stop":
            return (f"{what}; training stopped (train.on_nonfinite=stop); {where}. Lower learner.inner_lr or "
                    "optim.outer_lr, set optim.grad_clip, or skip such steps with train.on_nonfinite=skip")
        if self.in_a_row > self.max_in_a_row:
            return (f"{what}, the {self.in_a_row}th such step in a row (train.max_skipped_steps="
                    f"{self.max_in_a_row}); training stopped; {where}")
        return None

    def on_good_step(self) -> None:
        self.in_a_row = 0


def _refit(refit, steps: int, step: int, writer, log) -> None:
    """Continue the generative fit `steps` steps at the refresh point after outer step `step`; rank 0 logs it."""
    from metassl.generative.fit import GRID, image_grid, samples

    t0 = time.perf_counter()
    losses = refit.advance(steps)
    if writer is None:
        return
    for k, v in losses.items():
        writer.add_scalar(f"gen/refit_{k}", v, step)
    writer.add_image("gen/refit_samples", image_grid(samples(refit.weights(), GRID * GRID), GRID), step)
    log(f"step {step}: generative model refitted to fit step {refit.step} in {time.perf_counter() - t0:.1f} s ("
        + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()) + ")")


class Progress:
    """Console progress lines: step, loss, accuracy, validation, episodes/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, log=print):
        self.total, self.log = total_steps, log
        self.t0, self.s0 = time.perf_counter(), start_step

    def line(self, step: int, metrics: dict, episodes_per_s: float, val: float | None) -> None:
        rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4f}" for k, v in metrics.items()]
        if val is not None:
            parts.append(f"val {val:.4f}")
        parts += [f"{episodes_per_s:.1f} episodes/s", f"ETA {eta / 60:.1f} min"]
        self.log(" | ".join(parts))


def run_local(cfg: Config, run_dir: str | Path, log=print) -> dict:
    """Meta-train in this process, evaluate the best checkpoint on meta-test, return `result.json`'s dict."""
    from metassl.generative.fit import fit_stage, generative_location, run_fit_local
    from metassl.registry import tokenizer_location, tokenizer_stage

    if needs_generative(cfg) and cfg.generator.generative.checkpoint is None:  # a different run fails before the fit
        store = RunStore(run_dir)
        store.pull()
        check_resumable(generative_location(cfg, str(run_dir)), store.local)
    if is_text_config(cfg):  # a text run learns its vocabulary first (RUN/tokenizer.json), once
        store = RunStore(run_dir)
        store.pull()
        check_resumable(tokenizer_location(cfg, str(run_dir)), store.local)
        cfg = tokenizer_stage(cfg, str(run_dir))
    # generative episodes without a fitted model: fit one first, in this process (RUN/generative)
    cfg = fit_stage(cfg, str(run_dir), lambda c, location: run_fit_local(c, location, log))
    ctx = LocalContext(max(cfg.generator.actors, 0), local_device(cfg.train.device))
    return raise_if_stopped(train_loop(cfg, run_dir, ctx, log))


def raise_if_stopped(result: dict) -> dict:
    """`result`, or NonFiniteError when the run stopped on a non-finite step (its result.json says so)."""
    if result.get("error"):
        raise NonFiniteError(result["error"])
    return result


def train_loop(cfg: Config, run_dir: str | Path, ctx, log=print, final_eval: bool = True) -> dict | None:
    """The training loop of one worker (`ctx.rank` of `ctx.world`); rank 0 returns the result dict.

    `run_dir` may be a storage URI: rank 0 then works in a local mirror, filled from the
    URI first and uploaded after every checkpoint and at the end (metassl.storage).

    `final_eval=False` (tuning) ends without the meta-test evaluation: `result.json` then
    holds the best checkpoint's step and the validation history only.
    """
    from torch.utils.tensorboard import SummaryWriter

    lead = ctx.rank == 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    learner = build_learner(cfg)
    model = build_backbone(cfg, learner)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params.update(_extra_params(learner, params))  # Meta-SGD step sizes are outer-loop parameters too
    device = ctx.device  # the module stays on the CPU: only these dicts go to the device
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.detach().clone().to(device) for k, v in model.named_buffers()}
    use_ssl = cfg.objective.ssl_weight > 0
    text = text_settings(cfg)
    # a text run's vocabulary travels in its checkpoints: they evaluate anywhere with the ids they learned
    vocabulary = read_tokenizer_text(cfg.data.tokenizer) if text and cfg.data.tokenizer else None
    o = cfg.objective
    uses_psco = use_ssl and o.psco > 0
    heads = SSLHeads(getattr(model, "embedding_dim", 1), o.proj_dim, text and text["vocab_size"],
                     getattr(model, "token_dim", None), (o.psco_hidden, o.psco_dim) if uses_psco else None,
                     (o.cpc_steps, model.embedding_dim, model.frame_dim) if is_audio_config(cfg) else None)
    head_params = ({k: v.detach().clone().to(device).requires_grad_() for k, v in heads.named_parameters()}
                   if use_ssl else {})
    ssl_weights = SSLWeights(o.simclr, o.rotation, o.temperature, o.mlm, o.psco, o.cpc)
    # PsCo's momentum network (EMA of the backbone and projector) and queue: state beside the weights
    psco = (PscoState(params, buffers, psco_projector(head_params), size=o.psco_queue, dim=o.psco_dim,
                      momentum=o.psco_momentum, seed=cfg.seed, shots=o.psco_shots, temperature=o.psco_temperature,
                      temperature2=o.psco_temperature2) if uses_psco else None)
    named = {**params, **head_params}  # every outer-loop parameter, by name
    all_params = list(named.values())
    opt, sched = make_optimizer(cfg, named)
    store = RunStore(run_dir)
    if lead:
        store.pull()  # a run kept in object storage resumes on any machine
    run_dir = store.local
    check_resumable(cfg, run_dir)

    start, best, history, losses, resumes, skipped = 0, None, [], [], [], 0
    resumed = ctx.resume_state(run_dir)
    if resumed is not None:
        state, name = resumed
        check_resumable(cfg, run_dir, saved=state["config"])
        with torch.no_grad():
            for k, v in {**state["params"], **state.get("head_params", {})}.items():
                named[k].copy_(v)
        buffers.update({k: v.to(device) for k, v in state["buffers"].items()})
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            sched.T_max = cfg.train.steps  # train.steps may have changed since the checkpoint
        torch.set_rng_state(state["torch_rng"])
        start, best = state["step"], state.get("best_val")
        history, losses = list(state.get("val_history", [])), list(state.get("loss_history", []))
        resumes = list(state.get("resumed_at", [])) + [start]
        skipped = int(state.get("skipped_steps", 0))
        if psco is not None:
            if not state.get("psco"):
                raise CheckpointError(f"{name} holds no PsCo state (momentum network, queue) for objective.psco")
            psco.load_state_dict(state["psco"])
        if lead:
            log(f"resuming {run_dir} from {name} (step {start})")

    # Both splits load before the run directory is written, so bad data fails without
    # leaving anything behind. Validation uses the evaluation episode shape.
    # Only rank 0 validates, so only rank 0 reads the validation split.
    n_way, k_shot, n_query = eval_shape(cfg)
    val_tasks = (build_sampler(cfg, "val", n_way=n_way, k_shot=k_shot, n_query=n_query, seed=cfg.eval.seed,
                               disjoint_groups=cfg.eval.disjoint_groups) if lead else None)
    # With `generator.encoder: model` the cluster generator embeds with the network being
    # meta-trained: version 1 is the initial network, a refresh after step s publishes s + 1.
    # With `warmup_steps` W the first publish is after step W (augment episodes until then).
    gen = cfg.generator
    refresh = uses_model_encoder(cfg)
    # generator.encoder_momentum: refreshes publish an EMA of the network, kept beside it
    momentum = MomentumEncoder(params, buffers, gen.encoder_momentum) if refresh and gen.encoder_momentum else None
    if momentum is not None and resumed is not None:
        momentum.load_state_dict(resumed[0].get("encoder_momentum"), resumed[1])
    encoder = None
    if refresh:
        saved = resumed[0].get("encoder") if resumed is not None else None
        if saved:
            encoder = (saved["weights"], saved["version"])
        elif not gen.warmup_steps:
            encoder = (cpu_weights({**params, **buffers}), 1)
    train_tasks = TrainingSource(cfg, start_step=start, rank=ctx.rank, world=ctx.world, encoder=encoder,
                                 actors=ctx.generator_actors, actor_cpus=ctx.actor_cpus, worker_cpus=ctx.worker_cpus)
    # generator.generative.refit_steps: the generative model's fit goes on at each refresh point
    # (on every worker alike), and the refitted decoder is published beside the encoder
    refit = None
    if refresh and gen.generative.refit_steps:
        from metassl.generative.fit import Refit
        from metassl.registry import load_generative_for, load_unlabelled

        refit = Refit(load_generative_for(cfg), load_unlabelled(cfg), ctx.rank, ctx.world, device)
        if resumed is not None and resumed[0].get("generative_refit"):
            refit.load_state_dict(resumed[0]["generative_refit"])
    writer = None
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(cfg, run_dir / "config.yaml")
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        if start == 0:
            _write_hparams(writer, cfg)
    progress = Progress(cfg.train.steps, start, log)
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, skipped)
    higher_is_better = not is_regression(cfg)
    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else math.inf
    precision = training_precision(cfg, device)
    if cfg.train.precision == "auto" and distributed.any_true(precision == "fp32"):
        precision = "fp32"  # workers on mixed hardware: one precision for all, the one every worker has
    if lead and precision == "bf16":  # fp32, the default, goes unsaid (result.json records either)
        log("training step precision: bf16 (autocast)")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # Validation ranks checkpoints on the eval.features view without test-time shifts, which
    # multiply the backbone passes ((2R+1)^2 per image) of every validation; the final
    # evaluation and `metassl eval` use them.
    val_cfg = with_values(cfg, {"eval.shifts": 0}) if cfg.eval.shifts else cfg
    val_learner = build_learner(val_cfg) if cfg.eval.shifts else learner

    def validate(step: int) -> float:
        res = evaluate_model(val_cfg, val_learner, model, params, buffers, split="val",
                             episodes=cfg.train.val_episodes, seed=cfg.eval.seed, baseline=False, sampler=val_tasks)
        writer.add_scalar("val/acc" if higher_is_better else "val/mse", res.mean, step)
        writer.add_scalar("val/ci95", res.ci95, step)
        scale, unit = (100, "%") if higher_is_better else (1, "")
        log(f"step {step}: meta-val {'accuracy' if higher_is_better else 'MSE'} {scale * res.mean:.2f} +- "
            f"{scale * res.ci95:.2f}{unit} ({res.episodes} {cfg.data.dataset} val episodes)")
        return res.mean

    def save(step: int, val: float | None) -> Path:
        nonlocal best
        is_best = val is not None and math.isfinite(val) and (
            best is None or (val > best if higher_is_better else val < best))
        if is_best:
            best = val
        path = checkpoint.step_path(run_dir, step)
        checkpoint.save(path, {
            "step": step, "config": to_dict(cfg),
            "params": params, "buffers": buffers, "head_params": head_params,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "best_val": best, "val_history": history,
            "loss_history": losses, "resumed_at": resumes, "skipped_steps": guard.skipped,
            "encoder": {"weights": encoder[0], "version": encoder[1]} if encoder else None,
            "generative_refit": refit.state_dict() if refit is not None else None,
            "psco": psco.state_dict() if psco is not None else None,
            "encoder_momentum": momentum.state_dict() if momentum is not None else None,
            **({"tokenizer": vocabulary} if vocabulary is not None else {}),
        })
        if is_best or (val is None and not checkpoint.best_path(run_dir).exists()):
            checkpoint.mark_best(run_dir, path)  # a NaN validation never becomes best
        checkpoint.prune(run_dir, cfg.train.keep_checkpoints)
        writer.flush()
        store.push()
        return path

    step, window_t, window_steps, window_wait, val = start, time.perf_counter(), 0, 0.0, None
    stopped = None  # the message of a stop on a non-finite step
    while step < cfg.train.steps:
        fetched = train_tasks.batch(step)
        window_wait += fetched.wait_s
        # running statistics before the step: a skipped step puts them back
        before = {k: v.clone() for k, v in buffers.items()} if guard.policy == "skip" else {}
        with autocast():
            out = learner.meta_step(model, params, buffers, fetched.episodes.to(device))
        metrics = dict(out.metrics)
        views = fetched.ssl_views() if use_ssl else None
        ssl = None
        if views is not None:
            views = tuple(v.to(device) for v in views)
            with autocast():
                ssl, parts = ssl_loss(model, params, buffers, heads, head_params, views, ssl_weights,
                                      gather=distributed.gather_rows,  # NT-Xent negatives: the whole meta-batch
                                      psco=psco, reduce=distributed.sum_all)
            metrics.update(parts, ssl_loss=float(ssl.detach()))
        metrics["meta_loss"] = float(out.loss.detach())
        grads, head_grads = combined_gradients(out, ssl, cfg.objective.ssl_weight, params, head_params,
                                               cfg.objective.meta_weight)
        meta = cfg.objective.meta_weight * out.loss
        total = meta + cfg.objective.ssl_weight * ssl if ssl is not None else meta
        flag = guard.flag(total, grads + head_grads)
        *grads, flag = distributed.average_gradients(grads + head_grads + [flag.to(grads[0])])
        grad_norm = NonFiniteGuard.norm(grads)  # of the averaged meta-gradient (backbone and heads)
        if float(flag) > 0:  # on every worker alike: the flag was all-reduced with the gradients
            latest = checkpoint.latest(run_dir) if lead else None
            stopped = guard.on_bad_step(step + 1, metrics["meta_loss"], float(grad_norm),
                                        str(latest) if latest else None)
            if stopped:
                if lead:
                    log(f"error: {stopped}")
                break
            for k, v in before.items():
                buffers[k].copy_(v)
            if psco is not None:
                psco.pending = None  # a skipped step queues nothing
        else:
            guard.on_good_step()
            for p, g in zip(all_params, grads):
                p.grad = g
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(all_params, cfg.optim.grad_clip)
            opt.step()
            sched.step()
            distributed.average_buffers_(buffers)  # running statistics stay the same on every worker
            if psco is not None:
                psco.after_step(params, buffers, psco_projector(head_params))
            if momentum is not None:
                momentum.update(params, buffers)
        metrics["grad_norm"] = float(grad_norm)
        step += 1
        window_steps += 1
        # the refresh schedule is a function of the step (generate.source.encoder_version), so
        # which encoder makes an episode never depends on actors, chunks or restarts
        out_of_time = distributed.any_true(time.perf_counter() > deadline)
        last = step == cfg.train.steps or out_of_time
        version = encoder_version(cfg, step)
        if refresh and version != encoder_version(cfg, step - 1):  # a refresh point: batch(step) needs it
            weights = cpu_weights(momentum.weights() if momentum is not None else {**params, **buffers})
            if refit is not None:
                _refit(refit, gen.generative.refit_steps, step, writer, log)
                weights = with_generative(weights, refit.weights())
            encoder = (weights, version)
            # After the last step no batch needs it: the checkpoint keeps it for a resumed run,
            # and the generators are spared a re-clustering beside the final evaluation.
            if not last:
                train_tasks.refresh_encoder(*encoder)
        log_now = step % cfg.train.log_every == 0 or last
        val_now = last or (cfg.train.val_every and step % cfg.train.val_every == 0)
        ckpt_now = val_now or step % cfg.train.checkpoint_every == 0
        report, saved = {}, None
        if log_now:
            window_s = max(time.perf_counter() - window_t, 1e-9)
            metrics = distributed.average_metrics(metrics)
            eps = window_steps * cfg.episodes.meta_batch / window_s
            report = {**metrics, "step": step, "episodes_per_s": eps, "wait_frac": window_wait / window_s}
            if lead:
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step)
                losses.append([step, metrics["meta_loss"]])
                writer.add_scalar("perf/episodes_per_s", eps, step)
                writer.add_scalar("perf/wait_frac", window_wait / window_s, step)
                if fetched.records:
                    writer.add_scalar("gen/encoder_version", max(fetched.encoder_versions()), step)
                writer.add_scalar("lr", opt.param_groups[0]["lr"], step)
                writer.add_scalar("train/skipped_steps", guard.skipped, step)
                progress.line(step, {k: metrics[k] for k in ("meta_loss", "query_acc", "ssl_loss") if k in metrics},
                              eps, val)
            window_t, window_steps, window_wait = time.perf_counter(), 0, 0.0
        if lead and val_now:
            val = validate(step)
            history.append([step, val])
        if lead and ckpt_now:
            saved = save(step, val if val_now else None)
        if log_now or ckpt_now:
            # "val" only when this step validated: a tuning scheduler compares fresh scores
            # "final" tells the driver that meta-test evaluation comes next
            ctx.report({**report, "step": step, **({"val": val} if val_now else {}),
                        **({"final": True} if last else {})}, saved)
        if out_of_time:
            if lead:
                log(f"stopping at step {step}: train.max_minutes={cfg.train.max_minutes} reached")
            break
    train_tasks.close()
    loop_minutes = (time.perf_counter() - progress.t0) / 60  # meta-training with its validations, no final test
    if not lead:
        return None
    writer.flush()
    if not stopped and not checkpoint.best_path(run_dir).exists():
        stopped = (f"no validation of this run gave a finite score ({history[-3:]} ...), so there is no "
                   f"best checkpoint to evaluate; see {run_dir / 'checkpoints'}")
    if stopped:  # nothing is evaluated or saved from a run that went non-finite
        result = {"name": cfg.name, "error": stopped, "steps": step, "skipped_steps": guard.skipped,
                  "best_val": best, "val_history": history, "loss_history": losses, "resumed_at": resumes}
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
        writer.close()
        _write_report(run_dir, log)
        store.push()
        return result
    eval_t0 = time.perf_counter()
    if final_eval:
        result = final_evaluation(cfg, run_dir, learner, model, log)
    else:
        result = {"name": cfg.name, "best_step": checkpoint.load(checkpoint.best_path(run_dir))["step"]}
    result.update({"steps": step, "best_val": best, "val_history": history, "loss_history": losses,
                   "resumed_at": resumes, "skipped_steps": guard.skipped, "precision": precision,
                   "train_minutes": loop_minutes, "eval_minutes": (time.perf_counter() - eval_t0) / 60})
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    if final_eval:
        writer.add_scalar("test/" + result["test"]["metric"], result["test"]["mean"], step)
    writer.close()
    if final_eval:  # a tuning trial's report would only slow the sweep: `metassl report` draws it on demand
        _write_report(run_dir, log)
    store.push()
    return result


def _write_report(run_dir: Path, log) -> None:
    """Write report.md, curves.png and episodes.png into the run directory (never fails the run)."""
    from metassl.report import write_report

    try:
        files = write_report(run_dir)
    except Exception as e:  # the run itself is done and saved: a drawing problem is only reported
        log(f"no report for {run_dir} ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
        return
    log(f"report: {files['report']}  ({', '.join(p.name for k, p in files.items() if k != 'report')})")


def _write_hparams(writer, cfg: Config) -> None:
    """Record the run's hyperparameters in TensorBoard's HParams plugin (same event file as the scalars)."""
    from torch.utils.tensorboard.summary import hparams

    flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() if isinstance(sec, dict)
            for k, v in sec.items() if isinstance(v, (int, float, str, bool))}
    metric = "val/acc" if not is_regression(cfg) else "val/mse"
    for summary in hparams(flat, {metric: float("nan")}):
        writer.file_writer.add_summary(summary)


def final_evaluation(cfg: Config, run_dir: Path, learner, model, log=print) -> dict:
    """Evaluate `best.pt` on the meta-test split with the config's eval protocol.

    With `eval.compare_untrained` the network as initialised (`model`'s own weights: the
    module is never trained) is evaluated first on the same episodes, under "untrained".
    """
    from metassl.evaluation import format_results

    state = checkpoint.load(checkpoint.best_path(run_dir))
    n_way, k_shot, n_query = eval_shape(cfg)
    sampler = (build_sampler(cfg, cfg.eval.split, n_way=n_way, k_shot=k_shot, n_query=n_query,
                             seed=cfg.eval.seed, disjoint_groups=cfg.eval.disjoint_groups)
               if not is_regression(cfg) else None)

    def evaluate(params, buffers) -> EvalResult:
        return evaluate_model(cfg, learner, model, params, buffers, split=cfg.eval.split,
                              episodes=cfg.eval.episodes, seed=cfg.eval.seed,
                              inner_steps=cfg.eval.inner_steps, sampler=sampler)

    result = {"name": cfg.name, "best_step": state["step"]}
    if cfg.eval.compare_untrained:
        log(f"evaluating the untrained network on {cfg.eval.episodes} {cfg.eval.split} episodes")
        params = {k: v.detach() for k, v in model.named_parameters()}
        params.update(_extra_params(learner, params))
        result["untrained"] = evaluate(params, {k: v.detach() for k, v in model.named_buffers()}).to_dict()
    log(f"evaluating the trained network (step {state['step']}) on {cfg.eval.episodes} "
             f"{cfg.eval.split} episodes")
    result["test"] = evaluate(state["params"], state["buffers"]).to_dict()
    result.update(group_evaluations(cfg, learner, model, state, sampler, n_way, k_shot, n_query, log))
    for line in format_results(result):
        log(line)
    return result


def group_evaluations(cfg: Config, learner, model, state: dict, sampler, n_way: int, k_shot: int,
                      n_query: int, log=print) -> dict:
    """The other evaluations of a split whose items have groups (the speakers of spoken keywords).

    `other_protocol`: the same episodes' shape with support and queries from any groups when the
    config's protocol takes them from disjoint groups, and the reverse. `speaker_id`
    (arabic_speech_commands with keywords as classes): few-shot speaker identification of the
    same checkpoint on the authors' test speakers, whose clips are of meta-test keywords, in the
    config's protocol (disjoint: support and queries from different keywords); its way is at most
    the 6 test speakers. Neither selects anything: they are recorded beside `test`. One whose
    episodes the split cannot fill (e.g. more queries than a half of the keywords holds) is
    recorded as `{"skipped": reason}` rather than ending the run after its training.
    """
    data = getattr(sampler, "split", None)
    if data is None or getattr(data, "groups", None) is None:
        return {}

    def evaluate(run_cfg: Config, what: str, **shape) -> dict:
        log(f"evaluating the same checkpoint {what}")
        try:
            return evaluate_model(run_cfg, learner, model, state["params"], state["buffers"], split=cfg.eval.split,
                                  episodes=cfg.eval.episodes, seed=cfg.eval.seed, k_shot=k_shot, n_query=n_query,
                                  inner_steps=cfg.eval.inner_steps, **shape).to_dict()
        except DataError as e:
            log(f"  skipped: {e}")
            return {"skipped": str(e)}

    other = not cfg.eval.disjoint_groups
    out = {"other_protocol": evaluate(cfg, f"with support and queries from {'disjoint' if other else 'any'} "
                                           f"{data.group_kind}", n_way=n_way, disjoint_groups=other)}
    if cfg.data.dataset == "arabic_speech_commands" and cfg.data.class_split == "primary":
        speakers = with_values(cfg, {"data.class_split": "speakers"})
        way = min(n_way, build_sampler(speakers, cfg.eval.split, n_way=2, k_shot=1, n_query=1,
                                       seed=cfg.eval.seed).split.num_classes)
        out["speaker_id"] = evaluate(speakers, f"on few-shot speaker identification ({way}-way {k_shot}-shot, "
                                               f"{cfg.eval.split} speakers)", n_way=way)
    return out


def _run_tokenizer(cfg: Config, state: dict, checkpoint_path: Path) -> Config:
    """A text run's config with `data.tokenizer` naming the vocabulary its checkpoint learned with.

    Checkpoints of text runs carry that vocabulary: it is written once into the cache, named
    by its SHA-256, and used from there, so a run directory that was moved, or whose
    tokenizer.json was replaced, still evaluates with the ids the weights were trained on.
    (Checkpoints without one fall back to the tokenizer.json beside them.)
    """
    import dataclasses
    import hashlib

    from metassl.registry import TOKENIZER_FILE
    from metassl.storage import cache_root

    if not is_text_config(cfg):
        return cfg
    text = state.get("tokenizer")
    if isinstance(text, str):
        path = cache_root() / "tokenizers" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.part")
            partial.write_text(text, encoding="utf-8")
            partial.replace(path)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(path)))
    for folder in (checkpoint_path.parent, checkpoint_path.parent.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(folder / TOKENIZER_FILE)))
    raise CheckpointError(f"checkpoint {str(checkpoint_path)!r} is of a text run but holds no vocabulary, and no "
                          f"{TOKENIZER_FILE} lies beside it; copy the run's {TOKENIZER_FILE} into the run directory")


def load_trained(path: str | Path):
    """Return `(cfg, learner, model, params, buffers, state)` from a run directory or checkpoint.

    A run directory in object storage (a URI) is fetched into its local mirror first.
    """
    if is_uri(path):
        store = RunStore(path)
        store.pull()
        path = store.local
    resolved = checkpoint.resolve(path)
    state = checkpoint.load(resolved)
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an invalid config: {e}") from None
    cfg = _run_tokenizer(cfg, state, Path(resolved))
    learner = build_learner(cfg)
    model = build_backbone(cfg, learner)
    expected = dict(model.named_parameters())
    expected.update(_extra_params(learner, expected))
    if set(state["params"]) != set(expected) or any(
            state["params"][k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(f"checkpoint {str(path)!r}: parameters do not match the model its config builds")
    return cfg, learner, model, state["params"], state["buffers"], state

"""Held-out evaluation: N-way K-shot accuracy (or regression MSE), mean +- 95% CI over fixed-seed episodes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metassl.config import Config
from metassl.errors import ConfigError, DataError
from metassl.meta.functional import Params, adapt, detached, forward, split_inner_lr
from metassl.models import norm_mode


@dataclass
class EvalResult:
    """One evaluation, as printed by `metassl eval` and stored in `result.json`."""

    metric: str  # "accuracy" (fraction) or "mse"
    mean: float
    ci95: float  # 1.96 * std / sqrt(episodes)
    episodes: int
    protocol: dict = field(default_factory=dict)  # dataset, split, n_way, k_shot, n_query, seed, ...
    extra: dict = field(default_factory=dict)  # e.g. MSE at other step counts, baseline

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        p = self.protocol
        if self.metric == "accuracy":
            head = (f"{p.get('dataset')} {p.get('split')} {p.get('n_way')}-way {p.get('k_shot')}-shot: "
                    f"accuracy {100 * self.mean:.2f} +- {100 * self.ci95:.2f}%")
        else:
            head = f"{p.get('dataset')} {p.get('split')} {p.get('k_shot')}-shot: MSE {self.mean:.4f} +- {self.ci95:.4f}"
        disjoint = f", support and queries from disjoint {p['disjoint_groups']}" if p.get("disjoint_groups") else ""
        features = f", {p['features']} embeddings" if p.get("features", "raw") != "raw" else ""
        if p.get("shifts"):
            features += f", averaged over {(2 * p['shifts'] + 1) ** 2} shifts of up to {p['shifts']} px"
        lines = [f"{head} ({self.episodes} episodes, seed {p.get('seed')}, norm {p.get('norm_mode')}{features}{disjoint})"]
        for k, v in self.extra.items():
            lines.append(f"  {k}: {v:.4f} " if isinstance(v, float) else f"  {k}: {v}")
        return "\n".join(lines)


def format_results(result: dict) -> list[str]:
    """Console lines for a run's `result.json` dict: the test result, beside the untrained one if any."""
    test = EvalResult(**result["test"])
    extra = []  # the other evaluations of a grouped split (trainer.group_evaluations)
    for key, label in (("other_protocol", "other protocol"), ("speaker_id", "speaker identification")):
        entry = result.get(key)
        if entry is None:
            continue
        if "skipped" in entry:
            extra.append(f"{label}: skipped ({entry['skipped']})")
        else:
            other = EvalResult(**entry)
            extra.append(f"{label} ({other.protocol.get('classes')}): {other.summary()}")
    if "untrained" not in result:
        return test.summary().splitlines() + extra
    base = EvalResult(**result["untrained"])
    p = test.protocol
    scale, unit = (100.0, "%") if test.metric == "accuracy" else (1.0, "")
    shape = f"{p.get('n_way')}-way {p.get('k_shot')}-shot" if test.metric == "accuracy" else f"{p.get('k_shot')}-shot"
    classes = f", {p['num_classes']} classes" if p.get("num_classes") else ""
    rows = [("untrained network", base), (f"trained (step {result.get('best_step')})", test)]
    lines = [f"{p.get('dataset')} {p.get('split')} {shape} {test.metric}, {test.episodes} episodes "
             f"(seed {p.get('seed')}{classes}):"]
    for label, res in rows:
        lines.append(f"  {label:<22} {scale * res.mean:7.2f} +- {scale * res.ci95:.2f}{unit}")
    gain = scale * (test.mean - base.mean)
    lines[-1] += f"   ({gain:+.2f}{' points' if unit else ''})"
    return lines + extra


def mean_ci95(values) -> tuple[float, float]:
    """Return `(mean, 1.96 * std / sqrt(n))` of a 1-d sequence (sample std)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def cosine_prototype_accuracies(features: np.ndarray, sampler, episodes: int) -> np.ndarray:
    """Query accuracy of episodes `0..episodes-1` of `sampler` (an EpisodeSampler over the rows of
    `features` [N, F]) when each query goes to the nearest class prototype (the mean of its support
    rows' features) by cosine similarity: the no-learning baseline of hand-made features."""
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n_way, k_shot, n_query = sampler.n_way, sampler.k_shot, sampler.n_query
    truth = np.repeat(np.arange(n_way), n_query)
    accs = np.empty(episodes)
    for i in range(episodes):
        _, support, query = sampler.episode_indices(i)
        protos = feats[support].reshape(n_way, k_shot, -1).mean(1)
        protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
        accs[i] = ((feats[query] @ protos.T).argmax(1) == truth).mean()
    return accs


def episode_accuracies(learner, model: nn.Module, params: Params, buffers: Params, sampler,
                       episodes: int, inner_steps: int | None = None) -> np.ndarray:
    """Return the query accuracy of each of episodes `0..episodes-1` of `sampler`."""
    was_training = model.training
    model.eval()
    try:
        accs = np.empty(episodes)
        device = next(iter(params.values())).device
        for i in range(episodes):
            ep = sampler.episode(i).to(device)
            out = learner.predict(model, params, buffers, ep, inner_steps)
            accs[i] = float((out.argmax(-1) == ep.query_y).float().mean())
        return accs
    finally:
        model.train(was_training)


def embeds_once(cfg: Config, learner, sampler) -> bool:
    """True when episodes can be scored from one embedding per item (`eval.embed_once`).

    That holds for metric learners (`from_embeddings`) whose backbone embeds each item on its
    own at test time, i.e. any norm but transductive BatchNorm, over an EpisodeSampler's rows.
    """
    from metassl.data.episodes import EpisodeSampler
    from metassl.models.backbones import is_transductive

    return (cfg.eval.embed_once and hasattr(learner, "from_embeddings") and type(sampler) is EpisodeSampler
            and not is_transductive(cfg.model.norm))


def embed_rows(learner, model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, rows: np.ndarray,
               chunk: int | None = None) -> torch.Tensor:
    """The test-time embeddings (`learner.test_embed`, eval mode, no grad) of `x[rows]`, in that order."""
    device = next(iter(params.values())).device
    if chunk is None:  # rows per backbone call: 512 small images, fewer large ones (or views of each)
        chunk = max(1, max(16, min(512, 2**22 // max(1, x[0].numel()))) // learner.test_views)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([learner.test_embed(model, params, buffers, x[torch.from_numpy(rows[i:i + chunk])]
                                                 .to(device)) for i in range(0, len(rows), chunk)])
    finally:
        model.train(was_training)


def rows_used(sampler, episodes: int) -> np.ndarray:
    """The sorted distinct rows of `sampler.split` that its first `episodes` episodes draw."""
    return _distinct_rows([sampler.episode_indices(i) for i in range(episodes)])


def _distinct_rows(picks) -> np.ndarray:
    return np.unique(np.concatenate([np.concatenate([s, q]) for _, s, q in picks]))


def embedded_accuracies(learner, model: nn.Module, params: Params, buffers: Params, sampler,
                        episodes: int, chunk: int | None = None,
                        embedded: tuple[np.ndarray, torch.Tensor] | None = None) -> np.ndarray:
    """`episode_accuracies` for a metric learner, embedding each row the episodes use once.

    The same episodes and the same scores as one backbone pass per episode (up to float
    rounding, which depends on the batch a row is embedded in). `embedded` = (sorted rows,
    their embeddings), covering every row these episodes use, skips the embedding: several
    episode shapes of one split then share one pass (`evaluate_shapes`).
    """
    picks = [sampler.episode_indices(i) for i in range(episodes)]
    if embedded is None:
        rows = _distinct_rows(picks)
        z = embed_rows(learner, model, params, buffers, sampler.split.x, rows, chunk)
    else:
        rows, z = embedded
    device = z.device
    support_y = torch.arange(sampler.n_way, device=device).repeat_interleave(sampler.k_shot)
    query_y = torch.arange(sampler.n_way, device=device).repeat_interleave(sampler.n_query)
    accs = np.empty(episodes)
    with torch.no_grad():
        for i, (_, support, query) in enumerate(picks):
            where_s, where_q = np.searchsorted(rows, support), np.searchsorted(rows, query)
            if embedded is not None and not (np.array_equal(rows[np.minimum(where_s, len(rows) - 1)], support)
                                             and np.array_equal(rows[np.minimum(where_q, len(rows) - 1)], query)):
                raise ValueError(f"episode {i} draws rows that `embedded` does not cover")
            s, q = z[torch.from_numpy(where_s)], z[torch.from_numpy(where_q)]
            out = learner.test_logits(s[None], support_y[None], q[None])[0]
            accs[i] = float((out.argmax(-1) == query_y).float().mean())
    return accs


def episode_mse(model: nn.Module, params: Params, buffers: Params, tasks, episodes: int,
                inner_lr: float, steps: int) -> np.ndarray:
    """Return each task's query MSE after `steps` SGD steps on its support set (sinusoid)."""
    errs = np.empty(episodes)
    params, lr = split_inner_lr(params, inner_lr, detach=True)  # Meta-SGD models carry their own step sizes
    device = next(iter(params.values())).device
    for i in range(episodes):
        ep = tasks.episode(i).to(device)
        with torch.enable_grad():
            adapted = adapt(model, detached(params), buffers, ep.support_x, ep.support_y,
                            inner_lr=lr, steps=steps, first_order=True)
        with torch.no_grad():
            errs[i] = float(F.mse_loss(forward(model, adapted, buffers, ep.query_x), ep.query_y))
    return errs


def pretrain_on_all_tasks(model: nn.Module, init: Params, buffers: Params, tasks, steps: int,
                          batch_tasks: int, lr: float = 1e-3) -> Params:
    """Return parameters fitted from `init` to the pooled points of many tasks at once.

    This is the baseline MAML is compared with on sinusoids: one network trained
    on all tasks together (it learns roughly the mean function), then fine-tuned
    on each test task's support set like the meta-learned one.
    """
    params = detached(init)
    opt = torch.optim.Adam(params.values(), lr=lr)
    for step in range(steps):
        ep = tasks.batch(step * batch_tasks, batch_tasks)
        x = torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1)
        y = torch.cat([ep.support_y, ep.query_y], 1).flatten(0, 1)
        loss = F.mse_loss(forward(model, params, buffers, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def protocol_of(cfg: Config, *, dataset: str, split: str, n_way: int, k_shot: int, n_query: int,
                seed: int, inner_steps: int | None) -> dict:
    """The fields that say how a number was measured."""
    from metassl.registry import has_inner_loop

    return {
        "dataset": dataset, "protocol": cfg.data.protocol if dataset.startswith("omniglot") else None,
        "split": split, "n_way": n_way, "k_shot": k_shot, "n_query": n_query, "seed": seed,
        "learner": cfg.learner.name, "inner_steps": inner_steps, "norm": cfg.model.norm,
        "norm_mode": norm_mode(cfg.model.norm, has_inner_loop(cfg)), "features": cfg.eval.features,
        "shifts": cfg.eval.shifts,
    }


def eval_shape(cfg: Config) -> tuple[int, int, int]:
    """`(n_way, k_shot, n_query)` of evaluation episodes: `cfg.eval`'s, else the training ones."""
    return (cfg.eval.n_way or cfg.episodes.n_way, cfg.eval.k_shot or cfg.episodes.k_shot,
            cfg.eval.n_query or cfg.episodes.n_query)


def evaluate_model(cfg: Config, learner, model: nn.Module, params: Params, buffers: Params, *,
                   split: str, episodes: int, seed: int, n_way: int | None = None,
                   k_shot: int | None = None, n_query: int | None = None, inner_steps: int | None = None,
                   dataset: str | None = None, root: str | None = None, baseline: bool = True,
                   sampler=None, disjoint_groups: bool | None = None,
                   embedded: tuple[np.ndarray, torch.Tensor] | None = None) -> EvalResult:
    """Evaluate a model on `episodes` fixed-seed episodes of `split` and return mean +- 95% CI.

    Classification: query accuracy. Sinusoid: query MSE after `inner_steps` (default
    10) and after 1 step, beside the pretrained-on-all-tasks baseline when `baseline`.
    Pass `sampler` to reuse an episode source built with the same settings. `disjoint_groups`
    (default `eval.disjoint_groups`) draws support and queries from disjoint groups (speakers).
    `embedded` (see `embedded_accuracies`) is used where episodes are scored from embeddings.
    """
    from metassl.registry import build_backbone, build_sampler, is_regression

    default_way, default_shot, default_query = eval_shape(cfg)
    n_way, k_shot, n_query = n_way or default_way, k_shot or default_shot, n_query or default_query
    dataset = dataset or cfg.data.dataset
    disjoint_groups = cfg.eval.disjoint_groups if disjoint_groups is None else disjoint_groups
    if sampler is None:
        sampler = build_sampler(cfg, split, n_way=n_way, k_shot=k_shot, n_query=n_query, seed=seed,
                                dataset=dataset, root=root, disjoint_groups=disjoint_groups)
    if not is_regression(cfg):
        head = getattr(model, "head", None)
        if head is not None and head.out_features != n_way and not getattr(learner, "zero_head", False):
            raise DataError(f"n_way={n_way}: this {cfg.learner.name} model has a {head.out_features}-way "
                            f"classifier head; evaluate it with n_way={head.out_features} or train one "
                            f"with episodes.n_way={n_way}")
        steps = inner_steps if inner_steps is not None else getattr(learner, "eval_inner_steps", None)
        if embeds_once(cfg, learner, sampler):
            accs = embedded_accuracies(learner, model, params, buffers, sampler, episodes, embedded=embedded)
        else:
            accs = episode_accuracies(learner, model, params, buffers, sampler, episodes, steps)
        mean, ci = mean_ci95(accs)
        protocol = protocol_of(cfg, dataset=dataset, split=split, n_way=n_way, k_shot=k_shot,
                               n_query=n_query, seed=seed, inner_steps=steps)
        data = getattr(sampler, "split", None)  # the FewShotSplit of an EpisodeSampler: which classes
        if data is not None:
            protocol.update(classes=data.name, num_classes=data.num_classes)
        if getattr(sampler, "disjoint_groups", False):  # support and queries from disjoint groups
            protocol.update(disjoint_groups=data.group_kind)  # what the groups are, e.g. "speakers"
        return EvalResult("accuracy", mean, ci, episodes, protocol)

    steps = inner_steps if inner_steps is not None else 10
    lr = cfg.learner.inner_lr
    extra = {}
    mean, ci = mean_ci95(episode_mse(model, params, buffers, sampler, episodes, lr, steps))
    extra["mse_1_step"], extra["mse_1_step_ci95"] = mean_ci95(
        episode_mse(model, params, buffers, sampler, episodes, lr, 1))
    if baseline and cfg.train.pretrain_baseline_steps > 0:
        base_model = build_backbone(cfg, learner)  # fresh init from cfg.seed
        base = pretrain_on_all_tasks(
            base_model, dict(base_model.named_parameters()), dict(base_model.named_buffers()),
            build_sampler(cfg, "train", n_way=n_way, k_shot=k_shot, n_query=n_query, seed=cfg.seed + 1),
            cfg.train.pretrain_baseline_steps, cfg.episodes.meta_batch, cfg.optim.outer_lr)
        for s in sorted({1, steps}):
            m, c = mean_ci95(episode_mse(base_model, base, {}, sampler, episodes, lr, s))
            extra[f"baseline_mse_{s}_step"], extra[f"baseline_mse_{s}_step_ci95"] = m, c
        extra["baseline_over_maml"] = extra[f"baseline_mse_{steps}_step"] / mean
    protocol = protocol_of(cfg, dataset=dataset, split=split, n_way=1, k_shot=k_shot, n_query=n_query,
                           seed=seed, inner_steps=steps)
    return EvalResult("mse", mean, ci, episodes, protocol, extra)


def evaluate_shapes(cfg: Config, learner, model: nn.Module, params: Params, buffers: Params, *,
                    shapes: list[tuple[int, int, int | None]], split: str, episodes: int, seed: int,
                    inner_steps: int | None = None, dataset: str | None = None, root: str | None = None,
                    disjoint_groups: bool | None = None) -> list[EvalResult]:
    """`evaluate_model` for several (n_way, k_shot, n_query) shapes of one split, in that order.

    Each result is the one `evaluate_model` gives for that shape alone (the same episodes),
    but the split is read once and, where episodes are scored from embeddings (`embeds_once`),
    every row any shape draws is embedded once: four shapes cost about one backbone pass over
    the split instead of four (which matters with test-time shift averaging). A None in a
    shape takes the run's default (`eval_shape`), as in `evaluate_model`.
    """
    from metassl.data.episodes import EpisodeSampler
    from metassl.registry import build_sampler

    if not shapes:
        raise ConfigError("shapes is empty: give at least one (n_way, k_shot, n_query)")
    default_way, default_shot, default_query = eval_shape(cfg)
    disjoint_groups = cfg.eval.disjoint_groups if disjoint_groups is None else disjoint_groups
    samplers, resolved = [], []
    for n_way, k_shot, n_query in shapes:
        n_way, k_shot, n_query = n_way or default_way, k_shot or default_shot, n_query or default_query
        resolved.append((n_way, k_shot, n_query))
        if samplers and type(samplers[0]) is EpisodeSampler:  # the split already read, another shape
            samplers.append(EpisodeSampler(samplers[0].split, n_way, k_shot, n_query, seed=seed,
                                           disjoint_groups=disjoint_groups))
        else:
            samplers.append(build_sampler(cfg, split, n_way=n_way, k_shot=k_shot, n_query=n_query, seed=seed,
                                          dataset=dataset, root=root, disjoint_groups=disjoint_groups))
    embedded = None
    if all(embeds_once(cfg, learner, s) for s in samplers):  # EpisodeSamplers, all over samplers[0].split
        rows = np.unique(np.concatenate([rows_used(s, episodes) for s in samplers]))
        embedded = rows, embed_rows(learner, model, params, buffers, samplers[0].split.x, rows)
    return [evaluate_model(cfg, learner, model, params, buffers, split=split, episodes=episodes, seed=seed,
                           n_way=n_way, k_shot=k_shot, n_query=n_query, inner_steps=inner_steps,
                           dataset=dataset, root=root, sampler=s, disjoint_groups=disjoint_groups,
                           embedded=embedded) for s, (n_way, k_shot, n_query) in zip(samplers, resolved)]

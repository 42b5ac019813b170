"""Names in a config -> the objects they stand for: learners, models, episode sources."""
from __future__ import annotations

import torch
from torch import nn

from metassl.config import Config
from metassl.data import EpisodeSampler, SinusoidTasks, load_split
from metassl.errors import ConfigError
from metassl.meta import MAML, MatchingNet, ProtoNet, Reptile
from metassl.models import build_model

# Sinusoid tasks have no classes to split, so each split draws from its own seed stream.
_SINUSOID_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def build_learner(cfg: Config):
    """Return the meta-learner named by `cfg.learner.name`."""
    lc = cfg.learner
    if lc.name in ("maml", "fomaml"):
        return MAML(lc.inner_lr, lc.inner_steps, first_order=lc.first_order or lc.name == "fomaml",
                    eval_inner_steps=lc.eval_inner_steps, vectorize=lc.vectorize)
    if lc.name == "reptile":
        return Reptile(lc.inner_lr, lc.inner_steps, eval_inner_steps=lc.eval_inner_steps)
    if lc.name == "protonet":
        return ProtoNet()
    if lc.name == "matchingnet":
        return MatchingNet(lc.matching_scale)
    raise ConfigError(f"learner.name={lc.name!r} is not one of ['maml', 'fomaml', 'reptile', 'protonet', 'matchingnet']")


def is_regression(cfg: Config) -> bool:
    """True for the sinusoid regression tasks."""
    return cfg.data.dataset == "sinusoid"


def build_backbone(cfg: Config, learner) -> nn.Module:
    """Return a freshly initialised model (seeded from `cfg.seed`) with a head if the learner needs one."""
    torch.manual_seed(cfg.seed)
    if is_regression(cfg):
        out = 1
    else:
        out = cfg.episodes.n_way if learner.needs_head else None
    m = cfg.model
    return build_model(m.backbone, out_features=out, in_channels=cfg.data.channels, hidden=m.hidden,
                       norm=m.norm, image_size=cfg.data.image_size, mlp_hidden=m.mlp_hidden)


def build_sampler(cfg: Config, split: str, *, n_way: int, k_shot: int, n_query: int, seed: int,
                  dataset: str | None = None, root: str | None = None):
    """Return an episode source with `.episode(i)` and `.batch(start, count)` for one split.

    `dataset`/`root` override the config's (for evaluating on another dataset).
    """
    dataset = dataset or cfg.data.dataset
    if dataset == "sinusoid":
        return SinusoidTasks(k_shot, n_query, seed=seed + _SINUSOID_SPLIT_OFFSET[split])
    data = load_split(dataset, split, root=root if root is not None else cfg.data.root,
                      protocol=cfg.data.protocol, image_size=cfg.data.image_size, channels=cfg.data.channels)
    return EpisodeSampler(data, n_way, k_shot, n_query, seed=seed)

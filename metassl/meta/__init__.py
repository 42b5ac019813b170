"""Meta-learners with one interface.

Every learner has `meta_step(model, params, buffers, batch) -> MetaOutput` for
training on a batch of episodes `[tasks, ...]`, `predict(model, params, buffers,
episode, inner_steps=None)` for evaluation on one episode, and `needs_head`
(whether the backbone ends in an `n_way` classifier).
"""
from metassl.meta.functional import MetaOutput, Params, adapt, detached, forward
from metassl.meta.maml import MAML
from metassl.meta.matchingnet import MatchingNet
from metassl.meta.protonet import ProtoNet
from metassl.meta.reptile import Reptile

__all__ = ["MAML", "MatchingNet", "MetaOutput", "Params", "ProtoNet", "Reptile",
           "adapt", "detached", "forward"]

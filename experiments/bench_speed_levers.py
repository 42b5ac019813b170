"""Speed levers measured one at a time, in one process: what the step costs with and without each.

    python experiments/bench_speed_levers.py pipeline [--threads 2] [--steps 14] [--variants eager,...]
    python experiments/bench_speed_levers.py maml [--threads 2] [--rounds 3] [--variants split,...]

`pipeline`: the model part of a step of experiments/omniglot_unsupervised.yaml (ProtoNet loss on
a 64-way 1-shot 3-query augment episode plus the SimCLR and rotation views, forward and
backward; episodes generated beforehand in this process, no Ray). `maml`: one second-order
MAML meta-iteration as in bench_maml_speed.py (Conv-4 with LayerNorm, 5-way 1-shot, 15
queries, meta-batch 32), metassl's learner only, with its gradient checked against the
reference path. Median milliseconds per step after a warm-up (the first call, which
includes torch.compile's compilation, is reported apart).

Variant names join levers with "+":
- `textbook`: Conv-4 blocks in the order conv, norm, ReLU, max-pool (the default pools first);
- `nchw`: convolutions in NCHW memory order, the default (without it this script runs them NHWC,
  `model.channels_last: true`);
- `compile`: the backbone's forward through `torch.compile` (static shapes);
- `bf16`: the step under bf16 autocast (CPU);
- maml only: `reference` (split_query=false; otherwise the default split query pass).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from torch import nn
from torch.func import functional_call


def conv4_order(model: nn.Module, textbook: bool) -> nn.Module:
    """Put the blocks of a Conv-4 in the textbook order (ReLU before pool) when asked."""
    f = list(model.features)
    if textbook and isinstance(f[2], nn.MaxPool2d):
        for b in range(4):
            f[4 * b + 2], f[4 * b + 3] = f[4 * b + 3], f[4 * b + 2]
        model.features = nn.Sequential(*f)
    return model


def compiled_forward(model: nn.Module):
    fn = torch.compile(lambda p, b, x: functional_call(model, (p, b), (x,)), dynamic=False)
    return lambda model_, params, buffers, x: fn(params, buffers, x)


def pipeline(args) -> None:
    import metassl.meta.metric as metric
    import metassl.objective as objective
    from metassl.config import load
    from metassl.generate.source import TrainingSource
    from metassl.objective import SSLHeads, SSLWeights, combined_gradients, ssl_loss
    from metassl.registry import build_backbone, build_learner

    cfg = load("experiments/omniglot_unsupervised.yaml", ["generator.actors=0"] + args.set)
    source = TrainingSource(cfg, actors=0)
    batches = [source.batch(s) for s in range(args.steps)]
    original = (metric.forward, objective.features)
    for variant in args.variants.split(","):
        levers = set(variant.split("+"))
        run_cfg = replace(cfg, model=replace(cfg.model, channels_last="nchw" not in levers))
        learner = build_learner(run_cfg)
        model = conv4_order(build_backbone(run_cfg, learner), "textbook" in levers)
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        heads = SSLHeads(model.embedding_dim, cfg.objective.proj_dim, None, None)
        head_params = {k: v.detach().clone().requires_grad_() for k, v in heads.named_parameters()}
        weights = SSLWeights(cfg.objective.simclr, cfg.objective.rotation, cfg.objective.temperature,
                             cfg.objective.mlm)
        if "compile" in levers:
            metric.forward = objective.features = compiled_forward(model)
        times = []
        try:
            for fetched in batches:
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in levers):
                    out = learner.meta_step(model, params, buffers, fetched.episodes)
                    ssl, _ = ssl_loss(model, params, buffers, heads, head_params, fetched.ssl_views(), weights)
                combined_gradients(out, ssl, cfg.objective.ssl_weight, params, head_params)
                times.append(time.perf_counter() - t0)
        finally:
            metric.forward, objective.features = original
        print(f"{variant}: {1000 * statistics.median(times[2:]):.0f} ms per step "
              f"(first {1000 * times[0]:.0f} ms)", flush=True)


def maml(args) -> None:
    import metassl.meta.maml as maml_module
    from metassl.data.episodes import Episode
    from metassl.meta import MAML
    from metassl.models import Conv4

    g = torch.Generator().manual_seed(1)
    t = args.meta_batch
    batch = Episode(torch.randn(t, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(t, 1),
                    torch.randn(t, 75, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(15).repeat(t, 1),
                    batched=True)
    original = maml_module.query_forward

    def make(variant: str):
        levers = set(variant.split("+"))
        torch.manual_seed(0)
        model = conv4_order(Conv4(1, 64, norm="layer", out_features=5, image_size=28,
                                  channels_last="nchw" not in levers), "textbook" in levers)
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        learner = MAML(inner_lr=0.4, split_query="reference" not in levers)
        query_forward = original
        if "compile" in levers:
            fn = compiled_forward(model)
            query_forward = lambda model_, p, b, support_x, query_x: fn(model_, p, b, query_x)  # noqa: E731

        def run():
            maml_module.query_forward = query_forward
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in levers):
                    out = learner.meta_step(model, params, {}, batch)
                return torch.autograd.grad(out.loss, list(params.values()))
            finally:
                maml_module.query_forward = original
        return run

    variants = args.variants.split(",")
    runs = {v: make(v) for v in variants}
    reference = make("reference+textbook+nchw")()
    for v in variants:
        t0 = time.perf_counter()
        grads = runs[v]()
        err = max(float((a - b).abs().max()) for a, b in zip(grads, reference)) / max(
            float(b.abs().max()) for b in reference)
        print(f"{v}: first call {time.perf_counter() - t0:.1f} s, gradient max rel. error {err:.1e}", flush=True)
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            runs[v]()
            times[v].append(time.perf_counter() - t0)
    for v in variants:
        print(f"{v}: {1000 * statistics.median(times[v]):.0f} ms per meta-iteration "
              f"({', '.join(f'{1000 * x:.0f}' for x in times[v])})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pipeline", "maml"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=14, help="pipeline: steps timed (the first two are not counted)")
    p.add_argument("--rounds", type=int, default=3, help="maml: alternating rounds")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--variants")
    p.add_argument("--set", action="append", default=[], help="pipeline: config override (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "pipeline":
        args.variants = args.variants or "textbook+nchw,nchw,eager,compile,bf16"
        pipeline(args)
    else:
        args.variants = args.variants or "reference+textbook+nchw,nchw,eager,reference,bf16"
        maml(args)


if __name__ == "__main__":
    main()

"""`metassl` command line: train | fit-generative | generate | eval | tune | report."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from metassl.config import CHOICES
from metassl.errors import ConfigError, MetasslError


def _log(line: str) -> None:
    print(line, flush=True)


def _train(args) -> int:
    from metassl import config
    from metassl.storage import join

    cfg = config.load(args.config, args.set)
    run_dir = args.run_dir or join(cfg.storage or "runs", cfg.name)  # a folder or a storage URI
    if args.backend == "local":
        from metassl.trainer import run_local
        result = run_local(cfg, run_dir, log=_log)
    else:
        from metassl.raytrain import run_ray
        result = run_ray(cfg, run_dir, workers=args.workers, address=args.address, placement=args.placement,
                         log=_log, quiet=not args.verbose)
    print(f"run directory: {run_dir}  (tensorboard --logdir {join(run_dir, 'tensorboard')})")
    if args.json:
        print(json.dumps(result["test"]))
    return 0


def _fit_generative(args) -> int:
    from metassl import config
    from metassl.storage import join

    cfg = config.load(args.config, args.set)
    run_dir = args.run_dir or join(cfg.storage or "runs", f"{cfg.name}_{cfg.generator.generative.model}")
    if args.backend == "local":
        from metassl.generative.fit import run_fit_local
        result = run_fit_local(cfg, run_dir, log=_log)
    else:
        from metassl.raytrain import run_ray_fit
        result = run_ray_fit(cfg, run_dir, workers=args.workers, address=args.address, log=_log,
                             quiet=not args.verbose)
    print(f"run directory: {run_dir}  (use it with --set generator.generative.checkpoint={run_dir}; "
          f"tensorboard --logdir {join(run_dir, 'tensorboard')})")
    if args.json:
        print(json.dumps({k: result[k] for k in ("model", "steps", "final", "train_minutes", "checkpoint")}))
    return 0


def _tune(args) -> int:
    from metassl import config
    from metassl.storage import join
    from metassl.tune import run_tune

    overrides = list(args.set)
    if args.samples is not None:
        overrides.append(f"tune.samples={args.samples}")
    if args.concurrent is not None:
        overrides.append(f"tune.concurrent={args.concurrent}")
    if args.search is not None:
        overrides.append(f"tune.search={args.search}")
    cfg = config.load(args.config, overrides)
    out = args.out or join(cfg.storage or "runs", f"{cfg.name}_tune")  # a folder or a storage URI
    summary = run_tune(cfg, out, address=args.address, log=_log)
    print(f"sweep directory: {out}  (best config: {join(out, 'best.yaml')}; "
          f"tensorboard --logdir {join(out, 'runs')})")
    if args.json:
        print(json.dumps(summary))
    return 0


def _eval(args) -> int:
    from metassl.api import evaluate, evaluate_shapes

    # Options left unset take the run's `eval` config, so `metassl eval RUN` repeats result.json.
    options = dict(split=args.split, episodes=args.episodes, seed=args.seed, inner_steps=args.inner_steps,
                   dataset=args.data, protocol=args.protocol, class_split=args.class_split,
                   disjoint_groups=args.disjoint_groups, features=args.features, shifts=args.shifts)
    if args.shapes is not None:
        if (args.n_way, args.k_shot) != (None, None):
            raise ConfigError("--shapes gives each shape's n_way and k_shot; drop --n-way and --k-shot")
        shapes = [(n, k, q or args.n_query) for n, k, q in args.shapes]
        results = evaluate_shapes(args.checkpoint, shapes, **options)
        print(json.dumps([r.to_dict() for r in results]) if args.json else "\n".join(r.summary() for r in results))
        return 0
    res = evaluate(args.checkpoint, n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, **options)
    print(json.dumps(res.to_dict()) if args.json else res.summary())
    return 0


_SHAPE = re.compile(r"(\d+)w(\d+)s(?:(\d+)q)?")


def _shapes(text: str) -> list[tuple[int, int, int | None]]:
    """`5w1s,20w1s5q` -> [(5, 1, None), (20, 1, 5)] (n_way, k_shot, n_query; None: --n-query or the run's)."""
    shapes = []
    for part in text.split(","):
        m = _SHAPE.fullmatch(part.strip())
        if m is None or min(int(g) for g in m.groups() if g is not None) < 1:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a shape like 5w1s or 20w1s5q "
                                             "(N-way, K-shot, optional Q queries per class, each >= 1)")
        n, k, q = m.groups()
        shapes.append((int(n), int(k), int(q) if q else None))
    return shapes


def _generate(args) -> int:
    import time

    from metassl import config
    from metassl.generate.shards import ShardWriter
    from metassl.registry import build_generator, load_unlabelled

    cfg = config.load(args.config, args.set)
    if cfg.generator.kind == "labelled":
        raise config.ConfigError("generator.kind='labelled' samples true classes; set generator.kind "
                                 "to 'augment', 'cluster', 'generative', 'mix' or 'smlmt' to generate episodes")
    images = load_unlabelled(cfg)
    actors = cfg.generator.actors if cfg.generator.actors >= 0 else os.cpu_count() or 1  # auto: one per CPU
    if actors > 0:
        from metassl.generate.pool import EpisodePool
        source = EpisodePool(cfg, images, actors=actors, start=args.start)
        make = source.records
    else:
        source = build_generator(cfg, images)
        def make(start, count):
            return [source.record(i) for i in range(start, start + count)]
    t0 = time.perf_counter()
    meta = {"config": config.to_dict(cfg), "start": args.start}
    with ShardWriter(args.out, episodes_per_shard=args.episodes_per_shard, metadata=meta,
                     overwrite=args.overwrite) as writer:
        for start in range(args.start, args.start + args.episodes, args.episodes_per_shard):
            count = min(args.episodes_per_shard, args.start + args.episodes - start)
            writer.write(make(start, count))
    if hasattr(source, "close"):
        source.close()
    if getattr(images, "tokenizer_json", None):  # text: the vocabulary the episodes were encoded with
        from metassl.registry import save_tokenizer
        save_tokenizer(images.tokenizer_json, args.out)
    seconds = time.perf_counter() - t0
    _log(f"wrote {args.episodes} {cfg.generator.kind} episodes to {args.out} in {seconds:.1f} s "
         f"({args.episodes / seconds:.1f} episodes/s)")
    return 0


def _report(args) -> int:
    from metassl.report import main as report_main

    return report_main(args.runs, args.out, log=_log)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metassl", description="Self-supervised meta-learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config, then evaluate on meta-test")
    t.add_argument("config", nargs="?", help="YAML config file (see experiments/); omitted: the defaults")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set learner.inner_lr=0.1 (repeatable)")
    t.add_argument("--run-dir", help="run directory (default runs/<name>); an existing run there resumes")
    t.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: Ray Train workers (default); local: in this process, no Ray")
    t.add_argument("--workers", type=_positive, default=2, help="Ray Train workers (default 2)")
    t.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    t.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"), default="PACK",
                   help="Ray placement of the workers (default PACK; STRICT_SPREAD: one worker per node)")
    t.add_argument("--json", action="store_true", help="also print the test result as JSON")
    t.add_argument("--verbose", action="store_true",
                   help="show Ray's own messages and the workers' output (default: in ray.log and Ray's log folder)")
    t.set_defaults(func=_train)

    f = sub.add_parser("fit-generative", help="fit the VAE or GAN of generator.generative to the meta-train "
                                              "images (no labels); its run directory is a checkpoint to reuse")
    f.add_argument("config", nargs="?", help="YAML config (generator.generative, data); omitted: the defaults")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    f.add_argument("--run-dir", help="run directory (default runs/<name>_<model>); an existing fit there resumes")
    f.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: Ray Train workers (default); local: in this process, no Ray")
    f.add_argument("--workers", type=_positive, default=2, help="Ray Train workers (default 2)")
    f.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    f.add_argument("--json", action="store_true", help="also print a summary as JSON")
    f.add_argument("--verbose", action="store_true", help="show Ray's own messages and the workers' output")
    f.set_defaults(func=_fit_generative)

    g = sub.add_parser("generate", help="write pseudo-labelled episodes as Parquet shards (local path or URI)")
    g.add_argument("config", help="YAML config with a generator section (kind: augment | cluster | generative | mix)")
    g.add_argument("--out", required=True, help="folder or URI (s3://bucket/prefix, gs://...) for the shards")
    g.add_argument("--episodes", type=_positive, default=1000, help="episodes to write (default 1000)")
    g.add_argument("--start", type=int, default=0, help="first episode id (default 0)")
    g.add_argument("--episodes-per-shard", type=_positive, default=256)
    g.add_argument("--overwrite", action="store_true", help="replace shards already at --out")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    g.set_defaults(func=_generate)

    u = sub.add_parser("tune", help="search config keys (tune.space) with Ray Tune on meta-val, then test the best")
    u.add_argument("config", help="YAML config with a tune section (see experiments/tune_*.yaml)")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    u.add_argument("--out", help="sweep directory or storage URI (default <storage or runs>/<name>_tune); "
                                  "an existing sweep there resumes")
    u.add_argument("--samples", type=_positive, help="trials (per grid point); default tune.samples")
    u.add_argument("--concurrent", type=_positive,
                   help="trials at once (default tune.concurrent, else as many as the cluster's CPUs hold)")
    u.add_argument("--search", choices=["random", "optuna"], help="default tune.search")
    u.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    u.add_argument("--json", action="store_true", help="also print the summary as JSON")
    u.set_defaults(func=_tune)

    e = sub.add_parser("eval", help="evaluate a trained model on held-out N-way K-shot episodes")
    e.add_argument("checkpoint", help="run directory (uses checkpoints/best.pt) or a .pt checkpoint")
    e.add_argument("--data", help="dataset spec: digits | sinusoid | omniglot[:PATH] | imagefolder:PATH | "
                                  "clinc150[:PATH] | text:PATH | arabic_speech_commands[:PATH] | audio:PATH "
                                  "(default: the training dataset)")
    e.add_argument("--protocol", choices=["supervised", "unsupervised", "psco"], help="omniglot protocol")
    e.add_argument("--class-split", choices=["primary", "domain_disjoint", "speakers"],
                   help="the dataset's class split (arabic_speech_commands: speakers makes few-shot speaker "
                        "identification; default: the run's data.class_split)")
    e.add_argument("--disjoint-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="support and queries from disjoint halves of the speakers, drawn per episode "
                        "(default: the run's eval.disjoint_groups)")
    e.add_argument("--split", choices=["train", "val", "test"], help="default: the run's eval.split")
    e.add_argument("--features", choices=list(CHOICES["eval.features"]),
                   help="embeddings ProtoNet compares: raw, or l2 (unit length) (default: the run's eval.features)")
    e.add_argument("--shifts", type=int, metavar="R",
                   help="ProtoNet on images: average each image's embeddings over its shifts by up to R "
                        "pixels, (2R+1)^2 views (default: the run's eval.shifts)")
    e.add_argument("--shapes", type=_shapes, metavar="5w1s,20w1s5q,...",
                   help="several episode shapes in one call (N-way K-shot, optional Q queries per class), "
                        "each printed on its own line; the split is read and embedded once for all of them")
    e.add_argument("--n-way", type=_positive)
    e.add_argument("--k-shot", type=_positive)
    e.add_argument("--n-query", type=_positive)
    e.add_argument("--episodes", type=_positive, help="default: the run's eval.episodes")
    e.add_argument("--seed", type=int, help="episode seed (default: the run's eval.seed)")
    e.add_argument("--inner-steps", type=int, help="test-time inner steps (gradient-based learners)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.set_defaults(func=_eval)

    r = sub.add_parser("report", help="(re)draw a run's report.md, curves.png and episodes.png; several runs: "
                                      "also their meta-val curves on one plot")
    r.add_argument("runs", nargs="+", help="run directories (or storage URIs)")
    r.add_argument("--out", help="the comparison plot (default: compare.png beside the first run)")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MetasslError as e:
        print(f"metassl {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metassl {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RecursionError, MemoryError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # input that slipped past validation must still end in one line, not a traceback
        if os.environ.get("METASSL_DEBUG"):
            raise
        print(f"metassl {args.command}: error: {type(e).__name__}: {' '.join(str(e).split())[:500]} "
              "(METASSL_DEBUG=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

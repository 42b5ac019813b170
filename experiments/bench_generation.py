"""Episode generation throughput: in-process vs 1 and 2 Ray actors, same episodes.

    python experiments/bench_generation.py --data-root PATH/TO/omniglot [--kind augment] [--episodes 600]

Without --data-root it uses the bundled digits. Each configuration makes the same
episode ids (after warm-up chunks that are not timed) and reports episodes/s, the
median of --rounds rounds taken in alternating order (1 actor, 2 actors, 2, 1, ...)
so that neither gains from going second; the ratio 2 actors / 1 actor is the gate
(>= 1.5 on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import ray
import torch

from metassl import config
from metassl.generate.pool import EpisodePool
from metassl.registry import build_generator, load_unlabelled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="Omniglot folder; default: digits")
    p.add_argument("--kind", default="augment", choices=["augment", "cluster"])
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--n-query", type=int, default=15)
    p.add_argument("--chunk", type=int, default=32, help="episodes per actor call")
    p.add_argument("--in-flight", type=int, default=4, help="chunks requested ahead")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    overrides = [f"generator.kind={args.kind}", f"episodes.n_way={args.n_way}", f"episodes.k_shot={args.k_shot}",
                 f"episodes.n_query={args.n_query}", f"generator.episodes_per_task={args.chunk}",
                 f"generator.max_in_flight={args.in_flight}", "generator.augment.erase_prob=0.5"]
    if args.data_root:
        overrides += ["data.dataset=omniglot", "data.protocol=unsupervised", f"data.root={args.data_root}"]
    cfg = config.load(None, overrides + ["episodes.n_way=%d" % args.n_way])
    images = load_unlabelled(cfg)
    warm = args.chunk * 2
    rows = []

    torch.set_num_threads(1)  # one core, like one actor
    gen = build_generator(cfg, images)
    for i in range(warm):
        gen.record(i)
    t0 = time.perf_counter()
    for i in range(warm, warm + args.episodes):
        gen.record(i)
    rows.append(("in-process (1 thread)", args.episodes / (time.perf_counter() - t0)))

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for actors in ((1, 2) if r % 2 == 0 else (2, 1)):
            pool = EpisodePool(cfg, images, actors=actors, chunk=args.chunk)
            pool.records(0, warm)
            t0 = time.perf_counter()
            pool.records(warm, args.episodes)
            rates[actors].append(args.episodes / (time.perf_counter() - t0))
            pool.close()
    ray.shutdown()
    for actors, got in rates.items():
        rows.append((f"Ray pool, {actors} actor{'s' if actors > 1 else ''}", statistics.median(got)))
        print(f"{actors} actor(s), rounds: " + ", ".join(f"{x:.1f}" for x in got))

    print(f"\n## Episode generation: {args.kind}, {args.n_way}-way {args.k_shot}-shot {args.n_query}-query, "
          f"{'omniglot' if args.data_root else 'digits'} {tuple(images.shape[1:])}")
    print(f"- machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"date {datetime.date.today()}; {args.episodes} timed episodes after {warm} warm-up; "
          f"chunks of {args.chunk}, {args.in_flight} in flight; median of {args.rounds} rounds")
    print("| generation | episodes/s | vs 1 actor |")
    print("| --- | ---: | ---: |")
    one = rows[1][1]
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / one:.2f}x |")


if __name__ == "__main__":
    main()

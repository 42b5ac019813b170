"""Training throughput: Ray Train with 1 worker against the in-process loop, same episodes.

    python experiments/bench_train.py --data-root PATH/TO/omniglot [--steps 600] [--rounds 2]

Both paths train the same config on the same episode ids: UMTRA-style `augment`
episodes (64-way 1-shot 3-query, Conv-4, ProtoNet) made in the training process for
the in-process loop (`--backend local`, `generator.actors: 0`) and by the generator
actors (`generator.actors: -1`, one actor beside the worker on 2 CPUs) for Ray Train.
Steady-state episodes/s is the median of the `perf/episodes_per_s` windows that the
run writes to TensorBoard, skipping the first `--skip` windows (start-up, first
chunks); `perf/wait_frac` is the fraction of the same windows the worker spent
waiting for episodes. Rounds alternate the order (in-process first, then Ray first).
Without --data-root it uses the bundled digits (5-way, for a quick check only).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metassl import config
from metassl.raytrain import run_ray
from metassl.trainer import run_local

HERE = Path(__file__).resolve().parent


def scalars(run_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def steady(run_dir: Path, skip: int) -> tuple[float, float, int]:
    """(median episodes/s, mean wait fraction, windows used) after the first `skip` windows."""
    rates = scalars(run_dir, "perf/episodes_per_s")[skip:-1]  # the last window ends at the stop
    waits = scalars(run_dir, "perf/wait_frac")[skip:-1]
    if not rates:
        raise SystemExit(f"{run_dir}: too few logging windows; raise --steps or lower --log-every")
    return statistics.median(rates), statistics.fmean(waits), len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="Omniglot folder; default: digits")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--skip", type=int, default=2, help="first logging windows left out")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args()

    overrides = [f"train.steps={args.steps}", f"train.log_every={args.log_every}", "train.val_every=0",
                 f"train.checkpoint_every={args.steps}", "train.max_minutes=0", "eval.episodes=20"]
    if args.data_root:
        path = HERE / "omniglot_umtra_protonet.yaml"
        overrides.append(f"data.root={args.data_root}")
    else:
        path = HERE / "digits_protonet.yaml"
        overrides += ["generator.kind=augment", "episodes.n_query=2"]
    overrides += args.set
    local_cfg = config.load(path, overrides + ["generator.actors=0"])
    ray_cfg = config.load(path, overrides + ["generator.actors=-1"])

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    got: dict[str, list[tuple[float, float, int]]] = {"local": [], "ray": []}
    quiet = lambda *_: None  # noqa: E731
    try:
        for r in range(args.rounds):
            for backend in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                run_dir = work / f"{backend}-{r}"
                t0 = time.perf_counter()
                if backend == "local":
                    run_local(local_cfg, run_dir, log=quiet)
                else:
                    run_ray(ray_cfg, run_dir, workers=1, log=quiet)
                got[backend].append(steady(run_dir, args.skip))
                rate, wait, n = got[backend][-1]
                print(f"round {r} {backend}: {rate:.2f} episodes/s, wait_frac {wait:.3f} "
                      f"({n} windows; {time.perf_counter() - t0:.0f} s with start-up and evaluation)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local = statistics.median(x[0] for x in got["local"])
    ray_rate = statistics.median(x[0] for x in got["ray"])
    cfg = local_cfg
    print(f"\n## Training throughput: {cfg.data.dataset} {cfg.generator.kind} episodes, "
          f"{cfg.episodes.n_way}-way {cfg.episodes.k_shot}-shot {cfg.episodes.n_query}-query, "
          f"meta-batch {cfg.episodes.meta_batch}, {cfg.learner.name}")
    print(f"- machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"date {datetime.date.today()}; {args.steps} steps per run, windows of {args.log_every} steps, "
          f"first {args.skip} skipped; median over {args.rounds} rounds")
    print("| path | episodes/s | vs in-process | wait_frac |")
    print("| --- | ---: | ---: | ---: |")
    for name, key, rate in (("in-process loop, generation inline", "local", local),
                            ("Ray Train, 1 worker + generator actors", "ray", ray_rate)):
        wait = statistics.fmean(x[1] for x in got[key])
        print(f"| {name} | {rate:.2f} | {rate / local:.2f}x | {wait:.3f} |")


if __name__ == "__main__":
    main()

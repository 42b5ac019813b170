"""Tuned against default: a sweep picks best.yaml, then tuned and default train side by side.

    python experiments/bench_tune.py [--config experiments/tune_omniglot.yaml] [--minutes 20]

1. `metassl tune CONFIG` (ASHA on meta-val; the sweep never reads meta-test), capped by
   the config's `train.max_minutes` (per trial) and `tune.max_minutes` (whole sweep); it writes best.yaml,
   trials.csv and search.png (the sweep's plots).
2. `metassl train best.yaml` (tuned) and `metassl train CONFIG` (its own values: the
   untuned default) at the same time, one core each, for the same `--minutes`
   (`train.max_minutes`; `train.steps` is set high enough that the clock ends both).
3. Both best checkpoints evaluated on meta-val (1000 episodes from seed 1, not the ones
   the sweep selected on) and meta-test (1000 episodes, seed 0).
Prints a RESULTS.md block with the commands, the machine and the figures; the log of each
step is under `--out`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METASSL = [sys.executable, "-m", "metassl.cli"]


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    print(out.stdout[-3000:], flush=True)
    if out.returncode != 0:
        sys.exit(f"command failed with exit {out.returncode}: {' '.join(cmd)}")
    return out.stdout


def evaluate(run_dir: Path, split: str, seed: int) -> dict:
    out = run(METASSL + ["eval", str(run_dir), "--split", split, "--episodes", "1000", "--seed", str(seed), "--json"])
    return json.loads(out.strip().splitlines()[-1])


def train_side_by_side(runs: dict[str, tuple[Path, Path]], flags: list[str]) -> dict[str, float]:
    """Train each `name: (config, run_dir)` at once, one torch thread each; returns minutes per run."""
    procs, t0 = {}, time.perf_counter()
    for name, (config, run_dir) in runs.items():
        cmd = METASSL + ["train", str(config), "--backend", "local", "--run-dir", str(run_dir),
                         "--set", "train.threads=1", *flags]
        print("$", " ".join(cmd), flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(run_dir.parent / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log)
    minutes = {}
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            sys.exit(f"training {name} failed: see {log.name}")
        log.close()
        minutes[name] = (time.perf_counter() - t0) / 60
        print(Path(log.name).read_text()[-1500:], flush=True)
    return minutes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "tune_omniglot.yaml"))
    p.add_argument("--data-root", help="Omniglot folder (default: the 28x28 copy shipped with metassl)")
    p.add_argument("--out", default="runs/bench/tune")
    p.add_argument("--minutes", type=float, default=20.0, help="training time of tuned and default (each)")
    p.add_argument("--steps", type=int, default=100_000, help="train.steps of both (the clock ends them first)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for all three")
    args = p.parse_args()

    sets = ([f"data.root={args.data_root}"] if args.data_root else []) + args.set
    flags = [x for s in sets for x in ("--set", s)]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):  # `metassl tune` would resume the sweep there, not time a new one
        sys.exit(f"{out} is not empty: remove it or pass another --out")
    t0 = time.perf_counter()
    run(METASSL + ["tune", args.config, "--out", str(out / "sweep"), *flags])
    sweep_minutes = (time.perf_counter() - t0) / 60
    summary = json.loads((out / "sweep" / "test_result.json").read_text())

    budget = ["--set", f"train.max_minutes={args.minutes}", "--set", f"train.steps={args.steps}",
              "--set", "train.val_every=200", "--set", "train.checkpoint_every=200"]
    runs = {"tuned": (out / "sweep" / "best.yaml", out / "tuned"), "default": (Path(args.config), out / "default")}
    minutes = train_side_by_side(runs, flags + budget)

    rows = []
    for name, (_, run_dir) in runs.items():
        result = json.loads((run_dir / "result.json").read_text())
        rows.append((name, result["steps"], evaluate(run_dir, "val", 1), evaluate(run_dir, "test", 0)))

    print(f"\n## Tuned vs default ({Path(args.config).name})")
    print(f"- command: `python experiments/bench_tune.py {' '.join(sys.argv[1:])}`")
    print(f"- machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"date {datetime.date.today()}; sweep {summary['trials']} trials in {sweep_minutes:.1f} min; "
          f"tuned and default trained at once for {args.minutes:g} min each "
          f"(wall {max(minutes.values()):.1f} min, evaluation included)")
    print(f"- tuned values: {summary['values']} (trial {summary['best_trial']}, sweep meta-val {summary['val']:.4f}); "
          f"sweep plots: {out / 'sweep' / 'search.png'}")
    print("| config | steps | meta-val % (1000 ep., seed 1) | meta-test % (1000 ep., seed 0) |")
    print("| --- | ---: | ---: | ---: |")
    for name, steps, val, test in rows:
        print(f"| {name} | {steps} | {100 * val['mean']:.2f} ± {100 * val['ci95']:.2f} | "
              f"{100 * test['mean']:.2f} ± {100 * test['ci95']:.2f} |")


if __name__ == "__main__":
    main()

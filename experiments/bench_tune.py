"""Tuned against default: run a sweep, train the default config, compare both on meta-val and meta-test.

    python experiments/bench_tune.py --data-root PATH/TO/omniglot [--config experiments/tune_omniglot.yaml]

1. `metassl tune CONFIG` (ASHA on meta-val; the sweep never reads meta-test).
2. `metassl train CONFIG` with the config's own values (the default), same budget, Ray Train.
3. Both best checkpoints evaluated with `metassl eval` on meta-val and on meta-test, 1000
   episodes each (meta-val episodes from seed 1, so not the ones the sweep selected on).
Prints a RESULTS.md block with the commands, the machine and the figures.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "tune_omniglot.yaml"))
    p.add_argument("--data-root", help="Omniglot folder")
    p.add_argument("--out", default="runs/bench/tune")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for both")
    args = p.parse_args()

    sets = ([f"data.root={args.data_root}"] if args.data_root else []) + args.set
    flags = [x for s in sets for x in ("--set", s)]
    out = Path(args.out)
    t0 = time.perf_counter()
    run(METASSL + ["tune", args.config, "--out", str(out / "sweep"), *flags])
    sweep_minutes = (time.perf_counter() - t0) / 60
    summary = json.loads((out / "sweep" / "test_result.json").read_text())
    t0 = time.perf_counter()
    run(METASSL + ["train", args.config, "--run-dir", str(out / "default"), "--workers", "1", *flags])
    default_minutes = (time.perf_counter() - t0) / 60

    rows = []
    for name, run_dir in (("default", out / "default"), ("tuned", Path(summary["run_dir"]))):
        rows.append((name, evaluate(run_dir, "val", 1), evaluate(run_dir, "test", 0)))

    print(f"\n## Tuned vs default ({Path(args.config).name})")
    print(f"- commands: `python experiments/bench_tune.py {' '.join(sys.argv[1:])}`")
    print(f"- machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"date {datetime.date.today()}; sweep {summary['trials']} trials in {sweep_minutes:.1f} min, "
          f"default run {default_minutes:.1f} min")
    print(f"- tuned values: {summary['values']} (trial {summary['best_trial']}, sweep meta-val {summary['val']:.4f})")
    print("| config | meta-val % (1000 ep., seed 1) | meta-test % (1000 ep., seed 0) |")
    print("| --- | ---: | ---: |")
    for name, val, test in rows:
        print(f"| {name} | {100 * val['mean']:.2f} ± {100 * val['ci95']:.2f} | "
              f"{100 * test['mean']:.2f} ± {100 * test['ci95']:.2f} |")


if __name__ == "__main__":
    main()

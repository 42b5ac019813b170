"""Generative pseudo-tasks alone on Omniglot's unsupervised protocol: VAE and GAN, ProtoNet and MAML.

    python experiments/bench_generative.py [--minutes 30] [--models vae gan] [--learners protonet maml]

1. `metassl fit-generative` fits each model on the meta-train images (no labels), all
   models at once, one core each; each fit's wall time is measured.
2. `metassl train` meta-trains each (model, learner) pair on tasks decoded from that
   fit (`generator.generative.checkpoint`), two runs at a time, one core each, for
   `--minutes` minus its model's fit time (`train.max_minutes`), so that fit and
   meta-training together take at most `--minutes`. Meta-val selects the checkpoint.
3. Each best checkpoint is evaluated on the test characters in all four shapes (5-way
   1-/5-shot with 15 queries, 20-way 1-/5-shot with 5 queries; 1000 episodes, seed 0).
Prints a RESULTS.md block: the commands, the machine, and the table beside LASIUM's
published figures. Logs are under `--out`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METASSL = [sys.executable, "-m", "metassl.cli"]
CONFIGS = {"protonet": HERE / "omniglot_lasium_protonet.yaml", "maml": HERE / "omniglot_lasium_maml.yaml"}
MODEL_SETS = {"vae": [], "gan": ["generator.generative.model=gan", "generator.generative.lr=0.0002"]}
SHAPES = [(5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5)]
# Published Omniglot figures (5w1s / 5w5s / 20w1s / 20w5s; Khodadadeh et al. 2021 and 2019, as
# listed in the protocols document): LASIUM's paper gives 5-way figures only.
PUBLISHED = {"LASIUM-MAML": "83.26 / 95.29 / - / -", "LASIUM-ProtoNets": "80.15 / 91.10 / - / -",
             "UMTRA": "83.80 / 95.43 / 74.25 / 92.12", "CACTUs-MAML": "68.84 / 87.78 / 48.09 / 73.36"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            sys.exit(f"{name} failed: see {log}\n{log.read_text()[-2000:]}")


def flags(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="fit + meta-training time of each run")
    p.add_argument("--models", nargs="+", default=["vae", "gan"], choices=list(MODEL_SETS))
    p.add_argument("--learners", nargs="+", default=["protonet", "maml"], choices=list(CONFIGS))
    p.add_argument("--out", default="runs/bench/generative")
    p.add_argument("--at-once", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="finish an interrupted benchmark in --out: keep finished fits and runs (those with a "
                        "result.json), start unfinished ones again from nothing")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.cont:  # they would resume instead of being timed
        sys.exit(f"{out} is not empty: remove it, pass another --out, or --continue")

    def finished(name: str) -> bool:
        """A finished fit or run is kept under --continue; an unfinished one is removed so it is timed afresh."""
        if (out / name / "result.json").exists():
            return True
        shutil.rmtree(out / name, ignore_errors=True)
        return False
    common = ["train.threads=1", "generator.actors=0", *args.set]

    fit_minutes, procs, t0 = {}, {}, time.perf_counter()
    for model in args.models:
        if finished(model):
            continue
        cmd = METASSL + ["fit-generative", str(CONFIGS[args.learners[0]]), "--backend", "local",
                         "--run-dir", str(out / model), *flags(common + MODEL_SETS[model])]
        procs[model] = (start(cmd, out / f"{model}.log"), out / f"{model}.log")
    for model, (proc, log) in procs.items():
        if proc.wait() != 0:
            sys.exit(f"fitting {model} failed: see {log}")
    for model in args.models:
        fit_minutes[model] = json.loads((out / model / "result.json").read_text())["train_minutes"]
    print(f"fits: {fit_minutes} (wall {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)

    pairs = [(m, learner) for learner in args.learners for m in args.models]
    todo = [(m, learner) for m, learner in pairs if not finished(f"{m}_{learner}")]
    for i in range(0, len(todo), args.at_once):
        procs = {}
        for model, learner in todo[i:i + args.at_once]:
            name = f"{model}_{learner}"
            # the step that passes train.max_minutes still validates and saves: leave it half a minute
            budget = args.minutes - fit_minutes[model] - 0.5
            sets = common + MODEL_SETS[model] + [f"generator.generative.checkpoint={out / model}",
                                                 f"train.max_minutes={budget:.2f}"]
            cmd = METASSL + ["train", str(CONFIGS[learner]), "--backend", "local", "--run-dir", str(out / name),
                             *flags(sets)]
            procs[name] = (start(cmd, out / f"{name}.log"), out / f"{name}.log")
        wait_all(procs)

    rows = []
    for model, learner in pairs:
        name = f"{model}_{learner}"
        result = json.loads((out / name / "result.json").read_text())
        scores = []
        for n_way, k_shot, n_query in SHAPES:
            cmd = METASSL + ["eval", str(out / name), "--split", "test", "--n-way", str(n_way), "--k-shot",
                             str(k_shot), "--n-query", str(n_query), "--episodes", "1000", "--seed", "0", "--json"]
            print("$", " ".join(cmd), flush=True)
            res = json.loads(subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout.splitlines()[-1])
            scores.append(f"{100 * res['mean']:.2f} ± {100 * res['ci95']:.2f}")
        val = max(v for _, v in result["val_history"])
        rows.append(f"| {model.upper()} | {learner} | {fit_minutes[model]:.1f} | {result['train_minutes']:.1f} | "
                    f"{result['steps']} | {100 * val:.2f} | " + " | ".join(scores) + " |")

    print(f"\n## Generative pseudo-tasks alone\n- command: `python experiments/bench_generative.py "
          f"{'--continue ' if args.cont else ''}"
          f"--minutes {args.minutes:g}`\n- machine: {platform.machine()} {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; date {datetime.date.today()}; fits at once, then {args.at_once} runs at "
          f"a time, one core each; each run's fit + meta-training <= {args.minutes:g} min")
    print("| model | learner | fit min | meta-train min | steps | best meta-val % | 5w1s | 5w5s | 20w1s | 20w5s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("\npublished (5w1s / 5w5s / 20w1s / 20w5s): " + "; ".join(f"{k} {v}" for k, v in PUBLISHED.items()))


if __name__ == "__main__":
    main()

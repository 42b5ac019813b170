"""Steps per second of the self-supervised pipeline, this tree against an earlier commit, side by side.

    python experiments/bench_ssl_pipeline.py --baseline REF [--steps 800] [--rounds 1] [--set KEY=VALUE ...]

Each side runs `metassl train CONFIG --workers 1` (Ray Train, one worker and its generator
actor: the flagship path) for `--steps` steps with the overrides given, and is timed by what the
run itself records in result.json: `steps / train_minutes`, i.e. meta-training with its
validations, refreshes and re-clusterings, without Ray's start-up and the final test. The
default overrides make a short run pass every stage of the 7000-step schedule: augment
episodes during a short warm-up, then cluster episodes from the network's embedding,
re-clustered every 200 steps, a validation every 400 steps.

`--baseline REF` clones this repository at REF into `--out`/baseline-SHA, beside a virtual
environment that sees this interpreter's packages (torch, Ray, ... the same versions) through a
`.pth` file and imports `metassl` from the clone; the current tree runs with this interpreter.
Both sides run the same config file, `--config` (copied into the runs' folder; give the
baseline's own copy when this tree's has keys the baseline does not know), with the same
`--set` overrides; `--this-set` adds overrides for this tree only (an option to measure
that the baseline lacks).
Within a round both sides run one after the other, the order alternating between rounds.
Nothing else should run on the machine meanwhile: both sides use all its cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["generator.warmup_steps=200", "generator.refresh_every=200", "train.val_every=400",
         "train.checkpoint_every=400", "eval.episodes=100", "train.max_minutes=0"]


CLI = "import sys; from metassl.cli import main; sys.exit(main())"


def baseline_checkout(ref: str, out: Path) -> tuple[Path, Path]:
    """A clone of this repository at `ref` and an interpreter that imports metassl from it: (python, clone)."""
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                                  text=True).strip()
    where = out / f"baseline-{sha[:10]}"
    if not (where / ".git").exists():
        subprocess.check_call(["git", "clone", "-q", str(ROOT), str(where)])
    subprocess.check_call(["git", "-C", str(where), "checkout", "-q", sha])
    env = out / f"baseline-{sha[:10]}-env"
    py = env / "bin" / "python"
    if not py.exists():
        venv.create(env, with_pip=False)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # the clone first, then this interpreter's packages (whose editable metassl is not on that path)
    (site / "_bench_baseline.pth").write_text(f"{where}\n{sysconfig.get_paths()['purelib']}\n")
    found = subprocess.check_output([str(py), "-c", "import metassl; print(metassl.__file__)"], text=True,
                                    cwd=out).strip()
    if not Path(found).resolve().is_relative_to(where.resolve()):
        raise SystemExit(f"the baseline interpreter imports metassl from {found}, not from {where}")
    return py, where


def run_one(py: Path, cwd: Path, config: Path, run_dir: Path, steps: int, sets: list[str], log: Path,
            timeout_s: float) -> dict:
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: a run there would resume; choose another --out")
    cmd = [str(py), "-c", CLI, "train", str(config), "--workers", "1", "--run-dir", str(run_dir),
           "--set", f"train.steps={steps}", *[a for s in sets for a in ("--set", s)]]
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{shlex.join(cmd)} ran past {timeout_s:.0f} s; its output: {log}") from None
    if rc != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit status {rc}); its output: {log}")
    result = json.loads((run_dir / "result.json").read_text())
    return {"steps": result["steps"], "train_minutes": result["train_minutes"],
            "steps_per_s": result["steps"] / (60 * result["train_minutes"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git commit or branch to compare with")
    p.add_argument("--config", default="experiments/omniglot_unsupervised.yaml")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="extra override for both sides (repeatable)")
    p.add_argument("--this-set", action="append", default=[],
                   help="extra override for this tree only, e.g. an option the baseline lacks (repeatable)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "pipeline"))
    p.add_argument("--timeout-min", type=float, default=60.0, help="give up on a run after this long")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / Path(args.config).name
    shutil.copyfile(args.config, config)  # one config file for both sides
    sides = {"baseline": baseline_checkout(args.baseline, out),  # (interpreter, the checkout it runs in)
             "this tree": (Path(sys.executable), ROOT)}
    sets = SHORT + args.set
    side_sets = {"baseline": sets, "this tree": sets + args.this_set}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            py, cwd = sides[name]
            tag = f"{stamp}-{name.replace(' ', '_')}-r{r}"
            res = run_one(py, cwd, config, out / tag, args.steps, side_sets[name], out / f"{tag}.log",
                          60 * args.timeout_min)
            results[name].append(res)
            print(f"round {r}, {name}: {res['steps']} steps in {res['train_minutes']:.2f} min, "
                  f"{res['steps_per_s']:.3f} steps/s", flush=True)
    med = {n: statistics.median(x["steps_per_s"] for x in rs) for n, rs in results.items()}
    print(f"\n## Self-supervised pipeline: {args.config}, {args.steps} steps, one Ray Train worker")
    print(f"- command: `python experiments/bench_ssl_pipeline.py {shlex.join(sys.argv[1:])}` "
          f"(overrides for both sides: {' '.join(sets)}; this tree only: {' '.join(args.this_set) or 'none'})")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{datetime.date.today()}; median of {args.rounds} round(s), order alternating")
    print("| side | steps/s (median) | rounds | this tree / side |")
    print("| --- | ---: | --- | ---: |")
    for n, rs in results.items():
        rounds = ", ".join(f"{x['steps_per_s']:.3f}" for x in rs)
        print(f"| {n} | {med[n]:.3f} | {rounds} | {med['this tree'] / med[n]:.2f}x |")


if __name__ == "__main__":
    main()

"""Short pilot runs of one config, each with settings changed, read side by side on meta-val.

    python experiments/pilots.py experiments/omniglot_unsupervised.yaml --out runs/pilots \
        --root PATH/omniglot --steps 4000 \
        --pilot base \
        --pilot ssl03 objective.ssl_weight=0.3 \
        --pilot refresh500 generator.refresh_every=500

Each pilot is the documented command, run one after another (never side by side: on a small
machine they would share its cores and the `max_minutes` caps would differ):

    metassl train CONFIG --workers W --run-dir OUT/NAME --set data.root=ROOT
        --set train.steps=STEPS --set train.max_minutes=0 [--set K=V ...]

then its best checkpoint (chosen on meta-val by the run) is evaluated on the **meta-val**
classes at each `--shape` (default 5-way 1-shot with 15 queries and 20-way 1-shot with 5),
on the same fixed-seed episodes for every pilot. The table (OUT/pilots.md, and
OUT/pilots.json) has those figures, the run's best meta-val and its step, the steps trained
and the training minutes. Meta-test figures are not read: a choice made here is a choice on
meta-val. A pilot whose run directory already holds a result is read, not re-run, so an
interrupted queue goes on where it stopped; every pilot's settings are checked before the
first one starts, so a typo fails at once, not an hour in.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metassl import api  # noqa: E402
from metassl.config import to_dict  # noqa: E402
from metassl.errors import ConfigError  # noqa: E402

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_shape(text: str) -> tuple[int, int, int]:
    """`N,K,Q` -> (n_way, k_shot, n_query)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape {text!r} must be N,K,Q: three positive integers, e.g. 5,1,15")
    n, k, q = (int(p) for p in parts)
    return n, k, q


def pilot_overrides(args, sets: list[str]) -> list[str]:
    """The `--set` values of one pilot: the shared ones, then its own (which win)."""
    shared = [f"train.steps={args.steps}", "train.max_minutes=0"]
    if args.root:
        shared.insert(0, f"data.root={args.root}")
    return shared + list(sets)


def check_pilots(args) -> list[tuple[str, list[str]]]:
    """Every pilot's name and settings, validated as `metassl train` would validate them."""
    pilots, seen = [], set()
    for name, *sets in args.pilot:
        if not NAME.match(name):
            raise ConfigError(f"pilot name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        if name in seen:
            raise ConfigError(f"pilot name {name!r} is given twice")
        seen.add(name)
        for item in sets:
            if "=" not in item:
                raise ConfigError(f"pilot {name!r}: {item!r} is not a KEY=VALUE setting")
        api.resolve_config(args.config, pilot_overrides(args, sets))  # raises ConfigError naming the key
        pilots.append((name, sets))
    return pilots


def train(args, name: str, sets: list[str]) -> float:
    """Run the pilot's `metassl train` command; its output goes to OUT/NAME.log. Returns wall minutes."""
    cmd = [str(Path(sys.executable).with_name("metassl")), "train", args.config, "--workers", str(args.workers),
           "--run-dir", str(args.out / name)]
    for item in pilot_overrides(args, sets):
        cmd += ["--set", item]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(args.out / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"pilot {name!r} failed (exit {code}); its output is in {args.out / f'{name}.log'}")
    return (time.perf_counter() - t0) / 60


def read_pilot(args, name: str, sets: list[str], wall: float | None) -> dict:
    run = args.out / name
    result = json.loads((run / "result.json").read_text())
    if "error" in result:
        raise SystemExit(f"pilot {name!r} stopped without a result: {result['error']}")
    row = {"name": name, "settings": sets, "steps": result["steps"], "best_step": result["best_step"],
           "best_val": result["best_val"], "train_minutes": result.get("train_minutes"), "wall_minutes": wall,
           "val": {}}
    for n, k, q in args.shape:
        res = api.evaluate(run, split="val", n_way=n, k_shot=k, n_query=q, episodes=args.episodes, seed=args.seed)
        row["val"][f"{n}w{k}s"] = {"mean": res.mean, "ci95": res.ci95, "episodes": res.episodes, "n_query": q}
    return row


def table(rows: list[dict], shapes: list[tuple[int, int, int]], episodes: int) -> str:
    heads = [f"val {n}w{k}s ({q} queries, {episodes} episodes)" for n, k, q in shapes]
    lines = ["| pilot | settings | " + " | ".join(heads) + " | best meta-val (step) | steps | train min |",
             "| --- | --- | " + " | ".join("---:" for _ in heads) + " | ---: | ---: | ---: |"]
    for r in rows:
        cells = [f"{100 * r['val'][f'{n}w{k}s']['mean']:.2f} ± {100 * r['val'][f'{n}w{k}s']['ci95']:.2f}"
                 for n, k, _ in shapes]
        settings = ", ".join(f"`{s}`" for s in r["settings"]) or "(the config)"
        minutes = f"{r['train_minutes']:.1f}" if r["train_minutes"] is not None else "?"
        lines.append(f"| {r['name']} | {settings} | " + " | ".join(cells) +
                     f" | {100 * r['best_val']:.2f} ({r['best_step']}) | {r['steps']} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="the YAML config every pilot starts from")
    parser.add_argument("--out", type=Path, required=True, help="a directory: one run directory per pilot")
    parser.add_argument("--pilot", nargs="+", action="append", required=True, metavar="NAME [K=V",
                        help="a pilot: its name, then the settings it changes (none: the config as it is)")
    parser.add_argument("--root", default=None, help="the dataset's local path (data.root)")
    parser.add_argument("--steps", type=int, default=4000, help="train.steps of every pilot (default 4000)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--shape", type=parse_shape, action="append", default=None,
                        help="N,K,Q of a meta-val evaluation (repeatable; default 5,1,15 and 20,1,5)")
    parser.add_argument("--episodes", type=int, default=1000, help="meta-val episodes per shape (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the episodes' seed, the same for every pilot")
    args = parser.parse_args(argv)
    args.shape = args.shape or [(5, 1, 15), (20, 1, 5)]
    if args.steps < 1 or args.episodes < 1 or args.workers < 1:
        parser.error("--steps, --episodes and --workers must be >= 1")
    try:
        pilots = check_pilots(args)
    except ConfigError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, sets in pilots:
        done = (args.out / name / "result.json").exists()
        if (args.out / name / "config.yaml").exists():  # a finished or interrupted run: the same settings?
            want = to_dict(api.resolve_config(args.config, pilot_overrides(args, sets)))
            if to_dict(api.resolve_config(args.out / name / "config.yaml")) != want:
                raise SystemExit(f"{args.out / name} holds a run of other settings than pilot {name!r}; "
                                 "give the pilot another name or another --out")
        wall = None if done else train(args, name, sets)
        if done:
            print(f"== {name}: already run, read from {args.out / name}", flush=True)
        rows.append(read_pilot(args, name, sets, wall))
        text = table(rows, args.shape, args.episodes)
        (args.out / "pilots.md").write_text(text + "\n")  # rewritten after every pilot
        (args.out / "pilots.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()

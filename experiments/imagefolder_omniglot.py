"""Held-out classes from a plain folder of classes: Omniglot characters as `imagefolder:PATH`.

    python experiments/imagefolder_omniglot.py --data-root PATH/TO/omniglot --out PATH/TO/omniglot_folder

Writes `--characters` Omniglot characters (drawn with `--seed` from all 1,623, rotation 0,
20 drawings each, 28x28 PNGs with ink white on black) as one folder of classes,
`OUT/<Alphabet>__<characterNN>/<i>.png`, with no train/val/test division of its own. Then
trains Prototypical Networks on it with `metassl train experiments/omniglot_protonet.yaml
--backend local --set data.dataset=imagefolder:OUT`, so the classes are split by the seeded
class split (`data.split_fractions`, `data.split_seed`), and prints one JSON object (also
written to RUN_DIR/imagefolder_benchmark.json): the number of train/val/test classes, the
sizes of their pairwise intersections (0 when disjoint) and the meta-test 5-way 1-shot
accuracy +- 95% CI over `eval.episodes` (1000) fixed-seed episodes of the test classes.
An existing OUT is reused when it holds exactly the characters asked for.
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

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from metassl import config  # noqa: E402
from metassl.data import load_omniglot  # noqa: E402
from metassl.data.imagefolder import split_folders  # noqa: E402


def folder_name(class_name: str) -> str:
    """"Alphabet/characterNN/rot000" -> "Alphabet__characterNN" (one flat, unique folder name)."""
    alphabet, character, _ = class_name.split("/")
    return f"{alphabet}__{character}"


def write_folder(data_root: str, out: Path, characters: int, seed: int) -> list[str]:
    """Writes `characters` seeded Omniglot characters as out/<class>/<i>.png; returns the class names."""
    splits = [load_omniglot(data_root, s, protocol="unsupervised", image_size=28) for s in ("train", "val", "test")]
    every = sorted((folder_name(name), split, c) for split in splits for c, name in enumerate(split.class_names))
    if not 3 <= characters <= len(every):
        sys.exit(f"--characters must be in 3..{len(every)}, got {characters}")
    picked = [every[i] for i in sorted(np.random.default_rng(seed).choice(len(every), characters, replace=False))]
    names = [name for name, _, _ in picked]
    if out.exists():
        present = sorted(p.name for p in out.iterdir() if p.is_dir())
        if present != names:
            sys.exit(f"{out} exists and does not hold these {characters} characters (seed {seed}); "
                     "choose another --out")
        print(f"reusing {out} ({characters} classes)", flush=True)
        return names
    tmp = out.with_name(out.name + ".partial")
    for name, split, c in picked:
        (tmp / name).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(split.class_indices[c]):
            pixels = (split.x[row, 0].numpy() * 255).round().astype(np.uint8)  # ink = 255
            Image.fromarray(pixels).save(tmp / name / f"{i:02d}.png")
    tmp.rename(out)  # a complete folder appears at once
    print(f"wrote {characters} classes to {out}", flush=True)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the Omniglot folder (omniglot.npz or the official PNGs)")
    parser.add_argument("--out", required=True, help="folder to write the characters to (reused when complete)")
    parser.add_argument("--characters", type=int, default=400, help="characters to write (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="which characters (default 0)")
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--run-dir", default="runs/bench/imagefolder_omniglot", help="run directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides for metassl train (repeatable)")
    args = parser.parse_args()

    out = Path(args.out).expanduser().resolve()
    t0 = time.perf_counter()
    write_folder(args.data_root, out, args.characters, args.seed)
    written_s = time.perf_counter() - t0
    overrides = [f"data.dataset=imagefolder:{out}", "name=imagefolder_omniglot", f"train.steps={args.steps}",
                 "train.val_every=200", "train.checkpoint_every=200", "train.log_every=100", *args.set]
    cmd = [sys.executable, "-m", "metassl.cli", "train", str(HERE / "omniglot_protonet.yaml"), "--backend", "local",
           "--run-dir", args.run_dir] + [a for o in overrides for a in ("--set", o)]
    print("$", " ".join(cmd), flush=True)
    t1 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        sys.exit("metassl train failed")
    train_s = time.perf_counter() - t1

    run = Path(args.run_dir)
    cfg = config.load(run / "config.yaml")
    d = cfg.data
    classes = {s: {p.name for p in split_folders(out, s, d.split_fractions, d.split_seed)[0]}
               for s in ("train", "val", "test")}
    result = json.loads((run / "result.json").read_text())
    test = result["test"]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(sys.argv),
        "folder": str(out), "characters": args.characters, "character_seed": args.seed,
        "split_fractions": list(d.split_fractions), "split_seed": d.split_seed,
        "classes": {s: len(names) for s, names in classes.items()},
        "intersection": {"train&val": len(classes["train"] & classes["val"]),
                         "train&test": len(classes["train"] & classes["test"]),
                         "val&test": len(classes["val"] & classes["test"])},
        # steps run: fewer than asked when train.max_minutes (28 in the config) stopped the run
        "steps": {"asked": cfg.train.steps, "run": result["steps"], "best": result["best_step"]},
        "best_val": result["best_val"],
        "test": {"n_way": test["protocol"]["n_way"], "k_shot": test["protocol"]["k_shot"],
                 "accuracy": test["mean"], "ci95": test["ci95"], "episodes": test["episodes"],
                 "norm_mode": test["protocol"]["norm_mode"]},
        "wall_s": {"write_folder": round(written_s, 1), "train_and_test": round(train_s, 1)},
    }
    (run / "imagefolder_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    t = report["test"]
    print(f"{t['n_way']}-way {t['k_shot']}-shot on {report['classes']['test']} held-out classes: "
          f"{100 * t['accuracy']:.2f} +- {100 * t['ci95']:.2f}% ({t['episodes']} episodes); "
          f"train/val/test {report['classes']['train']}/{report['classes']['val']}/{report['classes']['test']} "
          f"classes, intersections {list(report['intersection'].values())}")


if __name__ == "__main__":
    main()

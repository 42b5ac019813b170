"""Few-shot intent classification on CLINC150's meta-test intents: baselines and learned encoders.

    python experiments/bench_text.py tfidf [--class-split primary|domain_disjoint]
    python experiments/bench_text.py eval RUN [RUN ...] [--untrained]
    python experiments/bench_text.py ablate [--minutes 25] [--out runs/bench/text] [--variants ...]

`tfidf`: the bag-of-words baseline of the protocols document, re-measured: word TF-IDF
(scikit-learn, lower case, word unigrams) fitted on the meta-train intents' text only; each
episode's support texts are averaged per class into prototypes, and each query goes to the
nearest prototype by cosine similarity.

`eval`: the best checkpoint of each run directory (`metassl train` of a text config),
evaluated on the same episodes; `--untrained` adds the network as its config initialises it
(the random-init encoder: same architecture, no training).

`ablate`: the self-supervised recipe (`experiments/clinc150_smlmt.yaml`) with parts taken
away, on the same clock: SMLMT + SimCSE + MLM (the recipe), SMLMT + MLM, SMLMT only, MLM
only (`objective.meta_weight=0`: the masked-word tasks are made but not learned from), the
recipe on the domain-disjoint split, and the supervised ceiling
(`experiments/clinc150_supervised.yaml`). Each run is `metassl train --backend local` on
one core (`train.threads=1`, episodes made in the training process), `--at-once` at a time;
meta-val selects each checkpoint; then every run is evaluated as `eval` does, `--at-once`
runs side by side. A run directory that already holds a result.json (and test_cells.json) is
kept: an interrupted benchmark continues.

All methods see the same episodes: support from an intent's `train` utterances, 15 queries
from its `test` utterances, 5-way and 10-way, 1 and 5 shots, 1000 episodes of seed 0
(`EpisodeSampler`: episode i depends only on the split, the shape and the seed). Prints a
markdown table (mean +- 95% CI, 1.96 std / sqrt(episodes)).
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
from pathlib import Path

import numpy as np
import torch

SHAPES = [(5, 1), (5, 5), (10, 1), (10, 5)]
REPO = Path(__file__).resolve().parents[1]
RECIPE, CEILING = REPO / "experiments" / "clinc150_smlmt.yaml", REPO / "experiments" / "clinc150_supervised.yaml"
VARIANTS = {  # name: (config, overrides, what it is)
    "recipe": (RECIPE, [], "SMLMT + SimCSE + MLM"),
    "smlmt_mlm": (RECIPE, ["objective.simclr=0"], "SMLMT + MLM"),
    "smlmt_only": (RECIPE, ["objective.ssl_weight=0", "generator.ssl_views=false"], "SMLMT only"),
    "mlm_only": (RECIPE, ["objective.meta_weight=0", "objective.simclr=0"], "MLM only"),
    "domain_disjoint": (RECIPE, ["data.class_split=domain_disjoint"], "SMLMT + SimCSE + MLM, domain-disjoint split"),
    "supervised": (CEILING, [], "supervised ProtoNet on meta-train labels (ceiling)"),
}
QUERIES, EPISODES, SEED = 15, 1000, 0


def shared_clinc() -> str:
    here = Path(__file__).resolve().parents[1]
    for base in (os.environ.get("METASSL_SHARED_DATA"), here.parent / "shared" / "data"):
        if base and (Path(base) / "clinc150" / "data_full.json").is_file():
            return str(Path(base) / "clinc150")
    sys.exit("CLINC150 not found: set METASSL_SHARED_DATA to the folder holding clinc150/")


def ci(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{100 * values.mean():.2f} ± {100 * 1.96 * values.std(ddof=1) / np.sqrt(len(values)):.2f}"


def tfidf(class_split: str, folder: str) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from metassl.data.episodes import EpisodeSampler, FewShotSplit
    from metassl.data.text import read_split
    from metassl.evaluation import cosine_prototype_accuracies

    spec = f"clinc150:{folder}"
    train = read_split(spec, "train", class_split=class_split)
    test = read_split(spec, "test", class_split=class_split)
    vectorizer = TfidfVectorizer(lowercase=True).fit(train.texts)
    features = vectorizer.transform(test.texts).toarray().astype(np.float32)
    rows = torch.zeros(len(test.texts), 2, 1, dtype=torch.int64)  # the sampler reads labels and pools only
    split = FewShotSplit(rows, torch.from_numpy(test.labels.astype(np.int64)), test.class_names, test.name,
                         test.query_only)
    return [ci(cosine_prototype_accuracies(features, EpisodeSampler(split, n_way, k_shot, QUERIES, seed=SEED),
                                           EPISODES)) for n_way, k_shot in SHAPES]


def learned(run: str, untrained: bool) -> list[tuple[str, list[str]]]:
    from metassl.evaluation import evaluate_model
    from metassl.registry import build_backbone
    from metassl.trainer import load_trained

    cfg, learner, model, params, buffers, state = load_trained(run)
    versions = [(f"{Path(run).name} (step {state['step']})", params, buffers)]
    if untrained:
        fresh = build_backbone(cfg, learner)
        versions.append((f"{Path(run).name}: untrained", dict(fresh.named_parameters()),
                         dict(fresh.named_buffers())))
    rows = []
    for label, p, b in versions:
        cells = []
        for n_way, k_shot in SHAPES:
            res = evaluate_model(cfg, learner, model, {k: v.detach() for k, v in p.items()}, b, split="test",
                                 episodes=EPISODES, seed=SEED, n_way=n_way, k_shot=k_shot, n_query=QUERIES)
            cells.append(f"{100 * res.mean:.2f} ± {100 * res.ci95:.2f}")
        rows.append((label, cells))
    return rows


def ablate(names: list[str], minutes: float, out: Path, at_once: int, folder: str) -> None:
    common = ["train.threads=1", "generator.actors=0", f"data.dataset=clinc150:{folder}",
              f"train.max_minutes={minutes:g}"]
    todo = []
    for name in names:
        if (out / name / "result.json").is_file():
            continue
        shutil.rmtree(out / name, ignore_errors=True)  # unfinished: start it again, timed from nothing
        todo.append(name)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(todo), at_once):
        procs = []
        for name in todo[i:i + at_once]:
            cfg, sets, _ = VARIANTS[name]
            cmd = [sys.executable, "-m", "metassl.cli", "train", str(cfg), "--backend", "local", "--run-dir",
                   str(out / name), *[a for s in common + sets for a in ("--set", s)]]
            print("$", " ".join(cmd), flush=True)
            log = open(out / f"{name}.log", "w")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
        for name, proc, log in procs:
            if proc.wait() != 0:
                sys.exit(f"{name} failed: see {out / (name + '.log')}")
            log.close()
    # Evaluation is single-threaded: `at_once` runs are evaluated side by side, each by a process of
    # its own that leaves its cells in RUN/test_cells.json (kept, like result.json, on a re-run).
    pending = [n for n in names if not (out / n / "test_cells.json").is_file()]
    for i in range(0, len(pending), at_once):
        procs = [(n, subprocess.Popen([sys.executable, __file__, "eval", str(out / n), "--cells-to",
                                       str(out / n / "test_cells.json")], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                 for n in pending[i:i + at_once]]
        for name, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"evaluating {name} failed:\n{err.decode()[-2000:]}")
    print(f"each run: --backend local, one core, train.max_minutes={minutes:g}, {at_once} at a time")
    print("| variant | steps | train min | best meta-val % | 5w1s | 5w5s | 10w1s | 10w5s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        val = max(v for _, v in result["val_history"])
        cells = json.loads((out / name / "test_cells.json").read_text())
        print(f"| {VARIANTS[name][2]} | {result['steps']} | {result['train_minutes']:.1f} | {100 * val:.2f} | "
              + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tfidf")
    t.add_argument("--class-split", default="primary", choices=["primary", "domain_disjoint"])
    e = sub.add_parser("eval")
    e.add_argument("runs", nargs="+")
    e.add_argument("--untrained", action="store_true")
    e.add_argument("--cells-to", help="also write the (single) run's cells to this JSON file")
    a = sub.add_parser("ablate")
    a.add_argument("--minutes", type=float, default=25.0, help="train.max_minutes of each run")
    a.add_argument("--out", default="runs/bench/text")
    a.add_argument("--at-once", type=int, default=2, help="runs at a time (one core each)")
    a.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{datetime.date.today()}; {EPISODES} episodes, seed {SEED}, {QUERIES} queries per class")
    if args.what == "ablate":
        ablate(args.variants, args.minutes, Path(args.out).resolve(), args.at_once, shared_clinc())
        return
    print("| method | 5w1s | 5w5s | 10w1s | 10w5s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    if args.what == "tfidf":
        cells = tfidf(args.class_split, shared_clinc())
        print(f"| TF-IDF nearest prototype ({args.class_split} split) | " + " | ".join(cells) + " |")
        return
    if args.cells_to and (len(args.runs) != 1 or args.untrained):
        sys.exit("--cells-to takes one run and no --untrained")
    for run in args.runs:
        for label, cells in learned(run, args.untrained):
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
            if args.cells_to:
                Path(args.cells_to).write_text(json.dumps(cells))


if __name__ == "__main__":
    main()

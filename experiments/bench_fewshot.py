"""Foundation benchmarks: train a config, evaluate on meta-test, print a RESULTS.md row.

    python experiments/bench_fewshot.py protonet --data-root PATH/TO/omniglot
    python experiments/bench_fewshot.py maml --data-root PATH/TO/omniglot
    python experiments/bench_fewshot.py sinusoid
    python experiments/bench_fewshot.py umtra --data-root PATH/TO/omniglot
    python experiments/bench_fewshot.py cactus --data-root PATH/TO/omniglot
    python experiments/bench_fewshot.py unsupervised --data-root PATH/TO/omniglot --backend ray --workers 1

Each benchmark runs `metassl train` on its config (wall time measured around the whole
command, evaluation included), then `metassl eval --json` for extra episode shapes, and
prints the figures beside the gate they are held to.
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

BENCHMARKS = {
    # name: (config, extra eval shapes (n_way, k_shot), gate description)
    "protonet": ("omniglot_protonet.yaml", [(5, 5), (20, 1), (20, 5)], "5-way 1-shot >= 95% in <= 30 min"),
    "maml": ("omniglot_maml.yaml", [(5, 5)], "5-way 1-shot >= 90% in <= 30 min"),
    "sinusoid": ("sinusoid_maml.yaml", [], "baseline MSE / MAML MSE >= 3 (10-shot, 10 steps)"),
    "umtra": ("omniglot_umtra_protonet.yaml", [(5, 5), (20, 1), (20, 5)],
              "no labels in meta-training: 5-way 1-shot >= 92% in <= 20 min"),
    "cactus": ("omniglot_cactus_protonet.yaml", [(5, 5), (20, 1), (20, 5)], "reported beside UMTRA (no gate)"),
    "unsupervised": ("omniglot_unsupervised.yaml", [(5, 5), (20, 1), (20, 5)],
                     "no labels, Ray Train, combined objective + cluster refresh: 5-way 1-shot >= 95% in <= 60 min"),
}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, {platform.system()}"


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    lines = []
    with subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE) as proc:
        for line in proc.stdout:  # echo progress as it comes
            print(line, end="", flush=True)
            lines.append(line)
    if proc.returncode != 0:
        sys.exit(f"command failed with exit {proc.returncode}: {' '.join(cmd)}")
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--data-root", help="Omniglot folder (omniglot.npz or images_background/...)")
    parser.add_argument("--run-dir", help="default runs/bench/<benchmark>")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (--backend ray)")
    args = parser.parse_args()

    config, shapes, gate = BENCHMARKS[args.benchmark]
    run_dir = Path(args.run_dir or f"runs/bench/{args.benchmark}")
    overrides = [f"data.root={args.data_root}"] if args.data_root else []
    overrides += args.set
    cmd = METASSL + ["train", str(HERE / config), "--run-dir", str(run_dir), "--backend", args.backend]
    if args.backend == "ray":
        cmd += ["--workers", str(args.workers)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    train_out = run(cmd)
    minutes = (time.perf_counter() - t0) / 60
    print(train_out.strip().splitlines()[-2] if train_out.strip() else "")
    result = json.loads((run_dir / "result.json").read_text())
    rows = [(result["test"], minutes)]
    for n_way, k_shot in shapes:
        out = run(METASSL + ["eval", str(run_dir), "--n-way", str(n_way), "--k-shot", str(k_shot),
                             "--episodes", "1000", "--json"])
        rows.append((json.loads(out.strip().splitlines()[-1]), None))

    print(f"\n## {args.benchmark}: {gate}")
    print(f"- command: `python experiments/bench_fewshot.py {' '.join(sys.argv[1:])}`")
    print(f"- machine: {machine()}; date {datetime.date.today()}; steps {result['steps']}, "
          f"best step {result['best_step']}, train+eval wall time {minutes:.1f} min")
    print("| split | shape | metric | mean | 95% CI | episodes | norm | extra |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for res, _ in rows:
        p = res["protocol"]
        scale = 100 if res["metric"] == "accuracy" else 1
        extra = ", ".join(f"{k} {v:.3f}" for k, v in res.get("extra", {}).items() if not k.endswith("ci95"))
        print(f"| {p['split']} | {p['n_way']}-way {p['k_shot']}-shot | {res['metric']} | {scale * res['mean']:.2f} "
              f"| {scale * res['ci95']:.2f} | {res['episodes']} | {p['norm_mode']} | {extra} |")


if __name__ == "__main__":
    main()

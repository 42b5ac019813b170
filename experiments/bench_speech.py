"""Few-shot spoken keywords on Arabic Speech Commands' meta-test keywords: baselines and learned encoders.

    python experiments/bench_speech.py features
    python experiments/bench_speech.py eval RUN [RUN ...] [--untrained]
    python experiments/bench_speech.py ablate [--minutes 55] [--out runs/bench/speech] [--variants ...]

`features`: the hand-made baselines of the protocols document, re-measured: 13 MFCCs and their
deltas, mean and standard deviation over frames (52 numbers), and the flattened 40-band log-mel
spectrogram (librosa; 25 ms windows of 200 samples, 10 ms hop, at 8 kHz); also the MFCCs with
librosa's default framing (2048-sample windows, 512 hop, 128 mel bands), which scores higher
here, so that the strongest hand-made baseline is the one compared with. Each is standardised
with the mean and standard deviation of the meta-train keywords' clips; each episode's support
features are averaged per class into prototypes, and each query goes to the nearest prototype
by cosine similarity. Needs librosa: `pip install -e .[speech]`.

`eval`: the best checkpoint of each run directory (`metassl train` of a speech config) on the
same episodes; `--untrained` adds the network as its config initialises it (the random-init
encoder: same architecture, no training).

`ablate`: the self-supervised recipe (`experiments/speech_unsupervised.yaml`: audio UMTRA, then
clusters of the network's embedding, + CPC, no labels) with parts taken away, on the same clock:
both, pseudo-tasks only (no CPC), CPC only (`objective.meta_weight=0`: the episodes are made but
not learned from), and the supervised ceiling (`experiments/speech_supervised.yaml`, ProtoNet on
the meta-train keywords' labels). Each run is `metassl train` through Ray Train (1 worker, generator actors),
one at a time; meta-val selects each checkpoint (speaker-disjoint, as the runs' eval section
says); then every run is evaluated as `eval` does. A run directory that already holds a
result.json (and test_cells.json) is kept: an interrupted benchmark continues.

Every method sees the same episodes (`EpisodeSampler`: episode i depends only on the split, the
shape, the seed and the protocol): 5-way and 10-way, 1 and 5 shots, 15 queries, 1000 episodes of
seed 0, in both protocols: support and queries from any speakers, and speaker-disjoint (each
episode splits the 30 speakers into two random halves, support from one, queries from the
other). Prints markdown tables (mean +- 95% CI, 1.96 std / sqrt(episodes)).
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
PROTOCOLS = [(False, "any speakers"), (True, "speaker-disjoint")]
REPO = Path(__file__).resolve().parents[1]
RECIPE, CEILING = REPO / "experiments" / "speech_unsupervised.yaml", REPO / "experiments" / "speech_supervised.yaml"
VARIANTS = {  # name: (config, overrides, what it is)
    "both": (RECIPE, [], "audio pseudo-tasks + CPC"),
    "tasks_only": (RECIPE, ["objective.ssl_weight=0", "generator.ssl_views=false"], "audio pseudo-tasks only"),
    "cpc_only": (RECIPE, ["objective.meta_weight=0"], "CPC only"),
    "supervised": (CEILING, [], "supervised ProtoNet on meta-train keyword labels (ceiling)"),
}
QUERIES, EPISODES, SEED = 15, 1000, 0


def shared_speech() -> str:
    """The folder of Arabic Speech Commands: $METASSL_SHARED_DATA/arabic_speech_commands, else beside the repository."""
    candidates = [os.environ.get("METASSL_SHARED_DATA"), REPO.parent / "shared" / "data"]
    found = [Path(c) / "arabic_speech_commands" for c in candidates if c]
    for folder in found:
        if (folder / "asc_8k.npz").is_file():
            return str(folder)
    sys.exit("Arabic Speech Commands not found: set METASSL_SHARED_DATA to the folder holding arabic_speech_commands/")


def ci(values) -> str:
    from metassl.evaluation import mean_ci95

    mean, half = mean_ci95(values)
    return f"{100 * mean:.2f} ± {100 * half:.2f}"


def hand_made(waves: np.ndarray, kind: str) -> np.ndarray:
    """[N, F] features of `waves` [N, T] at 8 kHz: "mfcc" (13 + deltas, mean and std; 25 ms windows),
    "mfcc_long" (the same with librosa's default 2048-sample windows, 512 hop, 128 mel bands) or
    "logmel" (flattened)."""
    import librosa

    rows = []
    for w in waves:
        if kind in ("mfcc", "mfcc_long"):
            frames = dict(n_fft=200, hop_length=80, n_mels=40) if kind == "mfcc" else {}
            m = librosa.feature.mfcc(y=w, sr=8000, n_mfcc=13, **frames)
            f = np.concatenate([m, librosa.feature.delta(m)])
            rows.append(np.concatenate([f.mean(1), f.std(1)]))
        else:
            mel = librosa.feature.melspectrogram(y=w, sr=8000, n_fft=200, hop_length=80, n_mels=40)
            rows.append(librosa.power_to_db(mel).reshape(-1))
    return np.stack(rows).astype(np.float32)


def features(root: str) -> dict[str, list[str]]:
    from metassl.data.audio import load_audio
    from metassl.data.episodes import EpisodeSampler
    from metassl.evaluation import cosine_prototype_accuracies

    train = load_audio("arabic_speech_commands", "train", root=root)
    test = load_audio("arabic_speech_commands", "test", root=root)
    out = {}
    for kind, label in (("mfcc", "13 MFCC + deltas, mean and std"),
                        ("mfcc_long", "13 MFCC + deltas, mean and std, 256 ms windows"),
                        ("logmel", "flattened 40-band log-mel")):
        ref = hand_made(train.x[:, 0].numpy(), kind)
        mean, std = ref.mean(0), ref.std(0) + 1e-8
        feats = (hand_made(test.x[:, 0].numpy(), kind) - mean) / std
        for disjoint, protocol in PROTOCOLS:
            out[f"{label} ({protocol})"] = [
                ci(cosine_prototype_accuracies(feats, EpisodeSampler(test, n_way, k_shot, QUERIES, seed=SEED,
                                                                     disjoint_groups=disjoint), EPISODES))
                for n_way, k_shot in SHAPES]
    return out


def learned(run: str, untrained: bool) -> dict[str, list[str]]:
    from metassl.evaluation import evaluate_model
    from metassl.registry import build_backbone, build_sampler
    from metassl.trainer import load_trained

    cfg, learner, model, params, buffers, state = load_trained(run)
    versions = [(f"{Path(run).name} (step {state['step']})", params, buffers)]
    if untrained:
        fresh = build_backbone(cfg, learner)
        versions.append((f"{Path(run).name}: untrained", dict(fresh.named_parameters()),
                         dict(fresh.named_buffers())))
    rows = {}
    for disjoint, protocol in PROTOCOLS:
        samplers = [build_sampler(cfg, "test", n_way=n, k_shot=k, n_query=QUERIES, seed=SEED, disjoint_groups=disjoint)
                    for n, k in SHAPES]
        for label, p, b in versions:
            cells = []
            for (n_way, k_shot), sampler in zip(SHAPES, samplers):
                res = evaluate_model(cfg, learner, model, {k: v.detach() for k, v in p.items()}, b, split="test",
                                     episodes=EPISODES, seed=SEED, n_way=n_way, k_shot=k_shot, n_query=QUERIES,
                                     sampler=sampler)
                cells.append(f"{100 * res.mean:.2f} ± {100 * res.ci95:.2f}")
            rows[f"{label} ({protocol})"] = cells
    return rows


def ablate(names: list[str], minutes: float, out: Path, root: str) -> None:
    common = [f"data.root={root}", f"train.max_minutes={minutes:g}"]
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name / "result.json").is_file():
            continue
        shutil.rmtree(out / name, ignore_errors=True)  # unfinished: start it again, timed from nothing
        cfg, sets, _ = VARIANTS[name]
        cmd = [sys.executable, "-m", "metassl.cli", "train", str(cfg), "--workers", "1", "--run-dir",
               str(out / name), *[a for s in common + sets for a in ("--set", s)]]
        print("$", " ".join(cmd), flush=True)
        with open(out / f"{name}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode != 0:
                sys.exit(f"{name} failed: see {out / (name + '.log')}")
    for name in names:
        cells_file = out / name / "test_cells.json"
        if not cells_file.is_file():
            cells_file.write_text(json.dumps(learned(str(out / name), untrained=name == names[0])))
    print(f"each run: Ray Train, 1 worker, train.max_minutes={minutes:g}, one at a time")
    print("| variant | steps | train min | best meta-val % | protocol | 5w1s | 5w5s | 10w1s | 10w5s |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        val = max(v for _, v in result["val_history"])
        for label, cells in json.loads((out / name / "test_cells.json").read_text()).items():
            what = VARIANTS[name][2] + (" (untrained network)" if "untrained" in label else "")
            protocol = label.rsplit("(", 1)[1].rstrip(")")
            print(f"| {what} | {result['steps']} | {result['train_minutes']:.1f} | {100 * val:.2f} | {protocol} | "
                  + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("features")
    e = sub.add_parser("eval")
    e.add_argument("runs", nargs="+")
    e.add_argument("--untrained", action="store_true")
    a = sub.add_parser("ablate")
    a.add_argument("--minutes", type=float, default=55.0, help="train.max_minutes of each run")
    a.add_argument("--out", default="runs/bench/speech")
    a.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    root = shared_speech()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{datetime.date.today()}; {EPISODES} episodes, seed {SEED}, {QUERIES} queries per class")
    if args.what == "ablate":
        ablate(args.variants, args.minutes, Path(args.out).resolve(), root)
        return
    rows = features(root) if args.what == "features" else {
        k: v for run in args.runs for k, v in learned(run, args.untrained).items()}
    print("| method (protocol) | 5w1s | 5w5s | 10w1s | 10w5s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

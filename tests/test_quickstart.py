"""`make run`'s experiment on a tiny budget, as a user runs it: a fresh process on a quiet console."""
import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from metassl.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.steps=6", "--set", "train.log_every=3", "--set", "train.val_every=3",
        "--set", "train.val_episodes=10", "--set", "train.checkpoint_every=3", "--set", "eval.episodes=30",
        "--set", "episodes.n_way=16", "--set", "model.hidden=16"]


def test_quickstart_runs_actors_and_the_combined_objective_and_prints_both_networks(tmp_path):
    run = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "-m", "metassl.cli", "train", "experiments/quickstart.yaml", "--workers", "1",
         "--run-dir", str(run), *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert len(lines) <= 40, out
    # quiet: none of Ray's own lines, which go to ray.log and Ray's log folder (both named)
    assert not any(marker in out for marker in ("TrainController", "RayTrainWorker", "Reporting training result",
                                                "core_worker", "Token authentication")), out
    named = re.search(r"Ray's messages: (\S+); workers' output: (\S+) ", out)
    assert named and Path(named.group(1)) == run / "ray.log" and Path(named.group(1)).is_file(), out
    # the generator ran in Ray actors (each actor's log file in Ray's log folder names its class)
    actor_logs = [p for p in Path(named.group(2)).glob("worker-*.out") if ":actor_name:GeneratorActor" in p.read_text()]
    assert actor_logs, f"no GeneratorActor log in {named.group(2)}"
    # one progress line per log interval from the driver, with both parts of the objective
    progress = [line for line in lines if line.startswith("step ") and "episodes/s" in line]
    assert [line.split()[1] for line in progress] == ["3/6", "6/6"], out
    assert all("meta_loss" in line and "ssl_loss" in line and "ETA" in line for line in progress), out
    assert sum("meta-val accuracy" in line for line in lines) == 2, out
    # the untrained and the trained network, side by side, on the same test episodes
    table = re.search(r"omniglot test 5-way 1-shot accuracy, 30 episodes .*\n"
                      r"  untrained network +([\d.]+) \+- [\d.]+%\n"
                      r"  trained \(step \d\) +([\d.]+) \+- [\d.]+%", out)
    assert table, out
    result = json.loads((run / "result.json").read_text())
    assert abs(100 * result["untrained"]["mean"] - float(table.group(1))) < 0.006
    assert abs(100 * result["test"]["mean"] - float(table.group(2))) < 0.006
    assert result["test"]["protocol"]["split"] == "test" and result["test"]["protocol"]["num_classes"] == 423
    assert result["untrained"]["protocol"] == result["test"]["protocol"]
    assert f"tensorboard --logdir {run / 'tensorboard'}" in out
    # the run's report: written at the end of training, re-drawn by `metassl report`
    files = {name: run / name for name in ("report.md", "curves.png", "episodes.png")}
    assert f"report: {files['report.md']}" in out
    for name in ("curves.png", "episodes.png"):
        with Image.open(files[name]) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    report = files["report.md"].read_text()
    assert f"{table.group(2)}" in report and "untrained" in report
    before = files["curves.png"].stat().st_mtime_ns
    assert main(["report", str(run), str(run), "--out", str(tmp_path / "both.png")]) == 0
    assert files["curves.png"].stat().st_mtime_ns > before
    with Image.open(tmp_path / "both.png") as image:
        image.verify()

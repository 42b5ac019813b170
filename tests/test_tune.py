"""`metassl tune`: a small ASHA sweep, resuming a killed sweep, and meta-test kept out of tuning."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metassl import config
from metassl.data import FORBIDDEN_SPLITS_ENV, check_split_allowed
from metassl.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("ray_session")

# A poor outer learning rate (SGD at 1e4 sends the weights to infinity: chance accuracy)
# beside a good one, twice each; with 2 trials at a time ASHA compares them at steps 2 and 4.
SWEEP = ["model.hidden=8", "episodes.meta_batch=2", "train.steps=8", "train.val_every=2", "train.log_every=2",
         "train.val_episodes=20", "train.checkpoint_every=2", "eval.episodes=20", "tune.samples=2",
         "tune.concurrent=2", "optim.optimizer=sgd", "tune.space={optim.outer_lr: {grid: [0.05, 10000.0]}}"]


def _sweep_cfg(*extra):
    return config.load("experiments/digits_protonet.yaml", SWEEP + list(extra))


def test_sweep_stops_a_poor_trial_writes_its_outputs_and_reads_meta_test_only_at_the_end(tmp_path, monkeypatch):
    from metassl import registry
    from metassl.tune import run_tune

    out = tmp_path / "sweep"
    reads = []  # (split, whether the trial table existed yet) for every split this process loads
    load_split = registry.load_split

    def recording_load_split(spec, split, **kwargs):
        reads.append((split, (out / "trials.csv").exists()))
        return load_split(spec, split, **kwargs)

    monkeypatch.setattr(registry, "load_split", recording_load_split)
    lines = []
    summary = run_tune(_sweep_cfg(), out, log=lines.append)

    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 4 and summary["trials"] == 4
    steps = {r["trial_id"]: int(r["steps"]) for r in rows}
    best = summary["best_trial"]
    assert float(summary["values"]["optim.outer_lr"]) == 0.05
    assert steps[best] == 8
    assert any(r["status"] == "stopped early" and int(r["steps"]) < steps[best] for r in rows), rows
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # every trial's meta-val curve on one plot
    with Image.open(out / "curves.png") as image:
        image.verify()
    tuned = config.load(out / "best.yaml")
    assert tuned.optim.outer_lr == 0.05 and tuned.tune.space == {} and tuned.name == "digits_protonet_tuned"
    assert json.loads((out / "test_result.json").read_text())["test"]["protocol"]["split"] == "test"
    assert any("meta-val" in line for line in lines)
    # trials never write a meta-test result; this process reads meta-test once, after the table
    for r in rows:
        trial = json.loads((out / "runs" / r["trial_id"] / "result.json").read_text()) \
            if (out / "runs" / r["trial_id"] / "result.json").exists() else {}
        assert "test" not in trial
    assert [s for s, _ in reads].count("test") == 1
    assert all(table for s, table in reads if s == "test")


def test_trials_cannot_read_meta_test(monkeypatch):
    monkeypatch.setenv(FORBIDDEN_SPLITS_ENV, "test")
    with pytest.raises(DataError, match="'test' split may not be read"):
        check_split_allowed("test")
    check_split_allowed("val")
    from metassl.registry import build_sampler
    with pytest.raises(DataError, match="meta-val only"):
        build_sampler(config.load("experiments/digits_protonet.yaml"), "test", n_way=3, k_shot=1, n_query=2, seed=0)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, ray_session):
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "metassl.cli", "tune", "experiments/digits_protonet.yaml", "--out", str(out),
           "--concurrent", "1"]
    for o in SWEEP:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    finished = []
    while time.time() < deadline and not finished and proc.poll() is None:
        finished = list(out.glob("runs/*/result.json"))
        time.sleep(0.2)
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's driver dies mid-way
    proc.wait()
    assert not (out / "trials.csv").exists()
    first = {p.parent.name: p.stat().st_mtime_ns for p in finished}

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming the sweep" in done.stdout
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 4
    for trial_id, mtime in first.items():  # not trained again
        assert (out / "runs" / trial_id / "result.json").stat().st_mtime_ns == mtime


def test_bad_search_spaces_are_refused_before_any_trial(tmp_path):
    from metassl.tune import run_tune

    with pytest.raises(ConfigError, match="allows -1.0"):
        run_tune(_sweep_cfg("tune.space={optim.outer_lr: {uniform: [-1, 1]}}"), tmp_path / "a")
    with pytest.raises(ConfigError, match="tune.space is empty"):
        run_tune(_sweep_cfg("tune.space={}"), tmp_path / "b")
    with pytest.raises(ConfigError, match="optuna"):
        run_tune(_sweep_cfg("tune.search=optuna"), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_sweep_time_budget_reaches_tune(tmp_path, monkeypatch):
    from ray import tune

    from metassl.tune import run_tune

    class Recorded(Exception):
        pass

    def recording(**kwargs):
        raise Recorded(kwargs.get("time_budget_s"))

    monkeypatch.setattr(tune, "TuneConfig", recording)
    with pytest.raises(Recorded) as info:
        run_tune(_sweep_cfg("tune.max_minutes=1.5"), tmp_path / "sweep")
    assert info.value.args[0] == 90.0
    with pytest.raises(Recorded) as info:
        run_tune(_sweep_cfg(), tmp_path / "sweep2")
    assert info.value.args[0] is None
    with pytest.raises(config.ConfigError, match="tune.max_minutes=-1"):
        _sweep_cfg("tune.max_minutes=-1")

"""Run directories and episode shards in S3 (a local moto server), resume from there, credential errors."""
import json
import shutil

import pyarrow.fs as pafs
import pytest

from metassl import config
from metassl.cli import main
from metassl.errors import ConfigError, StorageError
from metassl.raytrain import run_ray
from metassl.storage import RunStore, cache_root, read_text
from metassl.trainer import load_trained, run_local

TINY = ["model.hidden=8", "episodes.meta_batch=2", "train.log_every=1", "train.val_every=2", "train.val_episodes=10",
        "train.checkpoint_every=1", "eval.episodes=10", "episodes.n_query=2"]


@pytest.fixture
def s3(ray_session, s3_endpoint):
    if s3_endpoint is None:
        pytest.skip("moto is not installed (pip install 'moto[server]'): no local S3 server")
    return pafs.FileSystem.from_uri("s3://metassl")[0]


def _files(fs, prefix):
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_ray_run_in_s3_keeps_everything_there_and_resumes_from_it(s3, tmp_path):
    shards = "s3://metassl/episodes/digits"
    assert main(["generate", "experiments/digits_protonet.yaml", "--out", shards, "--episodes", "8",
                 "--set", "generator.kind=augment", "--set", "episodes.n_query=2", "--set", "generator.actors=0"]) == 0
    assert "manifest.json" in _files(s3, "metassl/episodes/digits")

    def cfg(steps):
        return config.load("experiments/digits_protonet.yaml",
                           TINY + [f"train.steps={steps}", "storage=s3://metassl/runs", f"generator.shards={shards}"])

    run = "s3://metassl/runs/digits_protonet"
    run_ray(cfg(2), run, workers=1, log=lambda *_: None)
    files = _files(s3, "metassl/runs/digits_protonet")
    assert {"config.yaml", "result.json", "checkpoints/best.pt", "checkpoints/step_0000002.pt"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)

    shutil.rmtree(RunStore(run).local)  # another machine: nothing local, the resume comes from S3
    result = run_ray(cfg(4), run, workers=1, log=lambda *_: None)
    assert result["steps"] == 4 and result["resumed_at"] == [2]
    files = _files(s3, "metassl/runs/digits_protonet")
    assert "checkpoints/step_0000004.pt" in files
    assert json.loads(s3.open_input_stream("metassl/runs/digits_protonet/result.json").read())["steps"] == 4
    # the CLI's default run directory is storage/<name>, and eval reads the run from S3
    assert main(["eval", run, "--episodes", "10"]) == 0
    assert load_trained(run)[5]["step"] == 4


def test_storage_credentials_and_reachability_errors_are_clear(s3, tmp_path, monkeypatch):
    cfg = config.load("experiments/digits_protonet.yaml", TINY + ["train.steps=2"])
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not set"):
        run_local(cfg, "s3://metassl/runs/nokey", log=lambda *_: None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot list 's3://metassl/runs/away'"):
        run_local(cfg, "s3://metassl/runs/away", log=lambda *_: None)
    from metassl.tune import run_tune
    sweep_cfg = config.load("experiments/digits_protonet.yaml", TINY + [
        "train.steps=2", "tune.space={optim.outer_lr: {grid: [0.05]}}"])
    with pytest.raises(StorageError, match="cannot list 's3://metassl/sweeps/away'"):
        run_tune(sweep_cfg, "s3://metassl/sweeps/away", log=lambda *_: None)


def test_sweep_in_s3_keeps_its_state_trials_and_outputs_there(s3, tmp_path):
    from metassl.tune import run_tune

    sweep = "s3://metassl/sweeps/digits"
    cfg = config.load("experiments/digits_protonet.yaml", TINY + [
        "train.steps=4", "train.checkpoint_every=2", "tune.samples=1", "tune.concurrent=2", "optim.optimizer=sgd",
        "tune.grace_steps=4", "tune.space={optim.outer_lr: {grid: [0.05, 0.1]}}"])  # ASHA stops neither trial
    summary = run_tune(cfg, sweep, log=lambda *_: None)
    files = _files(s3, "metassl/sweeps/digits")
    assert {"trials.csv", "best.yaml", "test_result.json", "search.png"} <= files
    trials = {f.split("/")[1] for f in files if f.startswith("runs/")}
    assert len(trials) == 2 and summary["best_trial"] in trials
    for trial in trials:  # each trial's run directory, written by its Ray Train worker, is in S3
        assert {f"runs/{trial}/result.json", f"runs/{trial}/checkpoints/best.pt"} <= files
    assert summary["run_dir"] == f"{sweep}/runs/{summary['best_trial']}"
    assert "tuner.pkl" in files, sorted(files)  # Tune's own state, for resuming on another machine

    finished = json.loads(read_text(f"{sweep}/runs/{summary['best_trial']}/result.json"))
    assert finished["steps"] == 4  # what a resumed trial reads to report without retraining
    assert read_text(f"{sweep}/runs/none/result.json") is None

    shutil.rmtree(cache_root() / "runs")  # another machine: no local mirrors, the sweep resumes from S3 alone
    lines = []
    again = run_tune(cfg, sweep, log=lines.append)
    assert any("resuming the sweep" in line for line in lines)
    assert again["best_trial"] == summary["best_trial"] and again["trials"] == 2
    with pytest.raises(ConfigError, match="holds a training run, not a sweep"):
        run_tune(cfg, summary["run_dir"])

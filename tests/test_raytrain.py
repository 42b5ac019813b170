"""Meta-training on Ray Train: equivalence with one process, fault tolerance, resume."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from metassl import checkpoint, config
from metassl.raytrain import run_ray
from metassl.trainer import run_local

pytestmark = pytest.mark.usefixtures("ray_session")

BASE = ["model.hidden=8", "model.norm=layer", "learner.name=maml", "learner.inner_steps=1",
        "learner.eval_inner_steps=1", "episodes.meta_batch=8", "episodes.n_query=2", "train.log_every=1",
        "train.val_every=0", "train.val_episodes=5", "train.checkpoint_every=1", "eval.episodes=10"]


def _cfg(*extra, steps=3):
    return config.load("experiments/digits_protonet.yaml", BASE + [f"train.steps={steps}", *extra])


def _quiet(*_):
    pass


def test_two_workers_match_one_process_on_the_same_episodes(tmp_path):
    run_local(_cfg("episodes.meta_batch=8"), tmp_path / "one", log=_quiet)
    run_ray(_cfg("episodes.meta_batch=8"), tmp_path / "two", workers=2, log=_quiet)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "one", 3))["params"]
    b = checkpoint.load(checkpoint.step_path(tmp_path / "two", 3))["params"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert json.loads((tmp_path / "two" / "result.json").read_text())["steps"] == 3


def test_workers_fed_by_generator_actors_match_one_process_generating_inline(tmp_path):
    # Episode i is the same whichever actor makes it, so 2 Ray Train workers, each drawing
    # its half of every meta-batch from its own generator actor (auto: 1 each on 2 CPUs),
    # take the same steps as one process making the episodes itself, SSL included: NT-Xent
    # takes its negatives from both workers' views, as one process takes them from all.
    gen = ["learner.name=protonet", "generator.kind=augment", "generator.episodes_per_task=4",
           "generator.ssl_views=true", "objective.ssl_weight=0.5"]
    run_local(_cfg(*gen, "generator.actors=0"), tmp_path / "one", log=_quiet)
    run_ray(_cfg(*gen), tmp_path / "two", workers=2, log=_quiet)
    a = checkpoint.load(checkpoint.step_path(tmp_path / "one", 3))["params"]
    b = checkpoint.load(checkpoint.step_path(tmp_path / "two", 3))["params"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_local_run_directory_on_a_cluster_of_several_nodes_is_refused_before_any_worker_starts(
        tmp_path, monkeypatch):
    import ray

    from metassl import raytrain
    from metassl.errors import ConfigError

    nodes = ray.nodes()
    monkeypatch.setattr(raytrain.ray, "nodes", lambda: nodes + [{**nodes[0], "NodeID": "other", "Alive": True}])
    monkeypatch.setattr(raytrain, "TorchTrainer", None)  # starting workers would fail differently
    with pytest.raises(ConfigError, match=r"local path, but the Ray cluster has 2 nodes.*storage: s3://.*--run-dir"):
        run_ray(_cfg(), tmp_path / "run", workers=2, log=_quiet)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="placement='ANYWHERE' is not one of PACK"):
        run_ray(_cfg(), "s3://bucket/run", workers=2, placement="ANYWHERE", log=_quiet)
    # a dead node does not count, and a URI reaches every node
    monkeypatch.setattr(raytrain.ray, "nodes", lambda: nodes + [{**nodes[0], "NodeID": "gone", "Alive": False}])
    raytrain.check_storage_reaches_nodes(tmp_path / "run")
    monkeypatch.setattr(raytrain.ray, "nodes", lambda: nodes * 2)
    raytrain.check_storage_reaches_nodes("s3://bucket/prefix/run")


def _pgrep(*args):
    return [int(p) for p in subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()]


def _train_worker_pids():
    """Train worker processes of this test session's Ray instance (children of its raylet)."""
    raylets = _pgrep("-f", f"raylet.*{os.environ['RAY_TMPDIR']}")
    return [pid for raylet in raylets for pid in _pgrep("-P", str(raylet), "-f", "RayTrainWorker")]


def test_worker_killed_mid_run_is_replaced_and_the_run_finishes(tmp_path):
    run = tmp_path / "run"
    killed = []

    def kill_one_worker_after_a_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint.step_path(run, 4).exists():
            time.sleep(0.05)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_one_worker_after_a_checkpoint)
    killer.start()
    lines = []
    result = run_ray(_cfg("train.max_failures=2", steps=12), run, workers=2, log=lines.append)
    killer.join()
    assert killed, "no train worker process was found to kill"
    assert result["steps"] == 12
    saved = json.loads((run / "result.json").read_text())
    assert saved["loss_history"][-1][0] == 12
    # continued from the last checkpoint Ray had registered when the worker died, not from step 0
    assert saved["resumed_at"] and 1 <= saved["resumed_at"][0] <= 12


def test_rerunning_the_same_command_resumes_and_ends_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    run_ray(_cfg(steps=2), run, workers=1, log=_quiet)  # "interrupted" after its checkpoint at step 2
    result = run_ray(_cfg(steps=4), run, workers=1, log=_quiet)
    assert result["steps"] == 4 and result["resumed_at"] == [2]
    whole = run_local(_cfg(steps=4), tmp_path / "whole", log=_quiet)
    a = checkpoint.load(checkpoint.step_path(run, 4))["params"]
    b = checkpoint.load(checkpoint.step_path(tmp_path / "whole", 4))["params"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert whole["steps"] == 4


def test_worker_threads_come_from_the_cores_ray_and_the_os_both_give():
    from metassl.raytrain import _node_cores

    # the session's Ray instance counts 2 CPUs, whatever the machine has
    assert 1 <= _node_cores() <= min(2, len(os.sched_getaffinity(0)))


def test_a_diverging_run_on_ray_stops_once_naming_the_step_without_retries(tmp_path):
    from metassl.trainer import NonFiniteError

    t0 = time.perf_counter()
    with pytest.raises(NonFiniteError, match="step 1: the loss") as err:
        run_ray(_cfg("learner.inner_lr=1e30", steps=5), tmp_path, workers=2, log=_quiet)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["error"] == str(err.value) and saved["steps"] == 0
    assert checkpoint.latest(tmp_path) is None  # nothing saved from a non-finite step
    assert time.perf_counter() - t0 < 120  # one attempt: a divergence is not a worker failure to retry

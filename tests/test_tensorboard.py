"""A real TensorBoard server on 127.0.0.1 serves the run's scalars and hyperparameters."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from metassl import config
from metassl.trainer import run_local

TAGS = {"train/meta_loss", "train/ssl_loss", "train/query_acc", "val/acc", "val/ci95",
        "perf/episodes_per_s", "perf/wait_frac", "lr"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tb") / "run"
    cfg = config.load("experiments/digits_protonet.yaml", [
        "model.hidden=8", "generator.kind=augment", "generator.ssl_views=true", "objective.ssl_weight=0.5",
        "episodes.n_query=2", "train.steps=4", "train.log_every=2", "train.val_every=2",
        "train.val_episodes=5", "train.checkpoint_every=2", "eval.episodes=10"])
    run_local(cfg, run, log=lambda *_: None)
    return run


def test_tensorboard_serves_every_scalar_tag_over_http(ssl_run):
    port = _free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(exe), "--logdir", str(ssl_run), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tags, deadline = {}, time.time() + 60
        while time.time() < deadline:
            try:
                tags = _get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
                if tags and TAGS <= set().union(*(set(t) for t in tags.values())):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        served = set().union(*(set(t) for t in tags.values())) if tags else set()
        assert TAGS <= served, f"missing: {sorted(TAGS - served)}"
        plugins = _get(f"http://127.0.0.1:{port}/data/plugins_listing")
        assert plugins.get("hparams", {}).get("enabled"), "no HParams data served"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

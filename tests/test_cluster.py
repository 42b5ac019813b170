"""Cluster layout: every file in cluster/ passes Ray's own validation; `ray job submit` to a local head."""
import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))


def test_cluster_folder_has_launcher_configs_and_a_rayjob():
    names = {p.name for p in CLUSTER_FILES}
    assert {"aws.yaml", "gcp.yaml", "local.yaml", "kuberay-rayjob.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path):
    pytest.importorskip("jsonschema")
    data = yaml.safe_load(path.read_text())
    text = path.read_text()
    assert "aws_access_key_id" not in text.lower() and "secret" not in yaml.safe_dump(data.get("provider", {}))
    if data.get("kind") == "RayJob":
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        cr = {"metadata": data["metadata"], "spec": data["spec"]["rayClusterSpec"]}
        derived = _derive_autoscaling_config_from_ray_cr(cr)  # runs validate_config
        assert any(t["resources"].get("GPU") for t in derived["available_node_types"].values())
        assert "metassl" in data["spec"]["entrypoint"]
        return
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(data)))
    assert any("metassl" in c for c in data["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in data["head_start_ray_commands"] if "--head" in c)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None,
                    reason="the ray command is not installed beside this Python")
def test_ray_job_submit_to_a_local_head_runs_training_to_success(tmp_path, short_tmp_path):
    pytest.importorskip("aiohttp", reason="`ray job submit` needs ray[default]")
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    # Every port the head would otherwise take at a fixed default (6379, 8265, 52365, 10001, ...) is a free one.
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client = _free_ports(7)
    # The head's own token, handed to it and to every client (and through the head to the job's driver) in the
    # environment: nothing is read from, or written to, ~/.ray.
    token = secrets.token_hex(32)
    # The head's own temp folder (short: Ray's socket paths must fit 107 bytes), also as RAY_TMPDIR: its processes
    # look up "their" cluster in $RAY_TMPDIR/ray/ray_current_cluster, which must not be the test session's.
    temp_dir = short_tmp_path / "ray"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(short_tmp_path))
    env.pop("RAY_ADDRESS", None)
    head_log = tmp_path / "head.log"
    with open(head_log, "wb") as log:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}", "--num-cpus=2",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = tmp_path / "job_run"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while time.time() < deadline:  # wait for the dashboard (job server) to answer
            up = subprocess.run([ray_cli, "job", "list", "--address", address],
                                env=env, capture_output=True, text=True)
            if up.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail(f"the local head exited with status {head.returncode}: {_tail(head_log)}")
            time.sleep(1)
        else:
            pytest.fail(f"the local head's job server did not come up: {up.stderr[-1000:]}\n{_tail(head_log)}")
        # the head enforces its token: a client holding another one is turned away
        intruder = subprocess.run([ray_cli, "job", "list", "--address", address],
                                  env=dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32)), capture_output=True, text=True)
        assert intruder.returncode != 0 and "Invalid authentication token" in intruder.stderr, intruder.stderr[-1000:]
        job = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--working-dir", ".", "--",
             "metassl", "train", "experiments/digits_protonet.yaml", "--workers", "1", "--run-dir", str(run),
             "--set", "model.hidden=8", "--set", "train.steps=3", "--set", "train.val_every=3",
             "--set", "train.val_episodes=10", "--set", "eval.episodes=10"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        job_id = re.search(r"raysubmit_\w+", job.stdout + job.stderr).group(0)
        status = subprocess.run([ray_cli, "job", "status", "--address", address, job_id],
                                env=env, capture_output=True, text=True)
        assert re.search(r"job '?raysubmit_\w+'? succeeded", status.stdout + status.stderr, re.I), status.stdout
        assert json.loads((run / "result.json").read_text())["steps"] == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # stops this head only (`ray stop` would stop every instance)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()

"""Several processes on a node and several nodes in a cluster: downloads, storage, losing a node.

The two-node scenario runs in a subprocess that starts its own simulated Ray cluster
(`ray.cluster_utils.Cluster`: a head without CPUs and two 2-CPU worker nodes, each
with its own cache folder as separate machines would have), because the test session
may already hold a local Ray instance.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILL_AFTER_STEP = 4  # the node of rank 0 is lost once this step's checkpoint is in storage
STEPS = 12
SCENARIO = ["model.hidden=8", "model.norm=layer", "learner.name=protonet", "generator.kind=augment",
            "generator.episodes_per_task=2", "episodes.meta_batch=4", "episodes.n_query=2",
            # SGD: Adam would turn float noise in gradients that are zero in theory (ProtoNet's
            # distances ignore the last bias) into +-outer_lr steps and hide the comparison
            "optim.optimizer=sgd", "optim.outer_lr=0.05",
            "train.log_every=1", "train.val_every=0", "train.val_episodes=5", "train.checkpoint_every=2",
            "train.keep_checkpoints=20", "train.max_failures=2", "eval.episodes=10", f"train.steps={STEPS}",
            "train.threads=1",  # float results depend on the thread count: the same everywhere
            "train.precision=fp32"]  # and on bf16 autocast, which auto would pick on some machines


# ------------------------------------------------------------------ downloads on one node


def _fake_mirror(folder: Path) -> str:
    """A file:// base URL serving tiny images_background.zip and images_evaluation.zip."""
    folder.mkdir(parents=True)
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as zf:
            zf.writestr(f"{name}/Alpha/character01/0001_01.png", b"not read by this test")
    return folder.as_uri()


def _resolve_in_a_process(data_home: str, mirror: str, log: str, barrier) -> None:
    """One of several processes that find no Omniglot at once and resolve the default root."""
    os.environ["METASSL_DATA"] = data_home
    from metassl.data import download, omniglot

    fetch, fetch_all = download.fetch_zip_folder, omniglot.download_omniglot

    def counted_fetch(url, dest, folder, timeout_s=60.0):
        with open(log, "a") as f:
            f.write(f"fetch {folder} {os.getpid()}\n")
        time.sleep(0.3)  # a wide window for another process to start the same download
        return fetch(url, dest, folder, timeout_s)

    download.fetch_zip_folder = counted_fetch
    omniglot.download_omniglot = lambda dest: fetch_all(dest, mirror)
    barrier.wait()
    path, layout = omniglot.resolve_root(None)
    with open(log, "a") as f:
        f.write(f"done {layout} {','.join(sorted(p.name for p in path.iterdir()))}\n")


def test_processes_that_find_omniglot_missing_at_once_download_it_once(tmp_path):
    import multiprocessing

    mirror = _fake_mirror(tmp_path / "mirror")
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_resolve_in_a_process, args=(str(tmp_path / "data"), mirror, str(log), barrier))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0], log.read_text() if log.exists() else "no log"
    lines = log.read_text().splitlines()
    fetches = sorted(line.split()[1] for line in lines if line.startswith("fetch"))
    assert fetches == ["images_background", "images_evaluation"], lines  # each archive once
    done = [line for line in lines if line.startswith("done")]
    assert done == ["done folders images_background,images_evaluation"] * 3  # every process found the data
    assert len({line.split()[2] for line in lines if line.startswith("fetch")}) == 1  # by one process


def test_a_download_held_by_another_process_times_out_with_a_clear_error(tmp_path):
    from metassl.data.download import download_lock, download_omniglot
    from metassl.errors import DataError

    mirror = _fake_mirror(tmp_path / "mirror")
    with download_lock(tmp_path / "omniglot"):
        with pytest.raises(DataError, match=r"waited 0.2 s for another process downloading Omniglot"):
            download_omniglot(tmp_path / "omniglot", mirror, lock_timeout_s=0.2)
    assert not (tmp_path / "omniglot" / "images_background").exists()
    assert download_omniglot(tmp_path / "omniglot", mirror, lock_timeout_s=0.2).is_dir()  # released: it downloads


# ------------------------------------------------------------------ storage on several nodes


def test_a_local_sweep_directory_on_several_nodes_is_refused(ray_session, tmp_path, monkeypatch):
    from metassl import config, raytrain
    from metassl.errors import ConfigError
    from metassl.tune import run_tune

    nodes = ray_session.nodes()
    monkeypatch.setattr(raytrain.ray, "nodes", lambda: nodes + [{**nodes[0], "NodeID": "other", "Alive": True}])
    cfg = config.load("experiments/digits_protonet.yaml",
                      ["train.steps=2", "tune.space={learner.inner_lr: {choice: [0.1]}}"])
    with pytest.raises(ConfigError, match=r"sweep directory .* local path, but the Ray cluster has 2 nodes.*--out"):
        run_tune(cfg, tmp_path / "sweep", log=lambda *_: None)
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------ losing a node mid-run


def _list_checkpoint_steps(fs, path: str) -> list[int]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{path}/checkpoints", allow_not_found=True))
    return sorted(int(i.base_name[5:12]) for i in infos if i.base_name.startswith("step_"))


def _scenario(run_uri: str, out: str) -> None:
    """Train on a 2-node cluster, lose the node of rank 0 mid-run, add a replacement; write what was seen."""
    import pyarrow.fs as pafs
    import ray
    from ray._private import ray_constants
    from ray._private import state as ray_state
    from ray.cluster_utils import Cluster

    from metassl import config
    from metassl.errors import ConfigError
    from metassl.raytrain import run_ray
    from metassl.storage import RunStore

    t0 = time.perf_counter()
    base = Path(os.environ["RAY_TMPDIR"])
    node_args = dict(num_cpus=2, object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, object_store_memory=80 * 2**20,
        env_vars={"METASSL_CACHE": str(base / "cache-head")},
        # a lost node is declared dead after ~3 s instead of ~10 s
        _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}))
    caches = {}

    def add_node(i: int, wait: bool = True):
        caches[i] = base / f"cache-{i}"  # each node's own disk
        return cluster.add_node(wait=wait, **node_args, env_vars={"METASSL_CACHE": str(caches[i])})

    nodes = {i: add_node(i, wait=False) for i in (1, 2)}  # both start at once
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)  # the workers' lines reach this output, shown when the test fails
    seen = {"cluster_start_s": time.perf_counter() - t0}
    cfg = config.load("experiments/digits_protonet.yaml", SCENARIO)
    try:  # a local run directory on this cluster is refused before any worker starts
        run_ray(cfg, base / "local-run", workers=2, placement="STRICT_SPREAD")
    except ConfigError as e:
        seen["local_refused"] = str(e)

    fs, path = pafs.FileSystem.from_uri(run_uri)
    mirror = RunStore(run_uri).local.relative_to(Path(os.environ["METASSL_CACHE"]))

    def lose_a_node() -> None:
        deadline = time.perf_counter() + 150
        actor_nodes = set()
        while time.perf_counter() < deadline and max(_list_checkpoint_steps(fs, path), default=0) < KILL_AFTER_STEP:
            actor_nodes |= {a["Address"]["NodeID"] for a in ray_state.actors(actor_state_name="ALIVE").values()
                            if a["ActorClassName"] == "GeneratorActor"}
            time.sleep(0.2)
        seen["generator_actor_nodes"] = len(actor_nodes)
        # rank 0 works in a mirror of the run in its node's cache: that is the node to lose
        lead = next((i for i, c in caches.items() if (c / mirror / "checkpoints").is_dir()), None)
        if lead is None:
            seen["kill_error"] = "no node holds the run's mirror"
            return
        before = max(_list_checkpoint_steps(fs, path), default=0)
        t_kill = time.perf_counter()
        # a machine that dies takes all its processes at once: the raylet's children (the
        # train worker, the generator actor) too, which would otherwise outlive it for a while
        node = nodes.pop(lead)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for pid in _descendants(raylet):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cluster.remove_node(node, allow_graceful=False)
        print(f"lost node {lead} (rank 0) after step {before}'s checkpoint, {t_kill - t0:.1f} s in", flush=True)
        seen.update(killed_after_step=before, killed_lead_node=lead,
                    kill_at_s=t_kill - t0, remove_node_s=time.perf_counter() - t_kill)
        nodes[3] = add_node(3)  # the replacement machine
        seen["replacement_added_s"] = time.perf_counter() - t_kill
        while time.perf_counter() < deadline:  # recovered: a checkpoint after the kill reaches storage
            newer = [s for s in _list_checkpoint_steps(fs, path) if s > before]
            if newer:
                seen["recover_s"] = time.perf_counter() - t_kill
                return
            time.sleep(0.1)

    # Ray starts a node only from the main thread (it installs signal handlers): train in another
    outcome = {}

    def train() -> None:
        t_fit = time.perf_counter()
        try:
            outcome["result"] = run_ray(cfg, run_uri, workers=2, placement="STRICT_SPREAD")
        except BaseException as e:  # reported by the test
            outcome["error"] = f"{type(e).__name__}: {e}"
        seen["fit_s"] = time.perf_counter() - t_fit

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    lose_a_node()
    trainer.join(180)
    if "result" not in outcome:
        seen["train_error"] = outcome.get("error", "training did not finish in time")
        Path(out).write_text(json.dumps(seen))
        return
    result = outcome["result"]
    seen.update(steps=result["steps"], resumed_at=result["resumed_at"],
                loss_steps=[s for s, _ in result["loss_history"]],
                rank0_on_replacement=(caches[3] / mirror / "result.json").is_file() if 3 in caches else False,
                wall_s=time.perf_counter() - t0)
    Path(out).write_text(json.dumps(seen))
    ray.shutdown()
    cluster.shutdown()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_losing_a_node_mid_run_resumes_on_a_replacement_and_ends_as_an_uninterrupted_run(s3_endpoint, tmp_path,
                                                                                         short_tmp_path, monkeypatch):
    if s3_endpoint is None:
        pytest.skip("moto is not installed (pip install 'moto[server]'): no local S3 server")
    import torch.multiprocessing as mp

    from metassl import checkpoint, config
    from metassl.storage import RunStore

    run_uri = f"s3://metassl/multinode/{tmp_path.name}/run"
    ray_tmp = short_tmp_path  # the simulated cluster's own: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "METASSL_CACHE": str(ray_tmp / "cache-driver"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "seen.json"
    t0 = time.perf_counter()
    # its own process group: whatever the simulated cluster leaves behind is ended with it
    proc = subprocess.Popen([sys.executable, __file__, run_uri, str(out)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0 and out.is_file(), output[-8000:]
    seen = json.loads(out.read_text())
    assert "train_error" not in seen, seen
    print(f"\n2-node scenario: {json.dumps({k: v for k, v in seen.items() if k != 'loss_steps'})}, "
          f"test wall {wall:.1f} s")
    assert "storage: s3://" in seen.get("local_refused", ""), seen
    assert seen["generator_actor_nodes"] == 2  # each worker's generator actor on its own node
    assert "kill_error" not in seen and KILL_AFTER_STEP <= seen["killed_after_step"] < STEPS, seen
    assert "recover_s" in seen, seen
    assert seen["steps"] == STEPS and seen["resumed_at"], seen
    assert seen["resumed_at"][0] <= seen["killed_after_step"]
    assert seen["loss_steps"] == list(range(1, STEPS + 1))  # every step logged once, none lost or repeated

    # the run's parameters are those of an uninterrupted run of the same config with 2 workers
    # (two gloo processes running the same training loop; one process would differ by float
    # noise that ReLU and max-pool switches amplify over the steps)
    monkeypatch.setenv("METASSL_CACHE", str(tmp_path / "cache"))
    store = RunStore(run_uri)
    store.pull()
    cfg = config.load("experiments/digits_protonet.yaml", SCENARIO)
    whole = tmp_path / "whole"
    mp.start_processes(_uninterrupted_worker, args=(config.to_dict(cfg), str(whole), _free_port()), nprocs=2,
                       start_method="spawn")
    a = checkpoint.load(checkpoint.step_path(store.local, STEPS))["params"]
    b = checkpoint.load(checkpoint.step_path(whole / "rank0", STEPS))["params"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest parameter difference to the uninterrupted run: {diff:.3g}; "
          f"test wall {time.perf_counter() - t0:.1f} s")
    assert diff < 1e-6
    c = checkpoint.load(checkpoint.step_path(whole / "rank0", KILL_AFTER_STEP))["params"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3  # the comparison can fail


def _uninterrupted_worker(rank: int, cfg: dict, run_dir: str, port: int) -> None:
    """Rank `rank` of 2 training processes joined by a gloo process group, as Ray Train joins its workers."""
    import torch.distributed as dist

    from metassl.config import from_dict
    from metassl.trainer import LocalContext, train_loop

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ctx = LocalContext(generator_actors=0)
        ctx.rank, ctx.world = rank, 2
        train_loop(from_dict(cfg), f"{run_dir}/rank{rank}", ctx, log=lambda *_: None, final_eval=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _scenario(sys.argv[1], sys.argv[2])

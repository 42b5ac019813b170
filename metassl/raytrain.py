"""Meta-training on Ray Train (V2 APIs): a driver builds a `TorchTrainer` whose workers run `train_loop`.

Each worker computes the meta-gradient of its share of every meta-batch; one
explicit all-reduce (gloo on CPU) averages them, so all workers take the same outer
step. Rank 0 writes checkpoints, TensorBoard and `result.json` into the run
directory, which is also Ray's run folder (`storage_path/name`), and hands each
checkpoint to Ray. After a worker failure Ray restarts the group
(`FailureConfig(max_failures)`) and `train_loop` resumes from the last reported
checkpoint; re-running the same command resumes the same way.

On a cluster of several nodes the run directory must be a storage URI
(`s3://...`, `gs://...`): rank 0 may start on any node, and after a node is lost
the run resumes on another one from what storage holds.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from metassl import checkpoint
from metassl.config import Config, actors_per_worker, from_dict, to_dict
from metassl.data import FORBIDDEN_SPLITS_ENV
from metassl.errors import ConfigError, MetasslError
from metassl.storage import RunStore, is_uri
from metassl.trainer import check_data, check_resumable, raise_if_stopped, train_loop

STATE_FILE = "state.pt"  # the checkpoint file inside a Ray checkpoint directory
# Ray Train's controller polls workers every 2 s by default, which makes each
# `ray.train.report()` block for most of that; a shorter interval keeps reports cheap.
_FAST_REPORTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# Ray's placement strategies for the workers' bundles: PACK fills nodes in turn, SPREAD
# spreads when it can, STRICT_SPREAD puts every worker on its own node.
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")


class RayContext:
    """A Ray Train worker's view: its rank, the last reported checkpoint, and `ray.train.report`."""

    def __init__(self, generator_actors: int = 0, use_gpu: bool = False, actor_cpus: float = 1.0,
                 worker_cpus: float = 1.0):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.generator_actors = generator_actors  # this worker's episode-generating actors
        self.actor_cpus = actor_cpus  # the CPUs each of them asks Ray for
        self.worker_cpus = worker_cpus  # the CPUs this worker asks Ray for
        # the GPU Ray assigned to this worker (NCCL process group), else the CPU (gloo)
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def resume_state(self, run_dir: Path) -> tuple[dict, str] | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            return checkpoint.load(Path(folder) / STATE_FILE), f"Ray checkpoint {Path(ckpt.path).name}"

    def report(self, metrics: dict, checkpoint_path: Path | None) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if checkpoint_path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(checkpoint_path, Path(folder) / STATE_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _worker(loop_config: dict) -> None:
    os.environ.update(loop_config["env"])  # e.g. the splits a tuning trial may not read
    cfg = from_dict(loop_config["config"])
    if not cfg.train.threads:  # this node's cores, shared with its other workers
        torch.set_num_threads(max(1, _node_cores() // ray.train.get_context().get_local_world_size()))
    ctx = RayContext(loop_config["generator_actors"], loop_config["use_gpu"], loop_config["actor_cpus"],
                     loop_config["worker_cpus"])
    relay = loop_config.get("console")

    def log(line: str) -> None:
        _console(line)  # the worker's own log (Ray's log folder, or the console when verbose)
        if relay is not None:
            relay.put_nowait(line)

    if loop_config.get("loop") == "fit":
        from metassl.generative.fit import fit_loop
        fit_loop(cfg, loop_config["run_dir"], ctx, log=log)
    else:
        train_loop(cfg, loop_config["run_dir"], ctx, final_eval=loop_config["final_eval"], log=log)


class ConsoleRelay:
    """Rank 0's progress lines, printed by the driver while `fit()` runs (the quiet console).

    Workers' own output then stays in Ray's log folder: rank 0 puts each line into a Ray
    queue, and a thread of the driver hands it to `log`.
    """

    def __init__(self, log):
        from ray.util.queue import Queue

        self.log, self.queue = log, Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="metassl-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            try:
                line = self.queue.get(timeout=0.25)
            except queue.Empty:  # ray.util.queue.Empty is one
                continue
            except Exception:  # the queue's actor is gone: nothing more will come
                return
            self.log(line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown()


def _node_cores() -> int:
    """Cores this process may use: the fewer of the CPUs Ray gives this node and the cores the
    OS lets it run on (a local instance may count more logical CPUs than there are cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    node = ray.get_runtime_context().get_node_id()
    ray_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    return max(1, min(cores, int(ray_cpus) or cores))


def _console(line: str) -> None:
    """Write a progress line once: Ray Train's patched `print` would also log it, doubling it on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


_QUIET_SESSION = False  # this process started or joined Ray quietly (init_ray with quiet_log)
_STARTED_HERE = False  # the Ray instance of this process is a local one that init_ray started


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet_log: Path | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start a local Ray instance with `num_cpus` logical CPUs.

    With `quiet_log` (a file) Ray's messages in this process go to that file instead of
    the console, and workers' and actors' output stays in Ray's log folder (`ray_logs_dir`).
    """
    global _QUIET_SESSION, _STARTED_HERE
    if ray.is_initialized():
        return
    quiet, handler = {}, None
    _QUIET_SESSION = quiet_log is not None
    address = address or os.environ.get("RAY_ADDRESS")
    _STARTED_HERE = not address
    if quiet_log is not None:
        quiet_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(quiet_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        quiet = {"log_to_driver": False, "configure_logging": False}
        # ray.init(configure_logging=False) empties the "ray" logger's handlers, so during
        # the call its records reach the file through the root logger
        logging.getLogger().addHandler(handler)
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": _FAST_REPORTS}, **quiet)
            return
        os.environ.update({k: os.environ.get(k, v) for k, v in _FAST_REPORTS.items()})
        # The dashboard (on this machine's loopback only) serves Ray's state API, which Ray
        # Train's placement-group cleaner polls: without it a stopped run's CPUs are never
        # given back (and the cleaner logs a warning every second).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            for name in ("ray", "py.warnings"):  # from now on: Ray's records and Python warnings
                logger = logging.getLogger(name)
                logger.addHandler(handler)
                logger.propagate = False
            logging.getLogger("ray").setLevel(logging.INFO)
            logging.captureWarnings(True)


def ray_logs_dir() -> str:
    """The log folder of the connected Ray instance's session (where workers' output goes)."""
    try:
        from ray._private import worker as ray_worker  # no public API names this folder

        return ray_worker._global_node.get_logs_dir_path()
    except Exception:
        return "the logs/ folder of Ray's session directory"


def alive_nodes() -> int:
    """The number of alive nodes of the connected Ray cluster."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_storage_reaches_nodes(location: str | Path, what: str = "the run directory",
                                option: str = "--run-dir") -> None:
    """Raise ConfigError when `location` is a local path and the connected Ray cluster has several nodes.

    A local path names a folder on each node's own disk: rank 0 (which may start on any
    node, and move after a failure) would write checkpoints where the driver and a
    restarted run never look. Object storage is reachable from every node.
    """
    if is_uri(location):
        return
    nodes = alive_nodes()
    if nodes > 1:
        raise ConfigError(
            f"{what} {str(location)!r} is a local path, but the Ray cluster has {nodes} nodes: "
            f"workers on other nodes cannot reach it and a restarted run would not find its checkpoints. "
            f"Keep it in object storage: set `storage: s3://bucket/prefix` (or gs://...) in the config, "
            f"or pass a URI as {option} (e.g. {option} s3://bucket/prefix/NAME)")


def check_worker_share(cfg: Config, workers: int, fit: bool = False) -> None:
    """Raise ConfigError unless `workers` Ray Train workers can split the run's batches evenly:
    the meta-batch (`metassl train`), or the generative model's batch (`fit=True`: fit-generative)."""
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    key, value = (("generator.generative.batch_size", cfg.generator.generative.batch_size) if fit
                  else ("episodes.meta_batch", cfg.episodes.meta_batch))
    if value % workers:
        raise ConfigError(f"{key}={value} must be a multiple of --workers={workers} (each worker takes an "
                          f"equal share; --workers 1 runs any config)")


def run_ray(cfg: Config, run_dir: str | Path, *, workers: int = 2, address: str | None = None,
            log=print, final_eval: bool = True, callbacks: list | None = None, worker_cpus: float = 1.0,
            placement: str = "PACK", quiet: bool = False) -> dict:
    """Meta-train with `workers` Ray Train workers; return `result.json`'s dict.

    `final_eval=False` skips the meta-test evaluation (tuning); `callbacks` are Ray Train
    `UserCallback`s (tuning passes one that forwards validation reports to Tune);
    `worker_cpus` is each worker's CPU request (a tuning trial leaves a sliver to its driver);
    `placement` is Ray's placement strategy for the workers (`PLACEMENTS`; STRICT_SPREAD
    puts each worker on its own node). On a cluster of several nodes `run_dir` must be a
    storage URI. `quiet`: the console shows rank 0's progress lines (through `log`) and
    nothing of Ray's; Ray's messages go to `ray.log` in the run directory and workers'
    output to Ray's log folder, both named on the console.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    check_worker_share(cfg, workers)
    from metassl.generative.fit import fit_stage, generative_location

    store = RunStore(run_dir)  # a local folder, or a URI mirrored locally
    store.pull()
    from metassl.registry import tokenizer_location, tokenizer_stage

    # before any fit or vocabulary is made: the config as those stages will leave it
    check_resumable(generative_location(tokenizer_location(cfg, str(run_dir)), str(run_dir)), store.local)
    cfg = tokenizer_stage(cfg, str(run_dir))  # a text run's vocabulary, learned once (RUN/tokenizer.json)
    generates = cfg.generator.kind != "labelled" and not cfg.generator.shards
    # generative episodes without a fitted model: fit one first, on the same workers (RUN/generative),
    # in a Ray instance with the CPUs the meta-training will want
    cfg = fit_stage(cfg, str(run_dir), lambda c, location: run_ray_fit(
        c, location, workers=workers, address=address, log=log, placement=placement, quiet=quiet,
        min_cpus=_wanted_cpus(cfg, workers, generates)))
    check_data(cfg)  # a bad dataset fails here, not three times inside the workers
    _run_workers(cfg, store, {"final_eval": final_eval}, workers=workers, address=address, log=log,
                 callbacks=callbacks, worker_cpus=worker_cpus, placement=placement, quiet=quiet,
                 generates=generates)
    return raise_if_stopped(_result(store))


def _wanted_cpus(cfg: Config, workers: int, generates: bool) -> int:
    """Logical CPUs a local Ray instance started for this run gets: one per worker and per generator actor."""
    cpus = os.cpu_count() or 1
    actors = actors_per_worker(cfg.generator.actors, workers, cpus) if generates else 0
    return max(cpus, workers * (1 + actors))


def run_ray_fit(cfg: Config, run_dir: str | Path, *, workers: int = 2, address: str | None = None, log=print,
                placement: str = "PACK", quiet: bool = False, min_cpus: int = 0) -> dict:
    """Fit `generator.generative` on the meta-train images with `workers` Ray Train workers
    (`metassl.generative.fit.fit_loop`); return its `result.json`'s dict. Options as `run_ray`;
    a local Ray instance started here gets at least `min_cpus` logical CPUs (for what runs next)."""
    from metassl.registry import load_unlabelled

    check_worker_share(cfg, workers, fit=True)
    store = RunStore(run_dir)
    store.pull()
    load_unlabelled(cfg)  # a bad dataset fails here, not in the workers
    _run_workers(cfg, store, {"loop": "fit"}, workers=workers, address=address, log=log, callbacks=None,
                 worker_cpus=1.0, placement=placement, quiet=quiet, generates=False, min_cpus=min_cpus)
    return _result(store)


def _result(store: RunStore) -> dict:
    store.pull()
    result_file = store.local / "result.json"
    if not result_file.is_file():
        raise MetasslError(f"training on Ray finished without writing {result_file}")
    return json.loads(result_file.read_text())


def _run_workers(cfg: Config, store: RunStore, loop: dict, *, workers: int, address: str | None, log,
                 callbacks: list | None, worker_cpus: float, placement: str, quiet: bool, generates: bool,
                 min_cpus: int = 0) -> None:
    """Start (or join) Ray and run `_worker` on `workers` Ray Train workers in the run directory `store`."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    # Each worker needs one CPU, plus one per generator actor it starts. A Ray instance
    # started here gets that many logical CPUs even beyond the cores (the actors mostly
    # wait on backpressure); on a running cluster the actors share the CPUs the workers
    # leave (a fraction each, possibly 0), so that they can always be placed.
    address = address or os.environ.get("RAY_ADDRESS")
    # a Ray instance this process started itself for an earlier stage (a generative fit) is
    # sized as if it were started now
    running = bool(address) or (ray.is_initialized() and not _STARTED_HERE)
    # quiet only where this process starts or joins Ray: a Ray instance someone else set up
    # keeps its own logging, and its workers' output may already reach this console
    # (or one it set up quietly before, e.g. for fitting a generative model first)
    already = ray.is_initialized()
    quiet = quiet and (not already or _QUIET_SESSION)
    quiet_log = store.local / "ray.log" if quiet else None
    if running:
        init_ray(address, quiet_log=quiet_log)
        cpus = ray.cluster_resources().get("CPU", 0)
    else:
        cpus = os.cpu_count() or 1
    actors = actors_per_worker(cfg.generator.actors, workers, cpus) if generates else 0
    actor_cpus = 1.0
    if running and actors:
        actor_cpus = min(1.0, max(0.0, cpus - workers) / (workers * actors))
    init_ray(address, num_cpus=max(int(cpus), workers * (1 + actors), min_cpus), quiet_log=quiet_log)
    if quiet and not already:
        log(f"Ray's messages: {quiet_log}; workers' output: {ray_logs_dir()} (--verbose shows them here)")
    check_storage_reaches_nodes(store.location)  # before any worker starts
    use_gpu = _use_gpu(cfg.train.device, workers, ray.cluster_resources().get("GPU", 0))
    relay = ConsoleRelay(log) if quiet else None  # closed in the `finally` below
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": to_dict(cfg), "run_dir": store.location if store.remote else str(store.local),
                               "generator_actors": actors, "actor_cpus": actor_cpus, "worker_cpus": worker_cpus,
                               "use_gpu": use_gpu, **loop,
                               "console": relay.queue if relay is not None else None,
                               "env": {FORBIDDEN_SPLITS_ENV: os.environ.get(FORBIDDEN_SPLITS_ENV, "")}},
            # With use_gpu each worker also gets one GPU and the process group uses NCCL.
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": worker_cpus},
                                         placement_strategy=placement),
            run_config=RunConfig(
                # Ray's own run folder is the run directory: storage_path/name (local or a URI)
                name=store.name, storage_path=store.parent,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                callbacks=callbacks,
            ),
        )
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise MetasslError(f"training on Ray failed after {cfg.train.max_failures} retries: "
                           f"{_root_cause(e)}") from None
    finally:
        if relay is not None:
            relay.close()


def _use_gpu(setting: str, workers: int, gpus: float) -> bool:
    """Whether each of `workers` gets a GPU: `train.device` auto asks for one when the cluster has enough."""
    if setting == "cuda" and gpus < workers:
        raise ConfigError(f"train.device='cuda' with --workers={workers} needs {workers} GPUs; "
                          f"the Ray cluster has {gpus:g}")
    return setting == "cuda" or (setting == "auto" and gpus >= workers)


def _root_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    useful = [line for line in text if "Error" in line or "error" in line]
    return (useful[-1] if useful else text[-1] if text else type(error).__name__).strip()

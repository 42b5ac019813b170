"""`metassl tune`: Ray Tune sweeps over any config keys, selected on meta-validation only.

Each trial is a driver function that builds and fits a `TorchTrainer` through
`run_ray` (the Ray Train V2 way; not `Tuner(trainer)`), with the sampled values set
in the config. Validation reports reach Tune through Ray Train's `TuneReportCallback`;
ASHA stops trials whose meta-val score trails at a rung (`step` is the time axis).
Trials run with $METASSL_FORBIDDEN_SPLITS=test, so nothing in a trial can read the
meta-test classes; only the best trial's best checkpoint is evaluated on meta-test,
after the sweep.

A sweep folder holds Tune's state, `runs/<trial id>/` (each trial's run directory:
checkpoints, TensorBoard with HParams, result.json), `trials.csv`, `best.yaml` (ready
for `metassl train`), `test_result.json` and `search.png`. Running the same command
again resumes an interrupted sweep: finished trials are kept, unfinished ones resume
from their last checkpoint. The sweep folder may be a storage URI (`s3://...`), which is
what trials on several nodes need: Tune keeps its state there, each trial's run
directory is a URI below it, and the outputs are written locally and then uploaded.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from metassl import config
from metassl.config import Config
from metassl.data import FORBIDDEN_SPLITS_ENV
from metassl.errors import ConfigError, MetasslError
from metassl.storage import is_uri, join, list_names, read_text, split, upload

PLOT_AXES = ("learner.inner_lr", "optim.outer_lr")  # the heat map's axes when both are searched
TRIAL_CPUS = 0.1  # what the trial's driver function itself asks Ray for (its workers ask for their own)


def check_space(base: Config) -> None:
    """Build a config with every grid/choice value and both ends of every range, so a bad value fails now."""
    for key, spec in base.tune.space.items():
        kind, values = next(iter(spec.items()))
        for value in values:
            value = float(value) if kind in ("loguniform", "uniform") else value
            try:
                config.with_values(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"tune.space[{key!r}] allows {value!r}, which the config refuses: {e}") from None


def param_space(base: Config) -> dict:
    """Tune's search space: {config key: domain}."""
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(float(v[0]), float(v[1])),
            "uniform": lambda v: tune.uniform(float(v[0]), float(v[1])),
            "choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, spec in base.tune.space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" and base.tune.search == "optuna":
            raise ConfigError(f"tune.space[{key!r}] is a grid, which tune.search='optuna' cannot search; "
                              "use choice, or tune.search='random'")
        space[key] = make[kind](values)
    return space


def concurrency(base: Config, cpus: float) -> int:
    """Trials at once: `tune.concurrent`, else as many as the cluster's CPUs hold (at least 1)."""
    if base.tune.concurrent:
        return base.tune.concurrent
    per_trial = base.tune.workers * (1 + max(base.generator.actors, 0))  # TRIAL_CPUS comes out of a worker's
    return max(1, int(cpus // per_trial))


def _trial(values: dict, base: dict, sweep: str, threads: int) -> None:
    """One trial: train the config with `values` set on Ray Train, reporting meta-val to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from metassl.raytrain import run_ray

    class ValidationReports(TuneReportCallback):
        """Forward only the reports that carry a meta-val score (ASHA compares those)."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "val" in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    os.environ[FORBIDDEN_SPLITS_ENV] = "test"  # this process and its Ray Train workers
    cfg = config.with_values(config.from_dict(base), values)
    fixes = {}
    if cfg.generator.actors < 0:  # auto: generate inside the worker, trials share the CPUs
        fixes["generator.actors"] = 0
    if not cfg.train.threads:  # concurrent trials would oversubscribe the cores with torch's default
        fixes["train.threads"] = threads
    cfg = config.with_values(cfg, fixes)
    run_dir = join(sweep, "runs", tune.get_context().get_trial_id())  # a folder or a URI
    done = read_text(join(run_dir, "result.json"))
    if done is not None:  # finished before the sweep was interrupted: report it again, do not retrain
        result = json.loads(done)
        if result.get("best_val") is not None:
            tune.report({"step": result["steps"], "val": result["best_val"]})
            return
    run_ray(cfg, run_dir, workers=cfg.tune.workers, final_eval=False, callbacks=[ValidationReports()],
            log=lambda *_: None, worker_cpus=1.0 - TRIAL_CPUS)  # a trial uses whole CPUs


def _fit_once(base: Config, sweep: str, address: str | None, log) -> Config:
    """Generative episodes without a fitted model: fit it once into `sweep/generative` for all
    trials, unless the search changes how it is fitted (then every trial fits its own)."""
    from metassl.generative.fit import FIT_KEYS, fit_stage, needs_generative
    from metassl.raytrain import run_ray_fit

    fitted_keys = {f"generator.generative.{k}" for k in FIT_KEYS} | {"seed"}
    if not needs_generative(base) or fitted_keys & set(base.tune.space):
        return base
    return fit_stage(base, sweep, lambda c, location: run_ray_fit(c, location, workers=base.tune.workers,
                                                                    address=address, log=log))


def run_tune(base: Config, sweep_dir: str | Path, *, address: str | None = None, log=print) -> dict:
    """Run (or resume) the sweep of `base.tune` in `sweep_dir` (a folder or a storage URI);
    return the best trial's summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from metassl.raytrain import check_storage_reaches_nodes, init_ray
    from metassl.registry import is_regression
    from metassl.trainer import check_data

    if not base.tune.space:
        raise ConfigError("tune.space is empty: name the config keys to search, e.g. "
                          "tune.space={learner.inner_lr: {loguniform: [0.01, 1.0]}}")
    check_space(base)
    space = param_space(base)
    sweep = str(sweep_dir).rstrip("/") if is_uri(sweep_dir) else str(Path(sweep_dir).resolve())
    # the first touch of a storage URI: bad credentials or an unreachable store fail here, clearly
    if {"config.yaml", "result.json"} & set(list_names(sweep)):
        raise ConfigError(f"{sweep} holds a training run, not a sweep: choose another sweep directory (--out)")
    base = _fit_once(base, sweep, address, log)
    from metassl.registry import tokenizer_stage
    base = tokenizer_stage(base, sweep)  # a text sweep's trials share one vocabulary (SWEEP/tokenizer.json)
    check_data(base)  # train and val only: bad data fails before any trial starts
    mode = "min" if is_regression(base) else "max"
    init_ray(address)
    # trials run on any node: a local sweep folder would scatter their run directories
    check_storage_reaches_nodes(sweep, "the sweep directory", "--out")
    cpus = ray.cluster_resources().get("CPU", 1)
    grace = base.tune.grace_steps or base.train.val_every or base.train.steps
    # stop_last_trials=False: a trial that reaches train.steps ends by itself, after its
    # result.json is written (ASHA would otherwise stop it at its last report).
    scheduler = ASHAScheduler(time_attr="step", max_t=base.train.steps, grace_period=min(grace, base.train.steps),
                              reduction_factor=base.tune.reduction_factor, stop_last_trials=False)
    search_alg = None
    if base.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search='optuna' needs the optuna package: pip install 'metassl[optuna]'") from None
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=base.seed)
    concurrent = concurrency(base, cpus)
    threads = max(1, int(cpus // concurrent // base.tune.workers))  # torch threads per trial worker
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config.to_dict(base), sweep=sweep, threads=threads),
        {"cpu": TRIAL_CPUS})
    parent, name = split(sweep)
    run_config = tune.RunConfig(name=name, storage_path=parent,
                                failure_config=tune.FailureConfig(max_failures=base.tune.max_failures),
                                verbose=0)
    if tune.Tuner.can_restore(sweep):
        log(f"resuming the sweep in {sweep}: finished trials are kept")
        tuner = tune.Tuner.restore(sweep, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space, run_config=run_config,
            tune_config=tune.TuneConfig(metric="val", mode=mode, num_samples=base.tune.samples,
                                        time_budget_s=60 * base.tune.max_minutes or None,
                                        scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=concurrent))
    grid = tuner.fit()
    rows = trial_rows(grid, base, sweep, mode)
    with tempfile.TemporaryDirectory() as tmp:  # a sweep in storage: its outputs are uploaded from here
        return conclude(rows, base, sweep, Path(tmp) if is_uri(sweep) else Path(sweep), mode, log)


def conclude(rows: list[dict], base: Config, sweep: str, out: Path, mode: str, log=print) -> dict:
    """Write the sweep's outputs to `out` (uploading each to `sweep` when that is a URI): the
    table, the best config and heat map, then the best trial's meta-test result."""
    from metassl.trainer import load_trained

    def publish(name: str) -> Path:
        if is_uri(sweep):
            upload(out / name, join(sweep, name))
        return out / name

    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / "trials.csv")
    publish("trials.csv")
    if not any(r["status"] != "error" and r["val"] is not None for r in rows):
        raise MetasslError(f"no trial of the sweep in {sweep} reached a validation; see trials.csv"
                           f"{': ' + rows[0]['error'] if rows and rows[0]['error'] else ''}")
    log(format_table(rows, base))
    best = max((r for r in rows if r["val"] is not None), key=lambda r: r["val"] if mode == "max" else -r["val"])
    trained = load_trained(best["run_dir"])  # a trial in storage is fetched first
    # a text sweep's best.yaml names the sweep's vocabulary, not the cache copy load_trained evaluates with
    best_cfg = config.with_values(trained[0], {"name": f"{base.name}_tuned", "generator.actors": base.generator.actors,
                                               "tune.space": {}, "data.tokenizer": base.data.tokenizer})
    config.dump(best_cfg, out / "best.yaml")
    publish("best.yaml")
    plot_search(rows, base, out / "search.png")
    publish("search.png")
    plot_trial_curves(rows, out / "curves.png", log)
    if (out / "curves.png").is_file():
        publish("curves.png")
    log(f"best trial {best['trial_id']}: meta-val {best['val']:.4f} at step {best['best_step']}; "
        f"config {join(sweep, 'best.yaml')}")
    summary = {"best_trial": best["trial_id"], "val": best["val"], "values": best["values"],
               "run_dir": best["run_dir"], "trials": len(rows)}
    summary["test"] = evaluate_best(best_cfg, trained, log)
    (out / "test_result.json").write_text(json.dumps(summary, indent=2))
    publish("test_result.json")
    return summary


def trial_rows(grid, base: Config, sweep: str, mode: str) -> list[dict]:
    """One row per trial: sampled values, best meta-val, steps run, status."""
    rows = []
    for result in grid:
        values = {k: result.config.get(k) for k in base.tune.space}
        history = result.metrics_dataframe
        vals = [] if history is None or "val" not in history else [v for v in history["val"] if v == v]
        steps = int(history["step"].max()) if history is not None and "step" in history else 0
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(sweep, result.path)
        run_dir = join(sweep, "runs", trial_id)
        status = ("error" if result.error else "completed" if steps >= base.train.steps
                  else "stopped early")
        best = (max(vals) if mode == "max" else min(vals)) if vals else None
        best_step = None
        if best is not None:  # the step of the best validation
            best_step = int(history.loc[history["val"] == best, "step"].iloc[0])
        rows.append({"trial_id": trial_id, "values": values, "val": best, "steps": steps, "status": status,
                     "best_step": best_step, "run_dir": run_dir,
                     "error": str(result.error).strip().splitlines()[-1] if result.error else ""})
    return sorted(rows, key=lambda r: r["trial_id"])


def _trial_id_from_path(sweep: str, path: str) -> str:
    """The trial id of a trial that reported nothing, from its Tune folder name."""
    ids = list_names(join(sweep, "runs"))
    return next((i for i in ids if i in Path(path).name), Path(path).name)


def write_table(rows: list[dict], path: Path) -> None:
    keys = sorted({k for r in rows for k in r["values"]})
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial_id", *keys, "val", "steps", "status", "run_dir", "error"])
        for r in rows:
            out.writerow([r["trial_id"], *[r["values"].get(k) for k in keys], r["val"], r["steps"], r["status"],
                          r["run_dir"], r["error"]])


def format_table(rows: list[dict], base: Config) -> str:
    keys = list(base.tune.space)
    head = ["trial", *keys, "meta-val", "steps", "status"]
    body = [[r["trial_id"], *[_fmt(r["values"].get(k)) for k in keys],
             "-" if r["val"] is None else f"{r['val']:.4f}", str(r["steps"]), r["status"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_trial_curves(rows: list[dict], path: Path, log=print) -> None:
    """Every trial's meta-val curve (95% CI band) on one plot: where ASHA stopped each one."""
    from metassl.report import compare

    runs = [r["run_dir"] for r in rows if r["val"] is not None and not is_uri(r["run_dir"])
            and Path(r["run_dir"], "tensorboard").is_dir()]
    if not runs:  # trials kept in object storage: `metassl report` draws them on demand
        return
    try:
        compare(runs, path)
    except MetasslError as e:
        log(f"no trial curves ({e})")


def plot_search(rows: list[dict], base: Config, path: Path) -> None:
    """A PNG heat map of meta-val over two searched keys (inner_lr × outer_lr when both are searched).

    Each trial is a square at its sampled values, coloured by its best meta-val score;
    log axes for loguniform keys. With one searched key, meta-val is plotted against it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in base.tune.space
               if all(isinstance(r["values"].get(k), (int, float)) and not isinstance(r["values"].get(k), bool)
                      for r in rows)]
    axes = list(PLOT_AXES) if all(k in numeric for k in PLOT_AXES) else numeric[:2]
    done = [r for r in rows if r["val"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(axes) == 2:
        x, y = ([r["values"][k] for r in done] for k in axes)
        dots = ax.scatter(x, y, c=[r["val"] for r in done], cmap="viridis", marker="s", s=160, edgecolors="k")
        fig.colorbar(dots, ax=ax, label="meta-val")
        ax.set_ylabel(axes[1])
    elif axes:
        x = [r["values"][axes[0]] for r in done]
        ax.scatter(x, [r["val"] for r in done], c="C0")
        ax.set_ylabel("meta-val")
    else:
        ax.bar(range(len(done)), [r["val"] for r in done])
        ax.set_xticks(range(len(done)), [r["trial_id"] for r in done], rotation=45)
    for i, key in enumerate(axes):
        kind = next(iter(base.tune.space[key]))
        positive = all(r["values"][key] > 0 for r in done)
        if kind == "loguniform" or (positive and _spread(done, key) > 20):
            (ax.set_xscale if i == 0 else ax.set_yscale)("log")
    if axes:
        ax.set_xlabel(axes[0])
    ax.set_title(f"{base.name}: meta-val by trial ({len(done)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread(rows: list[dict], key: str) -> float:
    values = [r["values"][key] for r in rows]
    return max(values) / min(values) if values and min(values) > 0 else 1.0


def evaluate_best(cfg: Config, trained: tuple, log=print) -> dict:
    """Evaluate the best trial's best checkpoint (`load_trained`'s tuple) on meta-test (the only read of meta-test)."""
    from metassl.evaluation import evaluate_model

    _, learner, model, params, buffers, _ = trained
    res = evaluate_model(cfg, learner, model, params, buffers, split=cfg.eval.split, episodes=cfg.eval.episodes,
                         seed=cfg.eval.seed, inner_steps=cfg.eval.inner_steps)
    log(res.summary())
    return res.to_dict()


"""Fitting a VAE or GAN to the meta-train images without labels, on the same backends as meta-training.

`fit_loop` runs on every worker (in process, or on each Ray Train worker through
`metassl.raytrain.run_ray_fit`): step `t` draws `batch_size` images from the seeded
stream `[seed, t]`, each of `world` workers takes its share, and one explicit all-reduce
averages the gradients (for the GAN: one for the discriminator, one for the generator).
Rank 0 writes checkpoints, TensorBoard (ELBO parts or GAN losses, a grid of samples
every `sample_every` steps), `samples.png`, `reconstructions.png` (VAE) and
`result.json` into the fit's run directory; a re-run with the same run directory
resumes from its last checkpoint.

A fitted checkpoint holds the parameters, the generative config and a description of
the data it learned from (`data`: dataset, protocol, split, image shape, image count);
`load_generative` refuses files that are not one, and `check_fits` one whose images do
not have the run's shape.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from metassl import checkpoint, distributed
from metassl.config import Config, ConfigError, dump, from_dict, generator_kinds, to_dict
from metassl.errors import CheckpointError, DataError
from metassl.generative.models import decode, encode, gan_losses, init_params, latent_dim_of, model_of, vae_loss
from metassl.storage import RunStore, is_uri, join

KIND = "generative"  # `kind` of a fitted checkpoint
FIT_STREAM = 7_919  # the fit's random stream is [seed, FIT_STREAM, step]: apart from episode streams
# keys of generator.generative that change what is fitted (the others: how tasks are sampled, how long)
FIT_KEYS = ("model", "decoder", "latent_dim", "hidden", "beta", "batch_size", "lr")
GRID = 8  # samples per side of the sample grid
GAN_BETAS = (0.5, 0.999)


def needs_generative(cfg: Config) -> bool:
    """True when the run's episodes come (in part) from a generative model."""
    return "generative" in generator_kinds(cfg) and not cfg.generator.shards


def _source_keys(dataset: str) -> tuple[str, ...]:
    """The `data` keys that say which images a fit on `dataset` learned from."""
    if dataset.startswith("omniglot"):
        return "dataset", "protocol"
    if dataset.startswith("imagefolder"):
        return "dataset", "split_fractions", "split_seed"  # the class split of a plain folder of classes
    return ("dataset",)


def data_signature(cfg: Config, images: torch.Tensor) -> dict:
    """What the fit learned from: dataset, protocol, class split, and the images' count and shape."""
    d = cfg.data
    return {"dataset": d.dataset, "protocol": d.protocol, "split_fractions": list(d.split_fractions),
            "split_seed": d.split_seed, "split": "train", "images": len(images), "shape": list(images.shape[1:])}


def _fit_settings(cfg: Config) -> dict:
    gen = to_dict(cfg)["generator"]["generative"]
    return {"seed": cfg.seed, **{k: gen[k] for k in FIT_KEYS}}


def load_generative(location: str | Path) -> dict:
    """A fitted generative checkpoint (a `.pt`, or a fit's run directory: its best.pt), checked.

    `location` may be a storage URI of a run directory or file. CheckpointError names
    the file when it is missing, corrupt, not a generative checkpoint, or non-finite.
    """
    location = str(location)
    if is_uri(location):
        if location.endswith(".pt"):
            base, name = location.rsplit("/", 1)
            store = RunStore(base)
            store.pull()
            location = str(store.local / name) if (store.local / name).is_file() else str(store.local)
        else:
            store = RunStore(location)
            store.pull()
            location = str(store.local)
    path = checkpoint.resolve(location)
    state = checkpoint.load(path)
    if state.get("kind") != KIND or not isinstance(state.get("data"), dict) or "generative" not in state:
        raise CheckpointError(f"{str(path)!r} is a metassl checkpoint but not a fitted generative model "
                              "(make one with `metassl fit-generative CONFIG`)")
    try:
        model_of(state["params"])
        shape = [int(v) for v in state["data"]["shape"]]
        decode(state["params"], torch.zeros(1, latent_dim_of(state["params"])))
    except Exception as e:  # a foreign or edited parameter dict
        raise CheckpointError(f"{str(path)!r}: its parameters do not form a VAE or GAN decoder ({e})") from None
    state["data"]["shape"] = shape
    state["path"] = str(path)
    return state


def check_fits(state: dict, cfg: Config) -> None:
    """ConfigError when a fitted model's images are not the run's `[channels, image_size, image_size]`."""
    want = [cfg.data.channels, cfg.data.image_size, cfg.data.image_size]
    got = state["data"]["shape"]
    decoded = list(decode(state["params"], torch.zeros(1, latent_dim_of(state["params"]))).shape[1:])
    if got != want or decoded != want:
        raise ConfigError(f"generative checkpoint {state.get('path', '')!r} makes images of shape {decoded} "
                          f"(fitted on {state['data']['dataset']} {got}), but this run's data are {want} "
                          f"(data.channels, data.image_size); fit one on this data")
    # a model fitted on other images may have seen this run's validation or test classes
    ours = data_signature(cfg, torch.zeros(0))
    differ = [k for k in _source_keys(cfg.data.dataset) if state["data"].get(k) != ours[k]]
    if differ:
        pairs = ", ".join(f"data.{k}: {state['data'].get(k)!r} there, {ours[k]!r} here" for k in differ)
        raise ConfigError(f"generative checkpoint {state.get('path', '')!r} was fitted on other images than this "
                          f"run's meta-train split ({pairs}); it may have seen this run's validation or test "
                          "classes: fit one on this data")


def image_grid(images: torch.Tensor, side: int) -> torch.Tensor:
    """Tile `side * side` images `[B, C, H, W]` into one `[C, side*H, side*W]` image (missing tiles black)."""
    c, h, w = images.shape[1:]
    canvas = torch.zeros(c, side * h, side * w)
    for i, img in enumerate(images[: side * side]):
        r, col = divmod(i, side)
        canvas[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return canvas


@torch.no_grad()
def samples(params: dict, count: int, seed: int = 0) -> torch.Tensor:
    """`count` decoded prior samples `[count, C, H, W]` (fixed codes from `seed`)."""
    z = torch.randn(count, latent_dim_of(params), generator=torch.Generator().manual_seed(seed))
    return decode(params, z.to(next(iter(params.values())).device)).cpu()


@torch.no_grad()
def reconstructions(params: dict, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstructions (decoded posterior means) of `images`."""
    return decode(params, encode(params, images)[0])


def write_pictures(params: dict, images: torch.Tensor, folder: str | Path, seed: int = 0,
                   prefix: str = "") -> dict[str, Path]:
    """Write `{prefix}samples.png` (an 8x8 grid of prior samples) and, for a VAE,
    `{prefix}reconstructions.png` (rows alternate: 8 meta-train images, then their
    reconstructions) into `folder`; return the paths by kind."""
    import matplotlib.image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"samples": folder / f"{prefix}samples.png"}
    pictures = {"samples": image_grid(samples(params, GRID * GRID, seed), GRID)}
    if model_of(params) == "vae":
        pick = np.random.default_rng(seed).choice(len(images), size=GRID * GRID // 2, replace=False)
        x = images[torch.from_numpy(pick)]
        rows = torch.stack([x.view(GRID // 2, GRID, *x.shape[1:]),
                            reconstructions(params, x).view(GRID // 2, GRID, *x.shape[1:])], 1)
        pictures["reconstructions"] = image_grid(rows.reshape(-1, *x.shape[1:]), GRID)
        out["reconstructions"] = folder / f"{prefix}reconstructions.png"
    for name, grid in pictures.items():
        array = grid.permute(1, 2, 0).numpy()
        array = array[..., 0] if array.shape[-1] == 1 else array
        matplotlib.image.imsave(out[name], np.clip(array, 0, 1), cmap="gray", vmin=0, vmax=1)
    return out


def _check_resumable(saved: dict, cfg: Config, signature: dict, run_dir: Path) -> None:
    old = from_dict(saved["config"])
    changed = [k for k, v in _fit_settings(cfg).items() if _fit_settings(old).get(k) != v]
    if saved["data"] != signature:
        changed.append(f"data ({saved['data']} vs {signature})")
    if changed:
        raise ConfigError(f"{str(run_dir)!r} holds a fit with different settings ({', '.join(changed)} differ); "
                          "use another run directory")


def fit_loop(cfg: Config, run_dir: str | Path, ctx, log=print) -> dict | None:
    """Fit `cfg.generator.generative` on the meta-train images (worker `ctx.rank` of `ctx.world`).

    Rank 0 returns the result dict (also written as `result.json`); `run_dir` may be a URI.
    """
    from torch.utils.tensorboard import SummaryWriter

    from metassl.registry import load_unlabelled

    gen, lead = cfg.generator.generative, ctx.rank == 0
    if gen.batch_size % ctx.world:
        raise ConfigError(f"generator.generative.batch_size={gen.batch_size} must be a multiple of the "
                          f"{ctx.world} workers")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    images = load_unlabelled(cfg)  # [M, C, H, W] in [0, 1]
    if len(images) < gen.batch_size:
        raise DataError(f"generator.generative.batch_size={gen.batch_size} but the meta-train split has "
                        f"{len(images)} images")
    signature = data_signature(cfg, images)
    params, buffers = init_params(gen.model, channels=images.shape[1], image_size=images.shape[-1],
                                  latent_dim=gen.latent_dim, hidden=gen.hidden, seed=cfg.seed, decoder=gen.decoder)
    device = ctx.device  # images stay on the CPU; each batch goes to the device
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    groups, opts = _optimizers(gen.model, params, gen.lr)

    store = RunStore(run_dir)
    if lead:
        store.pull()
    run_dir = store.local
    start, history = 0, []
    resumed = ctx.resume_state(run_dir)
    if resumed is not None:
        state, name = resumed
        if state.get("kind") != KIND:
            raise CheckpointError(f"{str(run_dir)!r} holds a meta-training run, not a generative fit")
        _check_resumable(state, cfg, signature, run_dir)
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        buffers.update({k: v.to(device) for k, v in state["buffers"].items()})
        for name_, opt in opts.items():
            opt.load_state_dict(state["optimizer"][name_])
        start, history = state["step"], list(state.get("history", []))
        if lead:
            log(f"resuming the {gen.model} fit in {run_dir} from {name} (step {start})")
    writer = None
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(cfg, run_dir / "config.yaml")
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    deadline = time.perf_counter() + 60 * gen.max_minutes if gen.max_minutes else math.inf
    t0, window_t, window_steps, step = time.perf_counter(), time.perf_counter(), 0, start

    def save(step: int) -> Path:
        path = checkpoint.step_path(run_dir, step)
        checkpoint.save(path, {"kind": KIND, "step": step, "config": to_dict(cfg), "data": signature,
                               "generative": to_dict(cfg)["generator"]["generative"],
                               "params": params, "buffers": buffers, "history": history,
                               "optimizer": {k: o.state_dict() for k, o in opts.items()}})
        checkpoint.mark_best(run_dir, path)  # the latest fit is the one to use
        checkpoint.prune(run_dir, cfg.train.keep_checkpoints)
        writer.flush()
        store.push()
        return path

    while step < gen.steps:
        metrics = fit_step(gen.model, params, buffers, groups, opts, images, step, seed=cfg.seed,
                           batch_size=gen.batch_size, beta=gen.beta, lr=gen.lr, rank=ctx.rank, world=ctx.world)
        step += 1
        window_steps += 1
        out_of_time = distributed.any_true(time.perf_counter() > deadline)
        last = step == gen.steps or out_of_time
        if step % cfg.train.log_every == 0 or last:
            metrics = distributed.average_metrics(metrics)
            rate = window_steps * gen.batch_size / max(time.perf_counter() - window_t, 1e-9)
            window_t, window_steps = time.perf_counter(), 0
            if lead:
                prefix = "vae" if gen.model == "vae" else "gan"
                for k, v in metrics.items():
                    writer.add_scalar(f"{prefix}/{k}", v, step)
                writer.add_scalar("perf/images_per_s", rate, step)
                history.append([step, metrics["neg_elbo" if gen.model == "vae" else "d_loss"]])
                log(f"{gen.model} step {step}/{gen.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    + f" | {rate:.0f} images/s")
            ctx.report({**metrics, "step": step}, None)
        if lead and (step % gen.sample_every == 0 or last):
            writer.add_image("samples", image_grid(samples(params, GRID * GRID), GRID), step)
        if step % cfg.train.checkpoint_every == 0 or last:
            saved = save(step) if lead else None
            ctx.report({"step": step}, saved)
        if out_of_time:
            if lead:
                log(f"stopping the fit at step {step}: generator.generative.max_minutes={gen.max_minutes} reached")
            break
    if not lead:
        return None
    if not checkpoint.best_path(run_dir).exists():
        save(step)
    pictures = write_pictures({k: v.detach().cpu() for k, v in params.items()}, images, run_dir)
    result = {"name": cfg.name, "kind": KIND, "model": gen.model, "steps": step, "history": history,
              "final": history[-1][1] if history else None, "data": signature,
              "train_minutes": (time.perf_counter() - t0) / 60,
              "checkpoint": str(checkpoint.best_path(run_dir)), "pictures": {k: str(v) for k, v in pictures.items()}}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    writer.close()
    store.push()
    log(f"{gen.model} fitted in {result['train_minutes']:.1f} min: {run_dir / 'checkpoints' / 'best.pt'} "
        f"(samples: {pictures['samples']})")
    return result


def _optimizers(model: str, params: dict, lr: float) -> tuple[dict, dict]:
    """`(groups, optimizers)`: Adam over all of a VAE's parameters; for a GAN, one Adam for D and one for G."""
    groups = {"vae": list(params)} if model == "vae" else {
        "d": [k for k in params if k.startswith("D.")], "g": [k for k in params if k.startswith("G.")]}
    betas = GAN_BETAS if model == "gan" else (0.9, 0.999)
    return groups, {name: torch.optim.Adam([params[k] for k in keys], lr=lr, betas=betas)
                    for name, keys in groups.items()}


def fit_step(model: str, params: dict, buffers: dict, groups: dict, opts: dict, images: torch.Tensor, step: int, *,
             seed: int, batch_size: int, beta: float, lr: float, rank: int = 0, world: int = 1) -> dict:
    """Fit step `step` (0-based) on worker `rank` of `world`; returns this worker's losses.

    The batch is `batch_size` images drawn from the stream `[seed, FIT_STREAM, step]`, each
    worker taking its share; gradients are averaged over the workers. DataError on every
    worker alike when a loss is not finite.
    """
    per = batch_size // world
    rng = np.random.default_rng([seed, FIT_STREAM, step])
    rows = rng.choice(len(images), size=batch_size, replace=False)[rank * per:(rank + 1) * per]
    noise = torch.Generator().manual_seed(int(rng.integers(2**62)) + rank)
    x = images[torch.from_numpy(rows)].to(next(iter(params.values())).device)
    if model == "vae":
        loss, metrics = vae_loss(params, x, noise, beta)
        _step(opts["vae"], [params[k] for k in groups["vae"]], loss)
    else:
        d_loss, g_loss, metrics = gan_losses(params, buffers, x, noise)
        # a simultaneous update: both gradients come from this step's forward pass
        d_params, g_params = [params[k] for k in groups["d"]], [params[k] for k in groups["g"]]
        d_grads = torch.autograd.grad(d_loss, d_params, retain_graph=True)
        g_grads = torch.autograd.grad(g_loss, g_params)
        _apply(opts["d"], d_params, d_grads)
        _apply(opts["g"], g_params, g_grads)  # the power-iteration vectors stay equal on every
        # worker: they are a function of D's weights, which the averaged updates keep equal
    if distributed.any_true(not all(math.isfinite(v) for v in metrics.values())):  # every rank stops
        raise DataError(f"the {model} fit diverged at step {step + 1} (this worker's losses: {metrics}); lower "
                        f"generator.generative.lr (now {lr})")
    return metrics


class Refit:
    """A fitted model's fit, continued at the self-improving loop's refresh points (`refit_steps`).

    Built from a fitted checkpoint (`load_generative`) with its optimizer state, it runs the
    fit's next steps with the fit's own settings (seed, batch size, learning rate, beta) and
    random stream, so `advance(n)` after a fit of `s` steps gives the model a fit of `s + n`
    steps would. Every worker holds one and advances it alike (gradients all-reduced), so
    all of them publish the same weights. `state_dict()` goes into the run's checkpoints.
    """

    def __init__(self, state: dict, images: torch.Tensor, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        settings = state["generative"]
        self.model, self.seed = settings["model"], int(state["config"]["seed"])
        self.batch_size, self.beta, self.lr = settings["batch_size"], settings["beta"], settings["lr"]
        if self.batch_size % world:
            raise ConfigError(f"generator.generative.refit_steps: the fit's batch_size={self.batch_size} must be a "
                              f"multiple of the {world} workers")
        if "optimizer" not in state:
            raise CheckpointError(f"{state.get('path', '')!r} has no optimizer state: it cannot be refitted")
        self.images, self.rank, self.world, self.device = images, rank, world, device
        self.params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["params"].items()}
        self.buffers = {k: v.detach().clone().to(device) for k, v in state["buffers"].items()}
        self.groups, self.opts = _optimizers(self.model, self.params, self.lr)
        for name, opt in self.opts.items():
            opt.load_state_dict(state["optimizer"][name])
        self.step = int(state["step"])

    def advance(self, steps: int) -> dict:
        """Run the fit's next `steps` steps; return the losses of the last one (averaged over workers)."""
        metrics = {}
        for _ in range(steps):
            metrics = fit_step(self.model, self.params, self.buffers, self.groups, self.opts, self.images,
                               self.step, seed=self.seed, batch_size=self.batch_size, beta=self.beta, lr=self.lr,
                               rank=self.rank, world=self.world)
            self.step += 1
        return distributed.average_metrics(metrics) if metrics else {}

    def weights(self) -> dict:
        """CPU copies of the decoder's current parameters (what episodes are decoded with)."""
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    def state_dict(self) -> dict:
        return {"params": self.weights(), "buffers": {k: v.cpu() for k, v in self.buffers.items()},
                "optimizer": {k: o.state_dict() for k, o in self.opts.items()}, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
        self.buffers.update({k: v.to(self.device) for k, v in state["buffers"].items()})
        for name, opt in self.opts.items():
            opt.load_state_dict(state["optimizer"][name])
        self.step = int(state["step"])


def _step(opt, params: list, loss: torch.Tensor) -> None:
    _apply(opt, params, torch.autograd.grad(loss, params))


def _apply(opt, params: list, grads) -> None:
    grads = distributed.average_gradients(list(grads))
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


def run_fit_local(cfg: Config, run_dir: str | Path, log=print) -> dict:
    """Fit the generative model in this process; returns `result.json`'s dict."""
    from metassl.trainer import LocalContext, local_device

    return fit_loop(cfg, run_dir, LocalContext(0, local_device(cfg.train.device)), log)


def generative_location(cfg: Config, run_dir: str) -> Config:
    """`cfg` with `generator.generative.checkpoint` set: as given, or `run_dir/generative` where
    `fit_stage` fits one (the config a run directory records, so that a re-run compares equal)."""
    gen = cfg.generator.generative
    if not needs_generative(cfg) or gen.checkpoint is not None:
        return cfg
    location = join(run_dir if is_uri(run_dir) else str(Path(run_dir).resolve()), "generative")
    return replace(cfg, generator=replace(cfg.generator, generative=replace(gen, checkpoint=location)))


def check_task_sampling(cfg: Config) -> None:
    """DataError now (before any fit) when LASIUM's anchors cannot be placed `threshold` apart."""
    from metassl.generative.latent import far_anchors

    gen = cfg.generator.generative
    far_anchors(np.random.default_rng(0), cfg.episodes.n_way, gen.latent_dim, gen.threshold)


def fit_stage(cfg: Config, run_dir: str, fit) -> Config:
    """`generative_location(cfg, run_dir)`, fitting the model first when the run is to fit its own.

    The fit goes into `run_dir/generative` with `fit(cfg, location)` (a backend's runner);
    a finished fit there (its result.json) is reused when its settings and data are this
    config's (else ConfigError), an unfinished one resumes; so re-running a `metassl
    train` command repeats neither the fit nor its config change.
    """
    if not needs_generative(cfg) or cfg.generator.generative.checkpoint is not None:
        return cfg
    check_task_sampling(cfg)
    located = generative_location(cfg, run_dir)
    location = located.generator.generative.checkpoint
    store = RunStore(location)
    store.pull()
    if (store.local / "result.json").is_file():
        from metassl.registry import load_unlabelled

        state = load_generative(location)
        _check_resumable(state, cfg, data_signature(cfg, load_unlabelled(cfg)), store.local)
    else:
        fit(cfg, location)
    return located

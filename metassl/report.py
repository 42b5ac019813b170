"""Run reports: learning curves, the episodes a run trained on, a Markdown summary; runs side by side.

`write_report(RUN)` reads what training leaves in a run directory (`result.json`,
`config.yaml`, the TensorBoard scalars under `tensorboard/`) and writes `curves.png`,
`episodes.png` (generated episodes only) and `report.md` beside them. `compare` draws
several runs' meta-val curves on one plot. Whatever a run lacks (an error run has no
test result, a sinusoid run has `val/mse` instead of `val/acc`) is left out of the
report, never an error. Nothing here needs Ray.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from metassl.config import Config, ConfigError, is_audio_config, is_text_config, load
from metassl.errors import MetasslError
from metassl.generative.fit import needs_generative, write_pictures

MAX_CLASSES, MAX_QUERIES, MAX_SHOTS = 8, 3, 5  # what an episode grid shows of a (64-way) episode
SHOWN_EPISODES = 3  # episodes 0, 1, 2 of the training stream
# training scalars that are the learner's, not parts of the SSL loss (train/<name>)
LEARNER_LOSSES = ("meta_loss", "query_loss", "ssl_loss")


class ReportError(MetasslError, ValueError):
    """A run directory (or an episode) holds nothing this module can report on."""


class Scalars(NamedTuple):
    """One TensorBoard tag: steps `[T]` ascending, their values `[T]` and wall times `[T]` (seconds)."""

    steps: np.ndarray
    values: np.ndarray
    wall: np.ndarray


@dataclass
class Run:
    """What a run directory holds; `cfg` is None when it has no readable `config.yaml` (`config_note` says why)."""

    path: Path
    name: str
    result: dict
    cfg: Config | None
    config_note: str
    scalars: dict[str, Scalars]


def read_scalars(logdir: str | Path) -> dict[str, Scalars]:
    """Every scalar tag of the event files in `logdir` ({} without any).

    A resumed run writes a new event file that repeats the steps after its checkpoint:
    the value written last (by wall time) is kept for each step.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    if not Path(logdir).is_dir():
        return {}
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        last = {e.step: (e.value, e.wall_time) for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
        steps = sorted(last)
        out[tag] = Scalars(np.array(steps), np.array([last[s][0] for s in steps], dtype=float),
                           np.array([last[s][1] for s in steps], dtype=float))
    return out


def load_run(run_dir: str | Path) -> Run:
    """Read a local run directory; ReportError when it has neither `result.json` nor `tensorboard/`."""
    path = Path(run_dir)
    result_file, logdir = path / "result.json", path / "tensorboard"
    if not result_file.is_file() and not logdir.is_dir():
        where = "does not exist" if not path.exists() else "holds no result.json and no tensorboard/ folder"
        raise ReportError(f"run directory {str(path)!r} {where}; give a directory that `metassl train` wrote")
    try:
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ReportError(f"{str(result_file)!r} is not readable JSON ({e})") from None
    cfg, note = None, "no config.yaml"
    if (path / "config.yaml").is_file():
        try:
            cfg, note = load(path / "config.yaml"), ""
        except ConfigError as e:
            note = f"config.yaml is not readable by this metassl ({e})"
    name = result.get("name") or (cfg.name if cfg else path.name)
    return Run(path, name, result, cfg, note, read_scalars(logdir))


def val_curve(run: Run) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """`(metric, steps, scores, ci95 or None)` of meta-validation: TensorBoard's, else result.json's history."""
    for tag, metric in (("val/acc", "accuracy"), ("val/mse", "mse")):
        if tag in run.scalars:
            s = run.scalars[tag]
            ci = run.scalars.get("val/ci95")
            band = None
            if ci is not None:
                by_step = dict(zip(ci.steps.tolist(), ci.values))
                band = np.array([by_step.get(t, np.nan) for t in s.steps.tolist()])
            return metric, s.steps, s.values, band
    history = run.result.get("val_history") or []
    if not history:
        return None
    steps, scores = zip(*history)
    return _metric(run), np.array(steps), np.array(scores, dtype=float), None


def _metric(run: Run) -> str:
    test = run.result.get("test") or {}
    if test.get("metric"):
        return test["metric"]
    regression = (run.cfg is not None and run.cfg.data.dataset == "sinusoid") or "val/mse" in run.scalars
    return "mse" if regression else "accuracy"


def _best(run: Run) -> tuple[float, int] | None:
    """`(score, step)` of the best finite meta-validation."""
    curve = val_curve(run)
    if curve is None:
        return None
    metric, steps, scores, _ = curve
    finite = np.isfinite(scores)
    if not finite.any():
        return None
    pick = np.where(finite, scores, np.inf if metric == "mse" else -np.inf)
    i = int(np.argmin(pick) if metric == "mse" else np.argmax(pick))
    return float(scores[i]), int(steps[i])


class _Figures:
    """pyplot's `figure`, `subplots` and `close` without pyplot: no global figure list and no
    backend switch, so drawing a report in a notebook or a worker leaves its plotting alone."""

    @staticmethod
    def figure(**kwargs):
        from matplotlib.figure import Figure
        return Figure(**kwargs)

    @classmethod
    def subplots(cls, rows: int, cols: int, squeeze: bool = True, **kwargs):
        fig = cls.figure(**kwargs)
        return fig, fig.subplots(rows, cols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:  # a Figure without pyplot is freed with its last reference
        pass


def _pyplot():
    return _Figures


# --- curves ------------------------------------------------------------------

def _band(ax, steps, values, ci, label, **kw):
    line, = ax.plot(steps, values, marker="o", markersize=3, label=label, **kw)
    if ci is not None and np.isfinite(ci).any():
        ax.fill_between(steps, values - ci, values + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def draw_curves(run: Run, path: str | Path) -> Path | None:
    """Write the run's learning curves to `path`; None (nothing written) when it recorded no scalar."""
    sc = run.scalars
    train = sorted(t for t in sc if t.startswith("train/"))
    panels = []  # (title, draw(ax)); only what the run recorded
    if "train/meta_loss" in sc or run.result.get("loss_history"):
        panels.append(("meta-loss", _meta_loss))
    ssl = ["train/ssl_loss"] + [t for t in train if t.endswith("_loss") and t[6:] not in LEARNER_LOSSES]
    if "train/ssl_loss" in sc:
        panels.append(("SSL loss (total and parts)", lambda ax, r: [ax.plot(*sc[t][:2], label=t[6:]) for t in ssl]))
    acc = [t for t in train if t.endswith("_acc")]
    if acc:
        panels.append(("training accuracy", lambda ax, r: [ax.plot(*sc[t][:2], label=t[6:]) for t in acc]))
    if val_curve(run) is not None:
        panels.append((f"meta-val {val_curve(run)[0]} (95% CI)", _meta_val))
    if "perf/episodes_per_s" in sc:
        panels.append(("throughput", _throughput))
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    try:
        for ax, (title, draw) in zip(axes.flat, panels):
            draw(ax, run)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        fig.suptitle(run.name + (" (ended in error)" if run.result.get("error") else ""))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _meta_loss(ax, run: Run) -> None:
    if "train/meta_loss" in run.scalars:
        ax.plot(*run.scalars["train/meta_loss"][:2], label="meta-loss")
    else:
        ax.plot(*zip(*run.result["loss_history"]), label="meta-loss (result.json)")
    version = run.scalars.get("gen/encoder_version")
    if version is not None:  # the self-improving loop: where the generator's encoder changed
        for i, step in enumerate(version.steps[1:][np.diff(version.values) != 0]):
            ax.axvline(step, color="grey", linestyle=":", label="encoder refresh" if i == 0 else None)


def _meta_val(ax, run: Run) -> None:
    metric, steps, scores, ci = val_curve(run)
    _band(ax, steps, scores, ci, "meta-val" if ci is not None else "meta-val (result.json, no CI)")
    test, best_step = run.result.get("test"), run.result.get("best_step")
    if test and best_step is not None:
        ax.errorbar([best_step], [test["mean"]], yerr=[test["ci95"]], fmt="s", color="black", capsize=3,
                    label=f"meta-test ({test['episodes']} episodes)")
    ax.set_ylabel(metric)


def _throughput(ax, run: Run) -> None:
    ax.plot(*run.scalars["perf/episodes_per_s"][:2], label="episodes/s")
    ax.set_ylabel("episodes/s")
    wait = run.scalars.get("perf/wait_frac")
    if wait is not None:
        twin = ax.twinx()
        twin.plot(*wait[:2], color="tab:red", linestyle="--", label="waiting for episodes (fraction)")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=8, loc="lower right")


# --- episodes ----------------------------------------------------------------

def training_episodes(cfg: Config, count: int = SHOWN_EPISODES) -> list:
    """EpisodeRecords of episodes `0..count-1` of the run's training stream, made as the trainer made them.

    Same generator, seed and (`generator.encoder: model`) the encoder of step 0: the
    network as initialised, or none during warm-up. Episodes of later steps whose encoder
    version differs (a refresh before them) are left out. Reads the meta-train split only.
    """
    from metassl.generate.source import VersionedGenerator, cpu_weights, encoder_version
    from metassl.registry import build_backbone, build_learner, load_unlabelled

    g = cfg.generator
    if g.shards:  # the trainer replays these
        from metassl.generate.shards import ShardEpisodes
        shards = ShardEpisodes(g.shards)
        return [shards.record(i % len(shards)) for i in range(count)]
    if g.kind == "labelled":
        raise ReportError("generator.kind='labelled' samples true classes: there are no generated episodes")
    version = encoder_version(cfg, 0)
    ids = [i for i in range(count) if encoder_version(cfg, i // cfg.episodes.meta_batch) == version]
    with torch.random.fork_rng(devices=[]):  # build_backbone seeds torch's global RNG
        weights = None
        if version:  # version 1: train_loop publishes the initial network's weights
            model = build_backbone(cfg, build_learner(cfg))
            weights = cpu_weights({**dict(model.named_parameters()), **dict(model.named_buffers())})
        source = VersionedGenerator(cfg, load_unlabelled(cfg)).at(version, weights)
        return [source.record(i) for i in ids]


def text_episode_lines(cfg: Config, count: int = 2, max_shown: int = 2) -> list[str]:
    """Markdown lines showing the first `count` generated text episodes: per pseudo-class, the
    masked word (smlmt) and a few support and query texts, decoded with the run's tokenizer."""
    from metassl.registry import text_tokenizer

    tok = text_tokenizer(cfg)
    lines = []
    for record in training_episodes(cfg, count):
        e = record.episode
        lines.append(f"Episode {record.episode_id} ({record.generator}, {record.n_way}-way {record.k_shot}-shot):")
        lines.append("")
        words = (_masked_words(cfg, record.episode_id) if record.generator == "smlmt" and not cfg.generator.shards
                 else None)
        for label in range(record.n_way):
            shots = [tok.decode(x[0]) for x in e.support_x[e.support_y == label][:max_shown]]
            queries = [tok.decode(x[0]) for x in e.query_x[e.query_y == label][:max_shown]]
            head = f"class {label}" + (f" (masked word: `{words[label]}`)" if words else "")
            lines.append(f"- {head}: support " + "; ".join(f"`{t}`" for t in shots)
                         + " | query " + "; ".join(f"`{t}`" for t in queries))
        lines.append("")
    return lines


def _masked_words(cfg: Config, index: int) -> list[str] | None:
    from metassl.generate.source import VersionedGenerator
    from metassl.registry import load_unlabelled

    source = VersionedGenerator(cfg, load_unlabelled(cfg)).at(0, None)
    return source.word_of(index) if hasattr(source, "word_of") else None


def _check_image_episode(episode) -> None:
    x = episode.support_x
    if getattr(episode, "batched", False):
        raise ReportError(f"episode_grid draws one episode, got a batch of {x.shape[0]}; pass one task")
    image = x.ndim == 4 and x.shape[1] in (1, 3)
    audio = x.ndim == 3 and x.shape[1] == 1 and x.is_floating_point()
    if not (image or audio) or episode.support_y.dtype != torch.int64:
        raise ReportError(f"only image and audio classification episodes are drawn ([N, 1 or 3, H, W] or "
                          f"[N, 1, T] with class labels); this one has support_x {list(x.shape)}, support_y "
                          f"{episode.support_y.dtype}")


def spectrogram(clip: torch.Tensor) -> torch.Tensor:
    """A clip `[1, T]`'s log-magnitude spectrogram `[frequencies, frames]` in dB (256-sample Hann windows,
    hop 64; 0 dB is the clip's loudest bin, floored at -80 dB), for pictures."""
    wave = clip.detach().float().cpu().reshape(-1)
    n_fft = min(256, len(wave))
    power = torch.stft(wave, n_fft, hop_length=max(n_fft // 4, 1), window=torch.hann_window(n_fft),
                       return_complex=True).abs().pow(2)
    db = 10 * torch.log10(power.clamp_min(1e-12))
    return (db - db.max()).clamp_min(-80.0)


def _draw_episode(fig, episode, title: str, max_classes: int, max_queries: int, max_shots: int) -> None:
    """Draw one episode into a figure or subfigure: a row per class, support | query."""
    _check_image_episode(episode)
    n_way = int(episode.support_y.max()) + 1
    rows = min(n_way, max_classes)
    shots = min(int((episode.support_y == 0).sum()), max_shots)
    queries = min(int((episode.query_y == 0).sum()), max_queries)
    cols = shots + 1 + queries  # one narrow empty column between support and query
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw={"width_ratios": [1] * shots + [0.25] + [1] * queries})
    for j in range(rows):
        images = (list(episode.support_x[episode.support_y == j][:shots]) + [None]
                  + list(episode.query_x[episode.query_y == j][:queries]))
        for c, (ax, image) in enumerate(zip(axes[j], images)):
            ax.set_axis_off()
            if image is None:
                continue
            if image.ndim == 2:  # an audio clip [1, T]: its spectrogram, low frequencies at the bottom
                ax.imshow(spectrogram(image).numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0)
            elif image.shape[0] == 1:
                ax.imshow(image[0].detach().float().cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            if c == 0:
                ax.text(-0.15, 0.5, str(j), transform=ax.transAxes, ha="right", va="center", fontsize=8)
            if j == 0 and c in (0, shots + 1):
                ax.set_title("support" if c == 0 else "query", fontsize=8, loc="left")
    shown = f"first {rows} of {n_way} classes" if rows < n_way else f"{n_way} classes"
    fig.suptitle(f"{title}\n{shown}".strip(), fontsize=9)


def episode_grid(episode, path: str | Path, title: str = "", max_classes: int = MAX_CLASSES,
                 max_queries: int = MAX_QUERIES, max_shots: int = MAX_SHOTS) -> Path:
    """Write one image episode to `path`: a row per class, its support images then its query images.

    ReportError for an episode that is not image classification (a batch, 1-D signals).
    """
    _check_image_episode(episode)
    plt = _pyplot()
    fig = plt.figure(figsize=_grid_size(episode, 1, max_classes, max_queries, max_shots), layout="constrained")
    try:
        _draw_episode(fig, episode, title, max_classes, max_queries, max_shots)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _grid_size(episode, count: int, max_classes: int, max_queries: int, max_shots: int) -> tuple[float, float]:
    rows = min(int(episode.support_y.max()) + 1, max_classes)
    cols = min(int((episode.support_y == 0).sum()), max_shots) + min(int((episode.query_y == 0).sum()), max_queries)
    return count * (0.8 * cols + 1.0), 0.8 * rows + 1.0


def draw_episodes(records: list, path: str | Path) -> Path:
    """Write EpisodeRecords side by side to `path` (ReportError for non-image episodes)."""
    for r in records:
        _check_image_episode(r.episode)
    plt = _pyplot()
    fig = plt.figure(figsize=_grid_size(records[0].episode, len(records), MAX_CLASSES, MAX_QUERIES, MAX_SHOTS),
                     layout="constrained")
    try:
        for sub, r in zip(fig.subfigures(1, len(records), squeeze=False).flat, records):
            _draw_episode(sub, r.episode, f"episode {r.episode_id} ({r.generator}, encoder v{r.encoder_version})",
                          MAX_CLASSES, MAX_QUERIES, MAX_SHOTS)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


# --- report.md ---------------------------------------------------------------

def _score(metric: str, value: float, ci: float | None = None) -> str:
    if not math.isfinite(value):
        return "not finite"
    scale, unit, digits = (100.0, "%", 2) if metric == "accuracy" else (1.0, "", 4)
    text = f"{scale * value:.{digits}f}"
    return text + (f" +- {scale * ci:.{digits}f}" if ci is not None and math.isfinite(ci) else "") + unit


def _config_rows(run: Run) -> list[tuple[str, str]]:
    r, c = run.result, run.cfg
    steps = f"{r['steps']}" if "steps" in r else "?"
    if "train_minutes" in r:
        minutes = f"{r['train_minutes']:.1f}"
    else:
        wall = [s.wall for s in run.scalars.values()]
        minutes = (f"about {(max(w.max() for w in wall) - min(w.min() for w in wall)) / 60:.1f} "
                   "(TensorBoard wall times)" if wall else "?")
    if c is None:
        return [("config", run.config_note), ("steps run", steps), ("minutes", minutes)]
    d, e, g = c.data, c.episodes, c.generator
    dataset = d.dataset + (f" ({d.protocol} protocol)" if d.dataset.startswith("omniglot") else "")
    text = is_text_config(c)
    if text:
        dataset += (f" ({d.class_split} class split)" if d.dataset.startswith("clinc150") else "")
        dataset += f", at most {d.max_tokens} tokens, vocabulary of {d.vocab_size}"
    elif is_audio_config(c):
        dataset += (f", {d.sample_rate} Hz, {d.clip_seconds:g} s clips"
                    + (f", {d.class_split} class split" if d.class_split != "primary" else ""))
    elif d.dataset != "sinusoid":
        dataset += f", {d.image_size}x{d.image_size}, {'RGB' if d.channels == 3 else 'grey'}"
    kinds = g.mix if g.kind == "mix" else {g.kind: 1}
    generator = g.kind + (f" {dict(g.mix)}" if g.kind == "mix" else "")
    generator += (f", {g.clusters} clusters x {g.partitions} partitions, encoder {g.encoder}"
                  + (f", core fraction {g.core_fraction:g}" if g.core_fraction < 1 else "")
                  if "cluster" in kinds else "")
    generator += (f", {g.generative.model} (latent {g.generative.latent_dim}, LASIUM-{g.generative.strategy.upper()})"
                  if "generative" in kinds else "") + (f", shards {g.shards}" if g.shards else "")
    return [("dataset", dataset),
            ("episodes", f"{e.n_way}-way {e.k_shot}-shot, {e.n_query} queries, meta-batch {e.meta_batch}"),
            ("learner", c.learner.name), ("generator", generator),
            ("ssl_weight", f"{c.objective.ssl_weight}" + (
                (f" (simcse {c.objective.simclr}, mlm {c.objective.mlm})" if text else
                 f" (simclr {c.objective.simclr}, cpc {c.objective.cpc})" if is_audio_config(c) else
                 f" (simclr {c.objective.simclr}, rotation {c.objective.rotation})") if c.objective.ssl_weight else "")),
            ("steps run", f"{steps} of {c.train.steps}"), ("minutes", minutes)]


def _result_lines(run: Run) -> list[str]:
    from metassl.evaluation import EvalResult

    r = run.result
    lines = ["## Result", ""]
    if r.get("error"):
        lines += [f"**The run ended in error:** {r['error']}", ""]
    if not r.get("test"):
        why = "ended in error" if r.get("error") else "was not evaluated on meta-test" if r else "has no result.json"
        return lines + [f"No meta-test result (the run {why})."]
    test = EvalResult(**r["test"])
    lines.append(f"**meta-test {test.metric}: {_score(test.metric, test.mean, test.ci95)}** "
                 f"({test.episodes} episodes, best checkpoint: step {r.get('best_step')})")
    if r.get("untrained"):
        base = EvalResult(**r["untrained"])
        gain = (100 if test.metric == "accuracy" else 1) * (test.mean - base.mean)
        lines += ["", f"untrained network, same episodes: {_score(base.metric, base.mean, base.ci95)} "
                      f"(trained {gain:+.2f}{' points' if test.metric == 'accuracy' else ''})"]
    lines += ["", "| protocol | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in test.protocol.items() if v is not None]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in test.extra.items()]
    return lines


def _validation_lines(run: Run) -> list[str]:
    curve = val_curve(run)
    if curve is None:
        return ["## Meta-validation", "", "No meta-validation was recorded."]
    metric, steps, scores, ci = curve
    best = _best(run)
    lines = ["## Meta-validation", ""]
    lines.append(f"Best meta-val {metric}: {_score(metric, best[0])} at step {best[1]}" if best else
                 "No meta-validation gave a finite score.")
    lines += ["", f"| step | meta-val {metric} | |", "|---|---|---|"]
    for i, (step, score) in enumerate(zip(steps.tolist(), scores.tolist())):
        mark = "best" if best and step == best[1] else ""
        lines.append(f"| {step} | {_score(metric, score, None if ci is None else ci[i])} | {mark} |")
    return lines


def _last_refit(run_dir: Path) -> tuple[int, dict] | None:
    """`(step, refit state)` of the run's last checkpoint when it holds a refitted generative model."""
    from metassl import checkpoint

    last = checkpoint.latest(run_dir)
    if last is None:
        return None
    state = checkpoint.load(last)
    return (state["step"], state["generative_refit"]) if state.get("generative_refit") else None


def write_report(run_dir: str | Path, *, episodes_png: bool = True) -> dict[str, Path]:
    """Write `curves.png`, `episodes.png` (generated episodes, when `episodes_png`) and `report.md`
    into a local run directory; return their paths by kind ("curves", "episodes", "report").

    ReportError when the directory holds neither `result.json` nor `tensorboard/`.
    """
    run = load_run(run_dir)
    written: dict[str, Path] = {}
    notes = []
    curves = draw_curves(run, run.path / "curves.png")
    if curves:
        written["curves"] = curves
    else:
        notes.append("No learning curves: the run recorded no scalars.")
    generated = run.cfg is not None and (run.cfg.generator.kind != "labelled" or run.cfg.generator.shards)
    text_episodes = []
    if generated and is_text_config(run.cfg):
        try:
            text_episodes = text_episode_lines(run.cfg)
        except MetasslError as e:
            notes.append(f"No generated episodes shown: {e}")
    elif episodes_png and generated:
        try:
            records = training_episodes(run.cfg)
            written["episodes"] = draw_episodes(records, run.path / "episodes.png")
        except MetasslError as e:  # data not reachable from here, or not images: the report goes on
            notes.append(f"No episodes.png: {e}")
    pictures, refitted = {}, None
    if run.cfg is not None and needs_generative(run.cfg) and run.cfg.generator.generative.checkpoint:
        try:
            from metassl.registry import load_generative_for, load_unlabelled
            state = load_generative_for(run.cfg)
            images = load_unlabelled(run.cfg)
            pictures = write_pictures(state["params"], images, run.path, prefix="generative_")
            written.update({f"generative_{k}": v for k, v in pictures.items()})
            refitted = _last_refit(run.path)  # generator.generative.refit_steps: the decoder at the end
            if refitted is not None:
                refit_pictures = write_pictures(refitted[1]["params"], images, run.path, prefix="generative_refit_")
                written.update({f"generative_refit_{k}": v for k, v in refit_pictures.items()})
        except MetasslError as e:
            notes.append(f"No pictures of the generative model: {e}")
    lines = [f"# {run.name}", "", f"Run directory: `{run.path}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _config_rows(run)]
    lines += ["", *_result_lines(run), "", *_validation_lines(run), "", "## Plots", ""]
    if "curves" in written:
        lines.append("![learning curves](curves.png)")
    if "episodes" in written:
        lines += ["", f"Episodes 0-{len(records) - 1} of the training stream, the first the trainer saw ("
                      f"at most {MAX_CLASSES} classes, {MAX_SHOTS} shots and {MAX_QUERIES} queries shown):",
                  "", "![training episodes](episodes.png)"]
    if text_episodes:
        lines += ["", "## Generated episodes", "", *text_episodes]
    if pictures:
        gen = run.cfg.generator.generative
        lines += ["", f"The {gen.model.upper()} the episodes were decoded from "
                      f"(`{gen.checkpoint}`): samples from its prior"
                  + (", then meta-train images over their reconstructions" if "reconstructions" in pictures else "")
                  + ":", "", "![generative samples](generative_samples.png)"]
        if "reconstructions" in pictures:
            lines += ["", "![generative reconstructions](generative_reconstructions.png)"]
        if refitted is not None:
            lines += ["", f"The same model refitted at the refresh points (generator.generative.refit_steps="
                          f"{gen.refit_steps}), as the last checkpoint (step {refitted[0]}) holds it: fit step "
                          f"{refitted[1]['step']}:", "", "![refitted samples](generative_refit_samples.png)"]
            if (run.path / "generative_refit_reconstructions.png").is_file():
                lines += ["", "![refitted reconstructions](generative_refit_reconstructions.png)"]
    lines += [""] + notes + ["", "## TensorBoard", "", f"    tensorboard --logdir {run.path / 'tensorboard'}", ""]
    report = run.path / "report.md"
    report.write_text("\n".join(lines))
    written["report"] = report
    return written


# --- several runs ------------------------------------------------------------

def compare(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Draw the meta-val curves (95% CI bands) of several local run directories on one plot at `out_path`."""
    runs = [load_run(d) for d in run_dirs]
    labels = [r.path.name for r in runs]
    labels = [f"{r.path.parent.name}/{lab}" if labels.count(lab) > 1 else lab for r, lab in zip(runs, labels)]
    curves = [(lab, r, val_curve(r)) for lab, r in zip(labels, runs)]
    metrics = list(dict.fromkeys(c[0] for _, _, c in curves if c is not None))
    if not metrics:
        raise ReportError(f"none of the runs {[str(r.path) for r in runs]} recorded a meta-validation")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), squeeze=False)
    try:
        for ax, metric in zip(axes.flat, metrics):
            for label, run, curve in curves:
                if curve is None or curve[0] != metric:
                    continue
                test = run.result.get("test")
                if test:
                    label += f" (test {_score(metric, test['mean'], test['ci95'])})"
                _band(ax, *curve[1:], label)
            ax.set(title=f"meta-val {metric} (95% CI)", xlabel="step", ylabel=metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)
    return Path(out_path)


def main(run_dirs: list[str], out: str | None = None, log=print) -> int:
    """`metassl report RUN [RUN ...] [--out PATH]`: write each run's report; with several runs (or
    `out`) also a comparison plot at `out` (default `<first run's parent>/compare.png`).

    Run directories may be storage URIs: each is fetched into its local mirror, reported
    there, and the report files are uploaded beside the run's.
    """
    from metassl.storage import RunStore, is_uri, join, list_names, upload

    if not run_dirs:
        raise ReportError("name at least one run directory")
    local = []
    for location in run_dirs:
        store = RunStore(location)
        if store.remote and not {"result.json", "tensorboard"} & set(list_names(location)):
            raise ReportError(f"run directory {location!r} holds no result.json and no tensorboard/ folder")
        store.pull()
        written = write_report(store.local)
        store.push()
        for kind, path in written.items():
            log(f"{kind}: {join(location, path.name) if store.remote else path}")
        local.append(store.local)
    if len(run_dirs) > 1 or out:
        target = out or join(RunStore(run_dirs[0]).parent, "compare.png")
        if is_uri(target):
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                upload(compare(local, Path(tmp) / "compare.png"), target)
        else:
            compare(local, target)
        log(f"comparison: {target}")
    return 0

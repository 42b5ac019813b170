"""The Python API: what `metassl train` and `metassl eval` do, plus adapting a trained learner by hand.

    import metassl
    run = metassl.train("experiments/omniglot_protonet.yaml", backend="local", **{"train.steps": 50})
    learner = run.load()                              # or metassl.load("runs/omniglot_protonet")
    predict = learner.adapt(support_x, support_y)     # [n_way * k_shot, C, H, W], labels 0..n_way-1
    logits = predict(query_x)                         # [Q, n_way]
    # a text run's learner takes lists of strings: learner.adapt(["book a flight", ...], labels)
    metassl.evaluate(run, k_shot=5).mean              # as `metassl eval RUN --k-shot 5`
    metassl.evaluate_shapes(run, [(5, 1, None), (20, 1, 5)])  # as `metassl eval RUN --shapes 5w1s,20w1s5q`
    metassl.export(run, "conv4.safetensors")          # the backbone's weights + config.yaml beside them

`import metassl` stays cheap: these names are imported on first use (metassl/__init__.py).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from metassl.config import (CHOICES, Config, apply_overrides, dump, from_dict, is_audio_config, is_text_config, to_dict,
                            with_values)
from metassl.config import load as load_config
from metassl.data.episodes import Episode
from metassl.errors import CheckpointError, ConfigError, DataError, MetasslError
from metassl.evaluation import EvalResult, evaluate_model
from metassl.evaluation import evaluate_shapes as evaluate_model_shapes  # the api's name is the public one
from metassl.registry import build_learner, is_regression
from metassl.storage import is_uri, join
from metassl.trainer import load_trained, run_local

BACKENDS = ("ray", "local")


def resolve_config(config: str | os.PathLike | Config | Mapping | None = None,
                   overrides: Mapping | Sequence[str] | None = None, **dotted) -> Config:
    """The validated Config from a YAML path, a Config, a nested dict or None (the defaults), with overrides.

    `overrides` is a list of `"key=value"` strings (values parsed as YAML, as `--set`) or a dict
    of dotted keys to values; `dotted` takes more of the latter (`**{"train.steps": 50}`).
    """
    values = dict(dotted)
    items: list[str] = []
    if isinstance(overrides, Mapping):
        values = {**overrides, **values}
    elif isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} must be a list of 'key=value' strings or a dict, not one string")
    elif overrides is not None:
        items = list(overrides)
    if config is None or isinstance(config, (str, os.PathLike)):
        cfg = load_config(config, items)  # the CLI's own path: same file checks and errors
    elif isinstance(config, Config):
        cfg = from_dict(apply_overrides(to_dict(config), items)) if items else config
    elif isinstance(config, Mapping):
        cfg = from_dict(apply_overrides(dict(config), items))
    else:
        raise ConfigError(f"config must be a YAML path, a metassl Config, a dict or None; got {type(config).__name__}")
    return with_values(cfg, values) if values else cfg


@dataclass(frozen=True)
class Run:
    """A finished training run: its directory, resolved config and `result.json` dict."""

    run_dir: Path | str  # a local folder, or the storage URI the run lives at
    config: Config
    result: dict

    @property
    def test(self) -> EvalResult | None:
        """The meta-test result of `best.pt`, or None (a run stopped on a non-finite step has none)."""
        return EvalResult(**self.result["test"]) if "test" in self.result else None

    @property
    def test_accuracy(self) -> float | None:
        """Mean meta-test accuracy (a fraction); None for regression."""
        test = self.test
        return test.mean if test is not None and test.metric == "accuracy" else None

    @property
    def test_ci95(self) -> float | None:
        """95% confidence half-width of `test_accuracy`; None for regression."""
        test = self.test
        return test.ci95 if test is not None and test.metric == "accuracy" else None

    @property
    def checkpoint(self) -> Path | str:
        """`checkpoints/best.pt` of the run (a URI for a run kept in object storage)."""
        return join(self.run_dir, "checkpoints", "best.pt") if is_uri(self.run_dir) else \
            Path(self.run_dir, "checkpoints", "best.pt")

    def load(self) -> Learner:
        return load(self)

    def evaluate(self, **options) -> EvalResult:
        return evaluate(self, **options)

    def export(self, path: str | os.PathLike) -> Path:
        return export(self, path)


def train(config: str | os.PathLike | Config | Mapping | None = None, *, run_dir: str | os.PathLike | None = None,
          backend: str = "ray", workers: int = 2, address: str | None = None, placement: str = "PACK",
          overrides: Mapping | Sequence[str] | None = None, log: Callable[[str], None] | None = print,
          verbose: bool = False, **dotted) -> Run:
    """Meta-train, evaluate `best.pt` on meta-test and return the Run, as `metassl train` does.

    `config`/`overrides`/`dotted` as `resolve_config`; `run_dir` defaults to `<storage or runs>/<name>`
    and an existing run there resumes. `backend`, `workers`, `address`, `placement` and
    `verbose` are the CLI's options; `log` receives the progress lines (None: silent).
    Errors are the CLI's: ConfigError, DataError, ... (all MetasslError).
    """
    cfg = resolve_config(config, overrides, **dotted)
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    location = str(run_dir) if run_dir is not None else join(cfg.storage or "runs", cfg.name)
    log = log or (lambda line: None)
    if backend == "local":
        result = run_local(cfg, location, log=log)
    else:
        from metassl.raytrain import run_ray
        result = run_ray(cfg, location, workers=workers, address=address, placement=placement, log=log,
                         quiet=not verbose)
    return Run(location if is_uri(location) else Path(location), cfg, result)


class Learner:
    """A trained meta-learner in eval mode: `adapt(support_x, support_y)` gives a Predictor for that task."""

    def __init__(self, cfg: Config, learner, model: torch.nn.Module, params: dict, buffers: dict, step: int):
        self.config, self.learner, self.model = cfg, learner, model.eval()
        self.params, self.buffers, self.step = params, buffers, step
        self.regression = is_regression(cfg)
        self.text = is_text_config(cfg)
        self.audio = is_audio_config(cfg)
        self.sample_rate = cfg.data.sample_rate if self.audio else None  # what the model was trained at
        self._tokenizer = None
        if self.text:
            from metassl.registry import text_tokenizer
            self._tokenizer = text_tokenizer(cfg)  # the checkpoint's own vocabulary (trainer.load_trained)
        head = getattr(model, "head", None)
        any_way = head is None or getattr(learner, "zero_head", False)  # metric learners, MAML's zeroing trick
        self.n_way = None if any_way else head.out_features  # None: any n_way
        self.input_shape = ((1,) if self.regression else (2, cfg.data.max_tokens) if self.text else
                            (1, round(cfg.data.sample_rate * cfg.data.clip_seconds)) if self.audio else
                            (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))

    def __repr__(self) -> str:
        return (f"Learner({self.config.learner.name}, {self.config.model.backbone}, step {self.step}, "
                f"input {list(self.input_shape)}, n_way {self.n_way or 'any'})")

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, *, inner_steps: int | None = None,
              sample_rate: int | None = None) -> Predictor:
        """The Predictor for the task whose support set this is.

        support_x: `[S, *input_shape]` float; support_y: `[S]` int labels 0..n_way-1, each present
        (regression: `[S, 1]` float targets). A text model takes a list of S strings, encoded with
        the run's vocabulary (or int64 items `[S, 2, max_tokens]` already encoded with it). An
        audio model takes a list of S 1-D waveforms of any length (or `[S, 1, T]`) recorded at
        `sample_rate` Hz (default: the model's, `data.sample_rate`): clips at a higher rate are
        resampled, at a lower one refused, and each is cut or padded by the crop rule of
        metassl.data.audio; the predictor takes its queries at the same rate. The
        predictor runs the learner's own evaluation code (`learner.predict`, as `metassl eval`)
        on this support set and the queries it is given: MAML and Reptile take `inner_steps`
        SGD steps on the support set (default: the
        run's `eval.inner_steps`, else `learner.eval_inner_steps`; sinusoid: 10), ProtoNet and
        Matching Nets compare the queries with its embeddings.
        """
        device = next(iter(self.params.values())).device
        if sample_rate is not None and not self.audio:
            raise ConfigError("sample_rate is for audio models; this one reads "
                              f"{'texts' if self.text else 'images' if not self.regression else 'numbers'}")
        rate = sample_rate or self.sample_rate
        x = self._inputs(support_x, "support_x", rate).to(device)
        y = self._targets(support_y, len(x)).to(device)
        if inner_steps is None:
            inner_steps = self.config.eval.inner_steps
        if inner_steps is None and self.regression:
            inner_steps = 10  # as evaluate_model
        if inner_steps is not None and inner_steps < 0:
            raise ConfigError(f"inner_steps={inner_steps} must be >= 0")

        def run(query_x: torch.Tensor) -> torch.Tensor:
            unused_labels = y.new_zeros((len(query_x), *y.shape[1:]))  # predict never reads query labels
            episode = Episode(x, y, query_x, unused_labels)
            return self.learner.predict(self.model, self.params, self.buffers, episode, inner_steps)

        return Predictor(run, 1 if self.regression else int(y.max()) + 1,
                         lambda query_x: self._inputs(query_x, "query_x", rate), device)

    def _inputs(self, x, name: str, rate: int | None = None) -> torch.Tensor:
        if self.text:
            return self._texts(x, name)
        if self.audio:
            return self._clips(x, name, rate)
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise DataError(f"{name} must be a float tensor (images in [0, 1]), got {x.dtype}")
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"{name} has shape {list(x.shape)}; this model takes [n, "
                            f"{', '.join(map(str, self.input_shape))}] (data.channels, data.image_size)")
        if len(x) == 0:
            raise DataError(f"{name} is empty: give at least one example")
        return x.float()

    def _clips(self, x, name: str, rate: int) -> torch.Tensor:
        """`[n, 1, T]` waveforms at the model's rate from clips at `rate` Hz (a list of 1-D, or `[n, 1, L]`)."""
        import numpy as np

        from metassl.data.audio import check_wave, fit_length, resample

        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise DataError(f"sample_rate={rate!r} must be a positive integer (Hz)")
        if rate < self.sample_rate:
            raise DataError(f"{name} is at {rate} Hz, below the model's data.sample_rate={self.sample_rate}: "
                            "upsampling cannot restore what it lacks; record at a higher rate")
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 1:
            x = list(x[:, 0])
        clips = list(x) if isinstance(x, (list, tuple)) else None
        if not clips:
            raise DataError(f"{name} must be a non-empty list of 1-D waveforms (or a tensor [n, 1, T]) for this "
                            "audio model")
        out = []
        for i, clip in enumerate(clips):
            wave = np.asarray(clip.detach().cpu() if isinstance(clip, torch.Tensor) else clip)
            if wave.ndim != 1 or wave.size == 0 or not np.issubdtype(wave.dtype, np.floating):
                raise DataError(f"{name}[{i}] must be a non-empty 1-D float waveform, got {wave.dtype} "
                                f"{list(wave.shape)}")
            wave = check_wave(wave.astype(np.float32), f"{name}[{i}]")
            out.append(fit_length(resample(wave, rate, self.sample_rate), self.input_shape[1]))
        return torch.from_numpy(np.clip(np.stack(out), -1.0, 1.0).astype(np.float32)).unsqueeze(1)

    def _texts(self, x, name: str) -> torch.Tensor:
        """`[n, 2, max_tokens]` int64 items of a list of strings (or of items already encoded)."""
        from metassl.data.tokenizer import check_items

        if isinstance(x, str):
            raise DataError(f"{name} is one string; give a list of texts, one per example")
        if isinstance(x, torch.Tensor):
            if x.dtype != torch.int64 or x.dim() != 3 or tuple(x.shape[1:]) != self.input_shape:
                raise DataError(f"{name} has shape {list(x.shape)} ({x.dtype}); this text model takes a list of "
                                f"strings or int64 items [n, {', '.join(map(str, self.input_shape))}]")
            if len(x) == 0:
                raise DataError(f"{name} is empty: give at least one example")
            check_items(x, self._tokenizer.vocab_size, name)
            return x
        try:
            texts = list(x)
        except TypeError:
            raise DataError(f"{name} must be a list of strings for this text model, got {type(x).__name__}") from None
        if not texts:
            raise DataError(f"{name} is empty: give at least one example")
        try:
            return self._tokenizer.encode(texts)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None

    def _targets(self, y, count: int) -> torch.Tensor:
        y = torch.as_tensor(y)
        if self.regression:
            if y.shape != (count, 1) or not y.is_floating_point():
                raise DataError(f"support_y must be float targets [{count}, 1], got {y.dtype} {list(y.shape)}")
            return y.float()
        if y.dim() != 1 or len(y) != count or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"support_y must be {count} integer labels (one per support_x row), "
                            f"got {y.dtype} {list(y.shape)}")
        labels = sorted(set(y.tolist()))
        if labels != list(range(len(labels))) or len(labels) < 2:
            raise DataError(f"support_y labels must be 0..n_way-1 with every label present and n_way >= 2, "
                            f"got {labels[:10]}")
        if self.n_way is not None and len(labels) != self.n_way:
            raise DataError(f"support_y has {len(labels)} classes; this {self.config.learner.name} model has a "
                            f"{self.n_way}-way classifier head (episodes.n_way={self.n_way})")
        return y.long()


class Predictor:
    """Outputs for queries of the task a Learner adapted to: `predictor(query_x [Q, *input_shape]) -> [Q, n_way]`.

    Logits (ProtoNet: negative squared distances; Matching Nets: log-probabilities; MAML and
    Reptile: the head adapted on the support set), detached; the argmax over the last dim is
    the predicted label. Regression: `[Q, 1]` predictions. Each call adapts again (MAML and
    Reptile: their inner loop), so one call with all of a task's queries is cheapest.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], n_way: int,
                 inputs: Callable[[object], torch.Tensor], device):
        self._run, self.n_way, self._inputs, self._device = run, n_way, inputs, device

    def __call__(self, query_x) -> torch.Tensor:
        x = self._inputs(query_x)  # the Learner's own checks (shape, dtype; texts: encoding)
        with torch.no_grad():
            return self._run(x.to(self._device)).detach()


def load(run_dir_or_checkpoint: Run | str | os.PathLike) -> Learner:
    """The Learner saved in a run directory (its `best.pt`), a storage URI or a `.pt` checkpoint."""
    cfg, learner, model, params, buffers, state = load_trained(_location(run_dir_or_checkpoint))
    return Learner(cfg, learner, model, params, buffers, state["step"])


def evaluate(run_or_path: Run | Learner | str | os.PathLike, *, split: str | None = None,
             n_way: int | None = None, k_shot: int | None = None, n_query: int | None = None,
             episodes: int | None = None, seed: int | None = None, inner_steps: int | None = None,
             dataset: str | None = None, protocol: str | None = None, class_split: str | None = None,
             disjoint_groups: bool | None = None, features: str | None = None,
             shifts: int | None = None) -> EvalResult:
    """Evaluate on fixed-seed held-out episodes, as `metassl eval`; unset options take the run's `eval` config.

    `dataset` is a spec like `--data` (`omniglot:PATH`, `imagefolder:PATH`, ...); `protocol`
    (omniglot) is `supervised`, `unsupervised` or `psco`; `class_split` replaces `data.class_split`
    (arabic_speech_commands: `speakers` makes few-shot speaker identification of the same model);
    `disjoint_groups` replaces `eval.disjoint_groups` (support and queries from disjoint speakers);
    `features` replaces `eval.features` (`raw` or `l2`: the embeddings ProtoNet compares) and
    `shifts` `eval.shifts` (ProtoNet on images: embeddings averaged over shifts of up to that many pixels).
    """
    _check_positive(n_way=n_way, k_shot=k_shot, n_query=n_query)
    cfg, learner, model, params, buffers, common = _eval_setup(
        run_or_path, split=split, episodes=episodes, seed=seed, inner_steps=inner_steps, dataset=dataset,
        protocol=protocol, class_split=class_split, disjoint_groups=disjoint_groups, features=features,
        shifts=shifts)
    return evaluate_model(cfg, learner, model, params, buffers, n_way=n_way, k_shot=k_shot, n_query=n_query,
                          **common)


def evaluate_shapes(run_or_path: Run | Learner | str | os.PathLike,
                    shapes: Sequence[tuple[int | None, int | None, int | None]], **options) -> list[EvalResult]:
    """`evaluate` at several (n_way, k_shot, n_query) shapes, as `metassl eval --shapes`: one result per shape.

    Each result equals `evaluate(run, n_way=..., k_shot=..., n_query=..., **options)`, but the
    split is read once and, for ProtoNet and Matching Nets, embedded once for all shapes. A None
    in a shape takes the run's default. `options` are `evaluate`'s other keywords.
    """
    shapes = [tuple(shape) for shape in shapes]
    if not shapes:
        raise ConfigError("shapes is empty: give at least one (n_way, k_shot, n_query)")
    for shape in shapes:
        if len(shape) != 3:
            raise ConfigError(f"shape {shape!r} is not (n_way, k_shot, n_query)")
        _check_positive(**dict(zip(("n_way", "k_shot", "n_query"), shape)))
    cfg, learner, model, params, buffers, common = _eval_setup(run_or_path, **options)
    return evaluate_model_shapes(cfg, learner, model, params, buffers, shapes=shapes, **common)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def _eval_setup(run_or_path, *, split: str | None = None, episodes: int | None = None, seed: int | None = None,
                inner_steps: int | None = None, dataset: str | None = None, protocol: str | None = None,
                class_split: str | None = None, disjoint_groups: bool | None = None, features: str | None = None,
                shifts: int | None = None):
    """What `evaluate` and `evaluate_shapes` share: the model, its config with the options applied,
    and evaluate_model's keywords other than the shape."""
    _check_positive(episodes=episodes)
    if inner_steps is not None and inner_steps < 0:
        raise ConfigError(f"inner_steps={inner_steps} must be >= 0")
    for name, value, valid in (("split", split, CHOICES["eval.split"]),
                               ("protocol", protocol, CHOICES["data.protocol"]),
                               ("class_split", class_split, CHOICES["data.class_split"]),
                               ("features", features, CHOICES["eval.features"])):
        if value is not None and value not in valid:
            raise ConfigError(f"{name}={value!r} is not one of {list(valid)}")
    if isinstance(run_or_path, Learner):
        t = run_or_path
        cfg, learner, model, params, buffers = t.config, t.learner, t.model, t.params, t.buffers
    else:
        cfg, learner, model, params, buffers, _ = load_trained(_location(run_or_path))
    root = None
    if dataset is not None and dataset.startswith("omniglot:"):
        dataset, root = "omniglot", dataset.split(":", 1)[1]
    if protocol:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, protocol=protocol))
    if class_split:
        cfg = with_values(cfg, {"data.class_split": class_split})  # validated as any config change
    if features is not None or shifts is not None:
        if shifts is not None and (not isinstance(shifts, int) or isinstance(shifts, bool)):
            raise ConfigError(f"shifts={shifts!r} must be an integer >= 0")
        views = {"eval.features": features or cfg.eval.features,
                 "eval.shifts": cfg.eval.shifts if shifts is None else shifts}
        cfg = with_values(cfg, views)  # validated: ProtoNet only, images only, 0 <= shifts <= 8
        learner = build_learner(cfg)  # ProtoNet holds no weights: the same learner, another view
    common = dict(split=split or cfg.eval.split, episodes=episodes or cfg.eval.episodes,
                  seed=cfg.eval.seed if seed is None else seed,
                  inner_steps=cfg.eval.inner_steps if inner_steps is None else inner_steps, dataset=dataset,
                  root=root, disjoint_groups=disjoint_groups)
    return cfg, learner, model, params, buffers, common


def export(run_or_path: Run | Learner | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the backbone's weights as a plain state_dict and its config as `config.yaml` beside it.

    `path` ends in `.pt` (a dict of tensors only: `torch.load(path, weights_only=True)`) or
    `.safetensors` (needs `pip install safetensors`). The state_dict loads into
    `metassl.registry.build_backbone(cfg, build_learner(cfg))` for the config beside it
    (Meta-SGD step sizes are not part of the backbone and are left out). Returns `path`.
    """
    path = Path(path)
    if path.suffix not in (".pt", ".safetensors"):
        raise MetasslError(f"export path {str(path)!r} must end in .pt or .safetensors")
    learner = run_or_path if isinstance(run_or_path, Learner) else load(run_or_path)
    tensors = {**learner.params, **learner.buffers}
    names = list(learner.model.state_dict())
    missing = [k for k in names if k not in tensors]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {missing[:3]} of the model its config builds")
    state = {k: tensors[k].detach().cpu().contiguous().clone() for k in names}
    config_path = path.parent / "config.yaml"
    if config_path.is_file() and yaml.safe_load(config_path.read_text()) != to_dict(learner.config):
        raise MetasslError(f"{str(config_path)!r} already holds another config; export into another folder")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise MetasslError(f"writing {str(path)!r} needs the safetensors package: pip install safetensors "
                               "(or export to a .pt path)") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    dump(learner.config, config_path)
    return path


def _location(run_or_path) -> str | Path:
    return run_or_path.run_dir if isinstance(run_or_path, Run) else run_or_path

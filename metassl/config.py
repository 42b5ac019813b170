"""Experiment configuration: frozen dataclasses loaded from YAML, with `key=value` overrides.

Every field has a default, so a YAML file only names what differs. Unknown keys,
wrong types and out-of-range values raise `ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metassl.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where episodes come from."""

    # digits | sinusoid | omniglot[:PATH] | imagefolder:PATH | clinc150[:PATH] | text:PATH
    # | arabic_speech_commands[:PATH] | audio:PATH
    dataset: str = "digits"
    root: str | None = None  # dataset folder (omniglot); None: $METASSL_DATA or download
    # omniglot: supervised (rotations as classes) | unsupervised (rotation 0) | psco (PsCo's: supervised's classes)
    protocol: str = "supervised"
    image_size: int = 28  # images are resized to image_size x image_size
    channels: int = 1  # imagefolder: 1 (grey) or 3 (RGB)
    # imagefolder:PATH with one folder of classes (no train/val/test subfolders): the
    # fractions of its classes that go to meta-train, meta-val and meta-test, drawn with
    # split_seed (the split is a function of these two keys and the class names)
    split_fractions: tuple[float, ...] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    # texts (clinc150, text:PATH); see metassl.data.text and metassl.data.tokenizer
    # clinc150: primary (by intent) | domain_disjoint (no domain in two splits); arabic_speech_commands:
    # primary (keywords are the classes) | speakers (the authors' speaker split, speakers as classes)
    class_split: str = "primary"
    # a tokenizer.json (path or URI); None: `metassl train` learns a WordPiece vocabulary from the
    # meta-train text into RUN/tokenizer.json, which every process of the run then reads
    tokenizer: str | None = None
    vocab_size: int = 4000  # most word pieces of a learned vocabulary (and rows of the token embedding)
    max_tokens: int = 32  # ids per text with [CLS] and [SEP]: longer texts are truncated, shorter padded
    # audio (arabic_speech_commands, audio:PATH; see metassl.data.audio): clips are resampled to
    # sample_rate and cut to their centre clip_seconds, or zero-padded equally at both ends
    sample_rate: int = 8000
    clip_seconds: float = 1.0


@dataclass(frozen=True)
class EpisodeConfig:
    """Shape of the training episodes."""

    n_way: int = 3  # classes per episode (ignored by sinusoid); the default dataset (digits) has 3 per val/test
    k_shot: int = 1  # support examples per class (sinusoid: support points)
    n_query: int = 15  # query examples per class (sinusoid: query points)
    meta_batch: int = 4  # episodes per outer step


@dataclass(frozen=True)
class ModelConfig:
    """Backbone."""

    backbone: str = "conv4"  # conv4 (images) | transformer (texts) | audio (waveforms) | mlp (sinusoid)
    hidden: int = 64  # Conv-4 channels; Transformer width
    norm: str = "layer"  # layer | group | batch | batch_transductive | none
    mlp_hidden: tuple[int, ...] = (40, 40)  # MLP hidden widths
    layers: int = 2  # Transformer blocks
    heads: int = 4  # Transformer attention heads (hidden must be a multiple)
    dropout: float = 0.1  # Transformer dropout (also what makes SimCSE's two views differ)
    pooling: str = "mean"  # Transformer: mean | attention (learned weights) | first_last (word embeddings beside final states)
    # Conv-4 convolutions in channels-last (NHWC) memory order: the same function, faster on CPU, but
    # fp32 gradients further from the NCHW reference (up to 1e-3 relative); off under learner.vectorize
    channels_last: bool = False
    # audio: strided Conv1d blocks (one per kernel/stride; `hidden` channels) and a GRU of `context` units
    kernels: tuple[int, ...] = (10, 8, 4, 4)
    strides: tuple[int, ...] = (5, 4, 2, 2)
    context: int = 128
    context_net: str = "gru"  # gru | none (the embedding is then the mean of the frames)
    # audio: waveform (convolutions over samples) | logmel (over a log-mel spectrogram: torch.stft with
    # n_fft-sample Hann windows every `hop` samples, librosa's mel_bands filterbank; kernels count frames)
    frontend: str = "waveform"
    n_fft: int = 256
    hop: int = 80
    mel_bands: int = 40
    # logmel: subtract each band's mean over the clip's frames (cepstral mean normalisation: a fixed
    # gain per frequency, such as a microphone's response or the recording level, cancels out)
    cmn: bool = False


@dataclass(frozen=True)
class LearnerConfig:
    """Meta-learner and its inner loop."""

    name: str = "protonet"  # maml | fomaml | reptile | protonet | matchingnet
    inner_lr: float = 0.4  # inner-loop SGD step size (MAML, Reptile)
    inner_steps: int = 1  # inner steps during meta-training
    eval_inner_steps: int | None = None  # inner steps at evaluation; None: inner_steps
    first_order: bool = False  # MAML without second-order terms (implied by fomaml)
    vectorize: bool = False  # MAML: vmap over the tasks of a meta-batch instead of a loop
    # MAML loop: each task's query pass differentiated at once (first order, its graph freed),
    # the inner-loop chain rule carried by a surrogate; false: one graph for the meta-batch
    split_query: bool = True
    learn_inner_lr: bool = False  # MAML: Meta-SGD, a learned step size per weight (starting at inner_lr)
    # MAML: every task's inner loop starts from a zero head as wide as the episode (the zeroing
    # trick), so one model adapts to any N-way and classes are not tied to output units
    zero_head: bool = False
    head_only: bool = False  # MAML: adapt the classifier head alone in the inner loop (ANIL); the body learns outside
    matching_scale: float = 1.0  # Matching Nets: cosine similarities are multiplied by this


@dataclass(frozen=True)
class ObjectiveConfig:
    """The combined objective `meta_loss + ssl_weight * ssl_loss` (SSL needs generator.ssl_views)."""

    ssl_weight: float = 0.0  # 0: meta-learning loss only
    meta_weight: float = 1.0  # weight of the meta-learning loss (0: an ablation trained on the SSL loss alone)
    simclr: float = 1.0  # weight of NT-Xent on two views inside ssl_loss
    rotation: float = 1.0  # weight of rotation prediction inside ssl_loss (images)
    mlm: float = 1.0  # weight of masked-language modelling inside ssl_loss (texts)
    temperature: float = 0.5  # NT-Xent temperature
    proj_dim: int = 64  # SimCLR projection size
    # PsCo (metassl/ssl/psco.py): weight of its loss inside ssl_loss (images; on the SimCLR views)
    psco: float = 0.0
    psco_queue: int = 16384  # queue of momentum projections (pseudo-shots are drawn from it)
    psco_momentum: float = 0.99  # EMA rate of the momentum network, in [0, 1)
    psco_shots: int = 1  # pseudo-shots per image (PsCo uses 1 on Omniglot)
    psco_temperature: float = 0.2  # MoCo term
    psco_temperature2: float = 1.0  # SupCon term over the pseudo-task
    psco_hidden: int = 4096  # projector and predictor hidden width
    psco_dim: int = 256  # projection size
    # contrastive predictive coding (audio; metassl/ssl/cpc.py): weight inside ssl_loss, on the
    # episodes' clean source clips, and how many frames ahead it predicts
    cpc: float = 0.0
    cpc_steps: int = 12


@dataclass(frozen=True)
class OptimConfig:
    """Outer-loop optimiser."""

    optimizer: str = "adam"  # adam | sgd
    outer_lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None  # clip the meta-gradient's global norm
    schedule: str = "constant"  # constant | cosine (decays to 0 over train.steps)


@dataclass(frozen=True)
class TrainConfig:
    """Length of the run, logging, validation and checkpoints."""

    steps: int = 1000  # outer steps
    log_every: int = 50  # console and TensorBoard train scalars
    val_every: int = 250  # meta-validation every this many steps (0: only at the end)
    val_episodes: int = 200  # episodes per meta-validation
    checkpoint_every: int = 250  # save a checkpoint every this many steps
    keep_checkpoints: int = 3  # keep the last k step checkpoints (plus best.pt)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    # auto: one GPU per worker when there are enough (NCCL on Ray), else CPU (gloo) | cpu | cuda
    device: str = "auto"
    max_failures: int = 2  # Ray backend: worker failures to recover from (from the last checkpoint)
    max_minutes: float = 0.0  # stop early (then validate, save, evaluate) after this wall time; 0: no limit
    pretrain_baseline_steps: int = 5000  # sinusoid: steps of the pretrained-on-all-tasks baseline
    # a step whose loss or meta-gradient is NaN/inf: stop (exit 2, naming the step and the
    # last good checkpoint) or skip it (no update; counted as train/skipped_steps)
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10  # skip mode: stop after this many non-finite steps in a row
    # the training step's forward passes (meta-learner and SSL views) in fp32, or under bf16
    # autocast (weights, gradients, optimizer and evaluation stay fp32); auto: bf16 for image
    # runs of ProtoNet / Matching Networks on hardware with bf16 matrix units (CPU AMX, CUDA
    # bf16), fp32 otherwise. fp32 by default: the one full bf16 run measured lost accuracy
    # (experiments/RESULTS.md). The choice made is in result.json ("precision").
    precision: str = "fp32"


@dataclass(frozen=True)
class AugmentConfig:
    """Random view of an image: affine warp, optional elastic warp, noise and erasing (batched in torch)."""

    rotation_deg: float = 15.0  # rotation drawn from U[-r, r] degrees
    translate: float = 0.1  # shift drawn from U[-t, t] of the image size, per axis
    scale_min: float = 0.8  # zoom drawn from U[scale_min, scale_max]
    scale_max: float = 1.2
    shear_deg: float = 10.0  # shear drawn from U[-s, s] degrees
    elastic_alpha: float = 0.0  # elastic displacement strength in pixels (0: off)
    elastic_sigma: float = 3.0  # smoothness of the elastic field in pixels
    noise_std: float = 0.0  # Gaussian pixel noise
    erase_prob: float = 0.0  # probability of erasing one random rectangle
    erase_max_frac: float = 0.25  # largest erased area as a fraction of the image


@dataclass(frozen=True)
class AudioAugmentConfig:
    """Random view of an audio clip: time shift, speed, gain and additive noise (batched in torch)."""

    shift: float = 0.1  # time shift drawn from U[-s, s] of the clip's length (zeros come in)
    speed_min: float = 0.9  # playback speed drawn from U[speed_min, speed_max] (pitch and tempo together)
    speed_max: float = 1.1
    gain_db: float = 6.0  # gain drawn from U[-g, g] dB
    noise_prob: float = 0.5  # probability of adding white noise
    snr_db_min: float = 10.0  # its signal-to-noise ratio drawn from U[snr_db_min, snr_db_max] dB
    snr_db_max: float = 30.0
    # a random smooth equaliser (another microphone or room): a gain curve over frequency of at most
    # +-eq_db dB, the sum of 4 cosines over the band with random weights (0: off)
    eq_db: float = 0.0


@dataclass(frozen=True)
class GenerativeConfig:
    """`generator.kind: generative`: a VAE or GAN learns the unlabelled images; tasks are decoded latent codes."""

    # a fitted generative model: `metassl fit-generative` run directory or .pt (path or URI); None:
    # `metassl train` fits one first into RUN/generative (resumed there on a re-run)
    checkpoint: str | None = None
    model: str = "vae"  # vae | gan (DCGAN-style, spectral norm, hinge loss)
    decoder: str = "bernoulli"  # vae: bernoulli | gaussian (one learned scale)
    latent_dim: int = 32
    hidden: int = 32  # channels of the first conv layer (the second has twice as many)
    beta: float = 1.0  # vae: weight of the KL term
    steps: int = 3000  # optimiser steps of the fit
    batch_size: int = 64  # images per step (split across workers)
    lr: float = 0.001  # Adam learning rate (the GAN uses betas 0.5, 0.999 for both nets)
    sample_every: int = 500  # a grid of samples in TensorBoard every this many steps
    max_minutes: float = 0.0  # stop the fit after this wall time (0: no limit)
    # LASIUM task sampling: n (anchor + noise) | ro (toward a random vector) | oc (toward another class's anchor)
    strategy: str = "n"
    threshold: float = 6.0  # anchors are redrawn until pairwise distances are at least this
    noise: float = 0.5  # std of the Gaussian noise added to every instance code
    interpolate: float = 0.2  # ro/oc: fraction of the way toward the random vector / other anchor
    views: bool = False  # show random views (generator.augment) of the decoded images
    # with the self-improving loop (generator.encoder: model): at each refresh point, continue the
    # fit this many steps (its own settings, optimizer state and random stream) before the next
    # episodes are decoded; 0: the fitted model throughout
    refit_steps: int = 0


@dataclass(frozen=True)
class SmlmtConfig:
    """`generator.kind: smlmt`: N-way K-shot masked-word tasks from unlabelled text (Bansal et al. 2020)."""

    skip_top: int = 30  # the most frequent words (by sentences containing them) never make a class
    min_sentences: int = 0  # a word makes a class when at least this many sentences hold it (0: k_shot + n_query)
    mlm_prob: float = 0.15  # masked-language-modelling view: share of the real word pieces masked
    ssl_texts: int = 32  # texts per episode in the SSL views (SimCSE pairs, masked-token view)
    word_dropout: float = 0.0  # SimCSE views: each drops each word with this probability (0: dropout only)


@dataclass(frozen=True)
class GeneratorConfig:
    """Where training episodes come from when labels are not used."""

    # labelled (sampler over true classes) | augment (UMTRA) | cluster (CACTUs) | generative (LASIUM)
    # | mix (several of them by episode id, generator.mix) | smlmt (masked-word tasks from text)
    kind: str = "labelled"
    # Ray generator actors per training process; 0: generate in the training process;
    # -1 (auto): `train --backend ray` gives each worker an equal share of the CPUs left
    # after the training workers (at least 1), `generate` uses one actor per CPU, and
    # `train --backend local` generates in process.
    actors: int = -1
    max_in_flight: int = 4  # chunks requested but not yet consumed (backpressure)
    episodes_per_task: int = 32  # episodes one actor call makes (a chunk)
    clusters: int = 200  # cluster: k of k-means
    partitions: int = 5  # cluster: k-means runs with different seeds (P partitions)
    encoder: str = "pca"  # cluster: pca (fixed, on pixels) | model (the network being meta-trained)
    embedding_dim: int = 64  # cluster: PCA components
    refresh_every: int = 0  # cluster with encoder=model: publish new encoder weights every M steps (0: never)
    # cluster with encoder=model: make augment (UMTRA) episodes for the first W steps, then
    # cluster the embedding of the network trained so far (0: cluster from step 0)
    warmup_steps: int = 0
    # cluster: threads that embed the pool's chunks and run the k-means partitions side by side,
    # each on one thread, so the partitions do not depend on it. 0 (auto): on Ray actors, the
    # CPUs Ray allots a training worker and its actors, shared by the actors (training waits for
    # a refresh, so with one worker and one actor: 2); in process, the process's torch threads.
    refresh_threads: int = 0
    # cluster with encoder=model: publish an EMA of the network (this rate, in [0, 1); BatchNorm
    # statistics copied) instead of its last iterate at each refresh; 0: the network itself. The
    # EMA starts at step 0 from the initial network, whose weight is m^s after s steps
    encoder_momentum: float = 0.0
    # cluster: episodes draw each cluster's members from its core, its ceil(core_fraction x size)
    # members nearest its mean embedding (in (0, 1]; 1: every member); a cluster whose core is
    # smaller than k_shot + n_query makes no episodes
    core_fraction: float = 1.0
    cluster_views: bool = False  # cluster: show random views (generator.augment) instead of raw images
    ssl_views: bool = False  # also emit two augmented views (SimCLR) and rotated copies per episode image
    shards: str | None = None  # train on episodes written by `metassl generate` (path or URI) instead
    # kind mix: generator kinds and their weights, e.g. {cluster: 0.75, generative: 0.25}; episode i
    # comes from the kind its id picks (a fixed low-discrepancy sequence, so the proportions hold
    # over every run of consecutive ids), made by that kind's own settings
    mix: dict = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    audio: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)  # the views of audio clips
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)
    smlmt: SmlmtConfig = field(default_factory=SmlmtConfig)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after training (None: use the training episode shape)."""

    split: str = "test"
    n_way: int | None = None
    k_shot: int | None = None
    n_query: int | None = None
    episodes: int = 1000
    seed: int = 0
    inner_steps: int | None = None  # None: learner.eval_inner_steps
    # also evaluate the network as initialised (same episodes) and print both side by side
    compare_untrained: bool = False
    # metric learners with a per-item backbone (no batch statistics at test time) embed every
    # item the episodes use once, not once per episode it appears in; false: one pass per episode
    embed_once: bool = True
    # support and queries from disjoint halves of the split's groups, drawn per episode (audio: the
    # speakers of arabic_speech_commands' keywords, or its keywords when the speakers are the classes)
    disjoint_groups: bool = False
    # the embeddings ProtoNet compares at test time (validation included): raw (as in training)
    # or l2 (each embedding scaled to unit length before prototypes are averaged and distances
    # taken). Other learners: raw only (Matching Networks' cosine attention is already scale-free)
    features: str = "raw"
    # test-time shift averaging (ProtoNet on images): each image is also embedded shifted by up
    # to this many pixels in x and y ((2r+1)^2 views, edges replicated) and its embeddings (of
    # the `features` view) averaged; every image on its own, so nothing passes between queries.
    # Validation ranks checkpoints without the shifts (the `features` view alone)
    shifts: int = 0


@dataclass(frozen=True)
class TuneConfig:
    """`metassl tune`: the search over config keys (training ignores this section).

    `space` maps config keys to a distribution, e.g.
    `{"learner.inner_lr": {"loguniform": [0.01, 1.0]}, "learner.name": {"choice": [maml, fomaml]}}`;
    kinds: loguniform [low, high], uniform [low, high], choice [values], grid [values]
    (every value, `samples` times each).
    """

    space: dict = field(default_factory=dict)
    samples: int = 8  # trials (per grid point)
    search: str = "random"  # random (Tune's variant generator; supports grid) | optuna
    workers: int = 1  # Ray Train workers per trial
    concurrent: int = 0  # trials at once (0: as many as the cluster's CPUs hold)
    grace_steps: int = 0  # ASHA: steps before a trial may be stopped (0: train.val_every)
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_failures: int = 1  # retries of a trial that raised
    # wall-time budget of the whole sweep (Tune's time_budget_s): trials still running then
    # are stopped and the best so far wins; 0: no budget (trials end by train.steps/max_minutes)
    max_minutes: float = 0.0


@dataclass(frozen=True)
class Config:
    """A whole experiment; `config.yaml` in a run directory is this, resolved."""

    name: str = "experiment"
    seed: int = 0
    # where run directories live (runs/<name> by default): a folder or a URI such as
    # s3://bucket/prefix or gs://bucket/prefix (credentials from the environment)
    storage: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self):
        _validate(self)


CHOICES = {
    "model.backbone": ("conv4", "mlp", "transformer", "audio"),
    "model.context_net": ("gru", "none"),
    "model.frontend": ("waveform", "logmel"),
    "data.class_split": ("primary", "domain_disjoint", "speakers"),
    "model.pooling": ("mean", "attention", "first_last"),
    "model.norm": ("layer", "group", "batch", "batch_transductive", "none"),
    "learner.name": ("maml", "fomaml", "reptile", "protonet", "matchingnet"),
    "optim.optimizer": ("adam", "sgd"),
    "optim.schedule": ("constant", "cosine"),
    "data.protocol": ("supervised", "unsupervised", "psco"),
    "eval.split": ("train", "val", "test"),
    "eval.features": ("raw", "l2"),
    "generator.kind": ("labelled", "augment", "cluster", "generative", "mix", "smlmt"),
    "generator.generative.model": ("vae", "gan"),
    "generator.generative.decoder": ("bernoulli", "gaussian"),
    "generator.generative.strategy": ("n", "ro", "oc"),
    "generator.encoder": ("pca", "model"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.precision": ("auto", "fp32", "bf16"),
    "tune.search": ("random", "optuna"),
}
POSITIVE = [
    "learner.inner_lr", "optim.outer_lr", "episodes.k_shot", "episodes.n_query", "episodes.meta_batch",
    "train.steps", "train.log_every", "train.val_episodes", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_skipped_steps", "eval.episodes", "data.image_size", "model.hidden", "learner.matching_scale",
    "generator.max_in_flight", "generator.episodes_per_task", "generator.clusters", "generator.partitions",
    "generator.embedding_dim", "objective.temperature", "objective.proj_dim",
    "objective.psco_queue", "objective.psco_shots", "objective.psco_temperature", "objective.psco_temperature2",
    "objective.psco_hidden", "objective.psco_dim",
    "generator.generative.latent_dim", "generator.generative.hidden", "generator.generative.steps",
    "generator.generative.lr", "generator.generative.sample_every",
    "tune.samples", "tune.workers", "tune.reduction_factor",
    "data.vocab_size", "data.max_tokens", "model.layers", "model.heads", "generator.smlmt.ssl_texts",
    "data.sample_rate", "data.clip_seconds", "model.context", "objective.cpc_steps", "model.n_fft", "model.hop",
    "model.mel_bands",
]
NON_NEGATIVE = ["eval.shifts", "learner.inner_steps", "learner.eval_inner_steps", "optim.weight_decay", "train.val_every",
                "train.threads", "train.pretrain_baseline_steps", "train.max_minutes",
                "generator.refresh_every", "generator.warmup_steps", "generator.refresh_threads", "generator.encoder_momentum", "objective.ssl_weight", "objective.simclr",
                "objective.rotation", "train.max_failures", "tune.concurrent", "tune.grace_steps",
                "tune.max_failures", "tune.max_minutes", "generator.generative.beta",
                "generator.generative.max_minutes", "generator.generative.threshold", "generator.generative.noise",
                "generator.generative.refit_steps",
                "objective.mlm", "objective.meta_weight", "objective.psco", "objective.psco_momentum", "model.dropout", "generator.smlmt.skip_top", "generator.smlmt.min_sentences",
                "objective.cpc"]


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


SPACE_KINDS = ("loguniform", "uniform", "choice", "grid")


def _validate_space(space: Any) -> None:
    """Check the form of `tune.space` (the values themselves are checked by `metassl tune`)."""
    if not isinstance(space, dict):
        raise ConfigError(f"tune.space must map config keys to distributions, got {type(space).__name__}")
    form = "{loguniform: [low, high]}, {uniform: [low, high]}, {choice: [values]} or {grid: [values]}"
    for key, spec in space.items():
        section, _, name = str(key).partition(".")
        fields = {f.name: f.type for f in dataclasses.fields(Config)}
        inner = typing.get_type_hints(Config).get(section)
        ok = (section in fields and section != "tune" and (
            (not name and not dataclasses.is_dataclass(inner))
            or (dataclasses.is_dataclass(inner) and name in {f.name for f in dataclasses.fields(inner)})))
        if not ok:
            raise ConfigError(f"tune.space: {key!r} is not a config key one can tune (e.g. learner.inner_lr)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"tune.space[{key!r}] must be one of {form}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tune.space[{key!r}].{kind} must be a non-empty list, got {values!r}")
        if kind in ("loguniform", "uniform"):
            try:
                low, high = (float(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(f"tune.space[{key!r}].{kind} must be [low, high], got {values!r}") from None
            if not (math.isfinite(low) and math.isfinite(high)) or not low < high or (
                    kind == "loguniform" and low <= 0):
                raise ConfigError(f"tune.space[{key!r}].{kind}={values}: need "
                                  f"{'0 < ' if kind == 'loguniform' else ''}low < high")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Upper bounds that no real run reaches: a value past them is a typo or hostile, and would
# otherwise hang or exhaust memory instead of failing.
AT_MOST = {
    "train.val_episodes": 1_000_000, "eval.episodes": 1_000_000, "eval.shifts": 8, "train.threads": 1024,
    "generator.episodes_per_task": 100_000, "generator.max_in_flight": 10_000, "generator.actors": 100_000,
    "generator.clusters": 1_000_000, "generator.partitions": 1_000, "generator.refresh_threads": 1024, "tune.samples": 100_000,
    "tune.workers": 10_000, "tune.concurrent": 100_000, "learner.inner_steps": 10_000,
    "learner.eval_inner_steps": 10_000, "train.max_failures": 1_000, "train.keep_checkpoints": 100_000,
    "data.image_size": 4096, "model.hidden": 65_536, "objective.proj_dim": 65_536,
    "objective.psco_queue": 10_000_000, "objective.psco_hidden": 65_536, "objective.psco_dim": 65_536,
    "generator.embedding_dim": 65_536, "generator.generative.latent_dim": 65_536,
    "generator.generative.hidden": 4096, "generator.generative.batch_size": 1_000_000,
    "generator.generative.steps": 10**9, "generator.generative.refit_steps": 10**9,
    "data.vocab_size": 1_000_000, "data.max_tokens": 8192, "model.layers": 256, "model.heads": 1024,
    "generator.smlmt.ssl_texts": 100_000, "generator.smlmt.skip_top": 10**9, "generator.smlmt.min_sentences": 10**9,
    "data.sample_rate": 384_000, "data.clip_seconds": 60.0, "model.context": 65_536, "objective.cpc_steps": 10_000,
    "model.n_fft": 65_536, "model.hop": 65_536, "model.mel_bands": 1024,
}
MAX_SEED = 2**31 - 1
MAX_BATCH_BYTES = 64 * 2**30  # first-layer activations of one meta-batch (float32)
MAX_PARAMS = 2_000_000_000  # parameters of the backbone, its head and the SSL heads


def _check_sizes(cfg: Config) -> None:
    """Refuse shapes that cannot fit in memory, naming the keys, before any data is loaded."""
    ep, m = cfg.episodes, cfg.model
    if cfg.data.dataset == "sinusoid":
        return
    way, shot, query = (cfg.eval.n_way or ep.n_way, cfg.eval.k_shot or ep.k_shot, cfg.eval.n_query or ep.n_query)
    side = cfg.data.image_size
    if m.backbone == "transformer":
        side = 1  # a text's activations: max_tokens x 4 * hidden (the MLP of a block)
        per_image = cfg.data.max_tokens * 4 * m.hidden * 4
    elif m.backbone == "audio":  # a clip's first-layer activations: hidden x (samples or frames) / first stride
        side = 1
        steps = round(cfg.data.sample_rate * cfg.data.clip_seconds) // (m.hop if m.frontend == "logmel" else 1)
        per_image = m.hidden * steps // max(m.strides[0], 1) * 4
    else:
        per_image = m.hidden * side * side * 4 if m.backbone == "conv4" else 4 * max(m.mlp_hidden or (1,))
    for keys, images in (
            ("episodes.meta_batch x episodes.n_way x (episodes.k_shot + episodes.n_query)",
             ep.meta_batch * ep.n_way * (ep.k_shot + ep.n_query)),
            ("eval n_way x (k_shot + n_query)", way * (shot + query))):
        if images * per_image > MAX_BATCH_BYTES:
            raise ConfigError(f"{keys} = {images} images of {side}x{side} with model.hidden={m.hidden} need "
                              f"{images * per_image / 2**30:.3g} GiB of activations per layer; at most "
                              f"{MAX_BATCH_BYTES / 2**30:g} GiB")
    if m.backbone == "transformer":
        params = (cfg.data.vocab_size + cfg.data.max_tokens) * m.hidden + m.layers * 12 * m.hidden ** 2
        params += cfg.data.vocab_size * m.hidden if cfg.objective.ssl_weight else 0  # the MLM head
        if params > MAX_PARAMS:
            raise ConfigError(f"data.vocab_size={cfg.data.vocab_size}, model.hidden={m.hidden}, model.layers="
                              f"{m.layers} make {params:.3g} parameters; at most {MAX_PARAMS:.3g}")
    if m.backbone == "conv4":
        dim = m.hidden * (side // 16) ** 2
        params = 9 * m.hidden * (cfg.data.channels + 3 * m.hidden) + dim * max(ep.n_way, way)
        params += (dim * dim + dim * cfg.objective.proj_dim) if cfg.objective.ssl_weight else 0
        if params > MAX_PARAMS:
            raise ConfigError(f"model.hidden={m.hidden}, data.image_size={side} (and the heads) make "
                              f"{params:.3g} parameters; at most {MAX_PARAMS:.3g}")


def _validate(cfg: Config) -> None:
    if not NAME_PATTERN.fullmatch(cfg.name):
        raise ConfigError(f"name={_short(cfg.name)} must be a plain name (letters, digits, '_', '.', '-'; "
                          "starting with a letter or digit; at most 100 characters): it names the run "
                          "directory <storage>/<name>")
    for key in ("seed", "eval.seed", "data.split_seed"):
        if not 0 <= _get(cfg, key) <= MAX_SEED:
            raise ConfigError(f"{key}={_get(cfg, key)} must be in [0, {MAX_SEED}]")
    for key, most in AT_MOST.items():
        if _get(cfg, key) is not None and _get(cfg, key) > most:
            raise ConfigError(f"{key}={_get(cfg, key)} is larger than the most that can run ({most})")
    for key in ("episodes.n_way", "episodes.k_shot", "episodes.n_query", "episodes.meta_batch",
                "train.steps", "train.log_every", "train.val_every", "train.checkpoint_every"):
        if _get(cfg, key) > 10**12:
            raise ConfigError(f"{key}={_get(cfg, key)} is out of range (at most 10**12)")
    _validate_space(cfg.tune.space)
    for key, valid in CHOICES.items():
        if _get(cfg, key) not in valid:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(valid)}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if _get(cfg, key) is not None and _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    if cfg.eval.features != "raw" and cfg.learner.name != "protonet":
        why = ("its cosine attention is the same on unit-length embeddings" if cfg.learner.name == "matchingnet"
               else "it classifies with adapted weights, not embedding distances")
        raise ConfigError(f"eval.features={cfg.eval.features!r} applies to ProtoNet's embeddings; "
                          f"learner.name={cfg.learner.name!r}: {why}; leave eval.features 'raw'")
    if cfg.eval.shifts:
        problem = ("applies to ProtoNet's embeddings" if cfg.learner.name != "protonet" else
                   "shifts images" if is_text_config(cfg) or is_audio_config(cfg) or cfg.data.dataset == "sinusoid"
                   else "embeds each image on its own" if cfg.model.norm == "batch_transductive" else None)
        if problem:
            raise ConfigError(f"eval.shifts={cfg.eval.shifts} {problem}; this run has learner.name="
                              f"{cfg.learner.name!r}, data.dataset={cfg.data.dataset!r}, model.norm={cfg.model.norm!r}: "
                              "leave eval.shifts 0")
    if cfg.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor={cfg.tune.reduction_factor} must be >= 2 (ASHA keeps 1/rf per rung)")
    if cfg.generator.actors < -1:
        raise ConfigError(f"generator.actors={cfg.generator.actors} must be >= 0, or -1 for auto")
    g = cfg.generator
    _validate_generative(cfg)
    if g.warmup_steps and not ("cluster" in generator_kinds(cfg) and g.encoder == "model"):
        raise ConfigError(f"generator.warmup_steps={g.warmup_steps} needs generator.kind='cluster' (or a mix "
                          "with cluster) with encoder='model' (it delays clustering the model's embedding)")
    if not g.encoder_momentum < 1:
        raise ConfigError(f"generator.encoder_momentum={g.encoder_momentum} must be in [0, 1)")
    if not 0 < g.core_fraction <= 1:
        raise ConfigError(f"generator.core_fraction={g.core_fraction} must be in (0, 1]")
    if g.core_fraction < 1 and "cluster" not in generator_kinds(cfg):
        raise ConfigError(f"generator.core_fraction={g.core_fraction} needs generator.kind 'cluster' "
                          "(or a mix with cluster)")
    if g.encoder_momentum and not ("cluster" in generator_kinds(cfg) and g.encoder == "model" and not g.shards
                                   and (g.refresh_every or g.warmup_steps)):
        raise ConfigError(f"generator.encoder_momentum={g.encoder_momentum} needs the self-improving loop: "
                          "generator.kind 'cluster' (or a mix with cluster), encoder 'model', no generator.shards, "
                          "and refresh_every or warmup_steps > 0 (it smooths the encoder each refresh publishes)")
    if cfg.learner.learn_inner_lr and cfg.learner.name not in ("maml", "fomaml"):
        raise ConfigError(f"learner.learn_inner_lr=true (Meta-SGD) needs learner.name 'maml' or 'fomaml', "
                          f"got {cfg.learner.name!r}")
    if cfg.learner.head_only and cfg.data.dataset == "sinusoid":
        raise ConfigError("learner.head_only=true adapts a classifier head; the sinusoid MLP has none")
    if cfg.learner.head_only and cfg.learner.name not in ("maml", "fomaml"):
        raise ConfigError(f"learner.head_only=true (ANIL) is for learner.name 'maml' or 'fomaml', got {cfg.learner.name!r}")
    if cfg.learner.zero_head and cfg.learner.name not in ("maml", "fomaml"):
        raise ConfigError(f"learner.zero_head=true is for learner.name 'maml' or 'fomaml', got {cfg.learner.name!r}")
    if cfg.learner.zero_head and cfg.learner.learn_inner_lr:
        raise ConfigError("learner.zero_head and learner.learn_inner_lr (Meta-SGD) do not combine: the zero head "
                          "is as wide as each episode, so it has no fixed shape to learn step sizes for")
    if cfg.learner.vectorize and cfg.learner.name not in ("maml", "fomaml"):
        raise ConfigError(f"learner.vectorize=true maps MAML's inner loop with vmap; learner.name="
                          f"{cfg.learner.name!r} has none (use maml or fomaml)")
    if cfg.episodes.n_way < 2:
        raise ConfigError(f"episodes.n_way={cfg.episodes.n_way} must be >= 2")
    for key in ("eval.n_way", "eval.k_shot", "eval.n_query", "eval.inner_steps"):
        value = _get(cfg, key)
        if value is not None and value < (2 if key == "eval.n_way" else 0 if key == "eval.inner_steps" else 1):
            raise ConfigError(f"{key}={value} is out of range")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip={cfg.optim.grad_clip} must be > 0 or null")
    fr = cfg.data.split_fractions
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(f"data.split_fractions={list(fr)} must be three fractions > 0 "
                          "(train, val, test) that sum to 1")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels={cfg.data.channels} must be 1 or 3")
    a = cfg.generator.augment
    for key in ("rotation_deg", "translate", "shear_deg", "elastic_alpha", "elastic_sigma", "noise_std"):
        if getattr(a, key) < 0:
            raise ConfigError(f"generator.augment.{key}={getattr(a, key)} must be >= 0")
    if not 0 < a.scale_min <= a.scale_max:
        raise ConfigError(f"generator.augment.scale_min={a.scale_min}, scale_max={a.scale_max}: "
                          "need 0 < scale_min <= scale_max")
    if not 0 <= a.erase_prob <= 1 or not 0 < a.erase_max_frac <= 1:
        raise ConfigError(f"generator.augment.erase_prob={a.erase_prob} must be in [0, 1] and "
                          f"erase_max_frac={a.erase_max_frac} in (0, 1]")
    if cfg.generator.kind != "labelled" and cfg.data.dataset == "sinusoid":
        raise ConfigError(f"generator.kind={cfg.generator.kind!r} makes image episodes; sinusoid needs 'labelled'")
    if cfg.objective.ssl_weight > 0 and not cfg.generator.ssl_views:
        raise ConfigError(f"objective.ssl_weight={cfg.objective.ssl_weight} needs SSL views: set "
                          "generator.ssl_views=true (with a generator.kind other than labelled)")
    if cfg.objective.meta_weight == 0 and cfg.objective.ssl_weight == 0:
        raise ConfigError("objective.meta_weight=0 and objective.ssl_weight=0 leave nothing to train on")
    o = cfg.objective
    if o.psco:
        if not o.psco_momentum < 1:
            raise ConfigError(f"objective.psco_momentum={o.psco_momentum} must be in [0, 1)")
        if o.psco_shots > o.psco_queue:
            raise ConfigError(f"objective.psco_shots={o.psco_shots} cannot exceed objective.psco_queue={o.psco_queue}")
        if is_text_config(cfg) or is_audio_config(cfg) or cfg.data.dataset == "sinusoid":
            raise ConfigError("objective.psco contrasts image views; use it with an image dataset")
    if cfg.generator.ssl_views and cfg.generator.kind == "labelled" and not cfg.generator.shards:
        raise ConfigError("generator.ssl_views=true needs generator.kind 'augment', 'cluster', 'generative', 'mix' "
                          "or 'smlmt'")
    _check_sizes(cfg)
    if cfg.model.norm == "group" and cfg.model.hidden % 8:
        raise ConfigError(f"model.norm='group' uses 8 groups, so model.hidden={cfg.model.hidden} must be a multiple of 8")
    head_learner = cfg.learner.name in ("maml", "fomaml", "reptile") and not cfg.learner.zero_head
    if head_learner and cfg.eval.n_way not in (None, cfg.episodes.n_way):
        raise ConfigError(f"eval.n_way={cfg.eval.n_way}: learner {cfg.learner.name!r} trains an "
                          f"episodes.n_way={cfg.episodes.n_way}-way classifier head and is evaluated with the same "
                          f"n_way (learner.zero_head=true adapts a head of any width)")
    regression = cfg.data.dataset == "sinusoid"
    wanted = "mlp" if regression else "transformer" if is_text_config(cfg) else "audio" if is_audio_config(cfg) \
        else "conv4"
    if cfg.model.backbone != wanted:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r} needs model.backbone={wanted!r}, "
                          f"got {cfg.model.backbone!r}")
    _validate_text(cfg)
    _validate_audio(cfg)
    if regression and cfg.learner.name not in ("maml", "fomaml", "reptile"):
        raise ConfigError(f"learner.name={cfg.learner.name!r} classifies; sinusoid regression needs "
                          "maml, fomaml or reptile")


MIXABLE = ("augment", "cluster", "generative")
TEXT_DATASETS = ("clinc150", "text")
AUDIO_DATASETS = ("arabic_speech_commands", "audio")


def is_text_config(cfg: Config) -> bool:
    """True when the run's data are texts (clinc150, text:PATH)."""
    return cfg.data.dataset.partition(":")[0] in TEXT_DATASETS


def is_audio_config(cfg: Config) -> bool:
    """True when the run's data are audio clips (arabic_speech_commands, audio:PATH)."""
    return cfg.data.dataset.partition(":")[0] in AUDIO_DATASETS


def _validate_audio(cfg: Config) -> None:
    audio, m, o, a = is_audio_config(cfg), cfg.model, cfg.objective, cfg.generator.audio
    name = cfg.data.dataset.partition(":")[0]
    if cfg.data.class_split == "speakers" and name != "arabic_speech_commands":
        raise ConfigError("data.class_split='speakers' is arabic_speech_commands' speaker split; "
                          f"data.dataset={cfg.data.dataset!r} has none")
    if cfg.data.class_split == "domain_disjoint" and name != "clinc150":
        raise ConfigError(f"data.class_split='domain_disjoint' is CLINC150's; data.dataset={cfg.data.dataset!r} "
                          "has none")
    if len(m.kernels) != len(m.strides) or not m.kernels or min(m.kernels) < 1 or min(m.strides) < 1:
        raise ConfigError(f"model.kernels={list(m.kernels)} and model.strides={list(m.strides)} must be lists of "
                          "positive integers of the same, non-zero length (one per convolution)")
    if o.cpc and not audio:
        raise ConfigError("objective.cpc predicts future audio frames; use it with an audio dataset "
                          "(arabic_speech_commands, audio:PATH)")
    if audio:
        kinds = generator_kinds(cfg)
        if any(k not in ("labelled", "augment", "cluster") for k in kinds) and not cfg.generator.shards:
            raise ConfigError(f"generator.kind={cfg.generator.kind!r}: audio episodes come from 'labelled', "
                              "'augment' (clips as classes, views as instances) or 'cluster' (or a mix of these)")
        frames = round(cfg.data.sample_rate * cfg.data.clip_seconds)
        if m.frontend == "logmel":
            if m.n_fft > frames:
                raise ConfigError(f"model.n_fft={m.n_fft} is longer than a clip ({frames} samples)")
            frames = frames // m.hop + 1  # torch.stft's centred frames
        for k, s in zip(m.kernels, m.strides):
            frames = (frames - k) // s + 1 if frames >= k else 0
        if frames < 1:
            raise ConfigError(f"data.clip_seconds={cfg.data.clip_seconds} at data.sample_rate={cfg.data.sample_rate} "
                              f"is too short for model.kernels={list(m.kernels)}, model.strides={list(m.strides)}")
        if o.cpc and o.cpc_steps >= frames:
            raise ConfigError(f"objective.cpc_steps={o.cpc_steps} must be fewer than the {frames} frames of a clip")
    if not (0 < a.speed_min <= a.speed_max) or not 0 <= a.shift < 1 or a.gain_db < 0 or not 0 <= a.noise_prob <= 1 \
            or not a.snr_db_min <= a.snr_db_max or not a.eq_db >= 0:
        raise ConfigError(f"generator.audio={a}: need 0 < speed_min <= speed_max, 0 <= shift < 1, gain_db >= 0, "
                          "noise_prob in [0, 1], snr_db_min <= snr_db_max and eq_db >= 0")
    if m.cmn and m.frontend != "logmel":
        raise ConfigError("model.cmn=true normalises log-mel bands; it needs model.frontend='logmel'")


def _validate_text(cfg: Config) -> None:
    text, g = is_text_config(cfg), cfg.generator
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if not 0 <= g.smlmt.word_dropout < 1:
        raise ConfigError(f"generator.smlmt.word_dropout={g.smlmt.word_dropout} must be in [0, 1)")
    if not 0 < g.smlmt.mlm_prob < 1:
        raise ConfigError(f"generator.smlmt.mlm_prob={g.smlmt.mlm_prob} must be in (0, 1)")
    if g.smlmt.ssl_texts < 2 and g.ssl_views:
        raise ConfigError(f"generator.smlmt.ssl_texts={g.smlmt.ssl_texts}: contrastive views need at least 2 texts")
    if text and g.kind not in ("labelled", "smlmt") and not g.shards:
        raise ConfigError(f"generator.kind={g.kind!r} makes image episodes; for text use 'smlmt' "
                          "(masked-word tasks) or 'labelled'")
    if not text and g.kind == "smlmt":
        raise ConfigError(f"generator.kind='smlmt' makes masked-word tasks from text; data.dataset="
                          f"{cfg.data.dataset!r} is not text (clinc150, text:PATH)")
    if cfg.data.tokenizer is not None:
        _check_text(cfg.data.tokenizer, "data.tokenizer")
    if text and cfg.model.hidden % cfg.model.heads:
        raise ConfigError(f"model.hidden={cfg.model.hidden} must be a multiple of model.heads={cfg.model.heads}")
    if text and cfg.data.max_tokens < 4:
        raise ConfigError(f"data.max_tokens={cfg.data.max_tokens} must be at least 4 ([CLS], [SEP] and two pieces)")


def generator_kinds(cfg: Config) -> tuple[str, ...]:
    """The generator kinds a config's episodes come from: `generator.kind`, or the kinds of its mix."""
    g = cfg.generator
    return tuple(g.mix) if g.kind == "mix" else (g.kind,)


def _validate_generative(cfg: Config) -> None:
    g, gen = cfg.generator, cfg.generator.generative
    if not isinstance(g.mix, dict):
        raise ConfigError(f"generator.mix={_short(g.mix)} must map generator kinds to weights, "
                          "e.g. {cluster: 0.75, generative: 0.25}")
    for kind, weight in g.mix.items():  # YAML reads 1e-3 as a string: weights are numbers
        if isinstance(weight, str):
            try:
                g.mix[kind] = float(weight)
            except ValueError:
                pass
    if g.kind == "mix":
        if not g.mix:
            raise ConfigError("generator.kind='mix' needs generator.mix, e.g. {cluster: 0.75, generative: 0.25}")
        for kind, weight in g.mix.items():
            if kind not in MIXABLE:
                raise ConfigError(f"generator.mix names {_short(kind)}; the kinds that mix are {list(MIXABLE)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise ConfigError(f"generator.mix.{kind}={_short(weight)} must be a weight > 0")
    elif g.mix:
        raise ConfigError(f"generator.mix is set but generator.kind={g.kind!r}; set generator.kind='mix' to use it")
    if gen.batch_size < 2:
        raise ConfigError(f"generator.generative.batch_size={gen.batch_size} must be >= 2")
    if not 0 <= gen.interpolate < 1:
        raise ConfigError(f"generator.generative.interpolate={gen.interpolate} must be in [0, 1)")
    if cfg.data.image_size % 4 and ("generative" in generator_kinds(cfg) or gen.checkpoint is not None):
        raise ConfigError(f"data.image_size={cfg.data.image_size}: the generative models need a multiple of 4")
    if gen.model == "gan" and gen.decoder != "bernoulli":
        raise ConfigError(f"generator.generative.decoder={gen.decoder!r} is the VAE's likelihood; the GAN "
                          "(model: gan) has none: leave decoder at its default")
    if gen.checkpoint is not None:
        _check_text(gen.checkpoint, "generator.generative.checkpoint")
    if gen.refit_steps and not ("generative" in generator_kinds(cfg) and "cluster" in generator_kinds(cfg)
                                and g.encoder == "model" and not g.shards):
        raise ConfigError(f"generator.generative.refit_steps={gen.refit_steps} continues the generative fit at the "
                          "self-improving loop's refresh points: it needs generative episodes beside clusters of "
                          "the network's own embedding (generator.kind: mix with cluster and generative, "
                          "generator.encoder: model), and no generator.shards")


def actors_per_worker(requested: int, workers: int, cpus: float) -> int:
    """`generator.actors` for each of `workers` training workers on a cluster with `cpus` CPUs.

    `requested` >= 0 is kept; -1 (auto) gives each worker an equal share of the CPUs
    left after the workers' own (one each), at least 1.
    """
    if requested >= 0:
        return requested
    return max(1, (int(cpus) - workers) // workers)


def refresh_threads(requested: int, actors: int, actor_cpus: float, waiting_cpus: float) -> int:
    """`generator.refresh_threads` for each of `actors` generator actors of ~actor_cpus CPUs each.

    `requested` >= 1 is kept; 0 (auto) shares among the actors the CPUs Ray allots them and
    the process that waits for them (a training worker's `waiting_cpus`, idle during a
    refresh), rounded down, at least 1: one worker and one actor of one CPU each give 2.
    """
    if requested >= 1:
        return requested
    return max(1, int((actors * actor_cpus + waiting_cpus) / max(actors, 1) + 1e-9))


# --- loading -------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}={value} is too large for a float") from None
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}={_short(value)} must be of type {tp.__name__}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number (NaN and infinity are refused)")
    if tp is int and abs(value) > MAX_INT:
        raise ConfigError(f"{key}={value} is out of range (|value| <= {MAX_INT})")
    if tp is str:
        _check_text(value, key)
    return value


MAX_INT = 2**62  # larger integers cannot be a count, a size or a seed


def _check_text(value: str, key: str) -> None:
    """Strings in a config name things (paths, datasets, URIs): no control characters, no novels."""
    if len(value) > 4096:
        raise ConfigError(f"{key} is {len(value)} characters long; at most 4096")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{key}={_short(value)} contains the control character {bad!r}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def from_dict(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build the dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        where = f"in '{prefix}' " if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value or {}, tp, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    """Return the config as plain nested dicts and lists (YAML- and JSON-safe)."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v
    return plain(dataclasses.asdict(cfg))


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the dotted `key` (e.g. `learner.inner_lr`) of a nested config dict to `value`, in place."""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return `data` with each `section.key=value` override set (values parsed as YAML)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. learner.inner_lr=0.1")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"the value of override {item!r}")
        try:
            set_key(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return data


def with_values(cfg: Config, values: dict) -> Config:
    """`cfg` with each dotted key of `values` set (validated like a loaded config)."""
    data = to_dict(cfg)
    for key, value in values.items():
        set_key(data, key, value)
    return from_dict(data)


MAX_CONFIG_BYTES = 1 << 20  # a config file or override larger than this is refused
MAX_DEPTH = 20  # nesting of mappings and lists (the real schema is 4 deep)
MAX_NODES = 100_000  # YAML nodes after alias expansion (billion-laughs guard)


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` for untrusted text: size, depth and alias expansion are bounded.

    `where` names the text in errors ("config file 'x.yaml'", "override 'k=v'"). Nesting
    deeper than MAX_DEPTH, recursive aliases, and aliases that expand to more than
    MAX_NODES nodes raise ConfigError before anything is built from the text.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # a flat event stream: no recursion
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node, where, {}, set())
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


def _expanded_size(node, where: str, sizes: dict, active: set) -> int:
    """Nodes in `node` with every alias expanded; raises ConfigError on cycles or past MAX_NODES."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError(f"{where} has a recursive alias (a node that contains itself)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if twice is not None:
            raise ConfigError(f"{where} sets the key {_short(twice)} twice in one mapping")
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    for child in children:
        size += _expanded_size(child, where, sizes, active)
        if size > MAX_NODES:
            raise ConfigError(f"{where} expands (through aliases) to more than {MAX_NODES} values")
    active.discard(key)
    sizes[key] = size
    return size


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides.

    The file is untrusted input: it must be UTF-8, at most MAX_CONFIG_BYTES, at most
    MAX_DEPTH deep and free of recursive or exploding aliases; an empty file is the defaults.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        where = f"config file {str(path)!r}"
        try:
            if not path.is_file():
                raise ConfigError(f"{where} does not exist or is not a file")
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes")
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{where} cannot be read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not UTF-8 text (byte {e.start}); a config is a YAML file") from None
        data = parse_yaml(text, where)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a mapping at the top level, got {type(data).__name__}")
    return from_dict(apply_overrides(data, overrides or []))


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

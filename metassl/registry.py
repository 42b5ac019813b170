"""Names in a config -> the objects they stand for: learners, models, episode sources."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from metassl.config import CHOICES, Config, is_audio_config, is_text_config
from metassl.data import EpisodeSampler, SinusoidTasks, check_split_allowed, load_split
from metassl.data.audio import is_audio, load_audio
from metassl.data.text import TextCorpus, is_text, read_split, to_split, unlabelled_texts
from metassl.data.tokenizer import MAX_TOKENIZER_BYTES, TextTokenizer
from metassl.errors import ConfigError, DataError
from metassl.storage import is_uri, join as storage_join, read_text, upload

TOKENIZER_FILE = "tokenizer.json"
SOURCE_FILE = "tokenizer_source.json"  # where a run's tokenizer.json came from (see tokenizer_stage)
from metassl.meta import MAML, MatchingNet, ProtoNet, Reptile
from metassl.models import build_model

# Sinusoid tasks have no classes to split, so each split draws from its own seed stream.
_SINUSOID_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def build_learner(cfg: Config):
    """Return the meta-learner named by `cfg.learner.name`."""
    lc = cfg.learner
    if lc.name in ("maml", "fomaml"):
        return MAML(lc.inner_lr, lc.inner_steps, first_order=lc.first_order or lc.name == "fomaml",
                    eval_inner_steps=lc.eval_inner_steps, vectorize=lc.vectorize, split_query=lc.split_query,
                    learn_inner_lr=lc.learn_inner_lr, zero_head=lc.zero_head, head_only=lc.head_only)
    if lc.name == "reptile":
        return Reptile(lc.inner_lr, lc.inner_steps, eval_inner_steps=lc.eval_inner_steps)
    if lc.name == "protonet":
        return ProtoNet(eval_features=cfg.eval.features, eval_shifts=cfg.eval.shifts)
    if lc.name == "matchingnet":
        return MatchingNet(lc.matching_scale)
    raise ConfigError(f"learner.name={lc.name!r} is not one of {list(CHOICES['learner.name'])}")


def is_regression(cfg: Config) -> bool:
    """True for the sinusoid regression tasks."""
    return cfg.data.dataset == "sinusoid"


def build_backbone(cfg: Config, learner) -> nn.Module:
    """Return a freshly initialised model (seeded from `cfg.seed`) with a head if the learner needs one."""
    torch.manual_seed(cfg.seed)
    if is_regression(cfg):
        out = 1
    else:
        out = cfg.episodes.n_way if learner.needs_head else None
    m = cfg.model
    return build_model(m.backbone, out_features=out, in_channels=cfg.data.channels, hidden=m.hidden,
                       norm=m.norm, image_size=cfg.data.image_size, mlp_hidden=m.mlp_hidden,
                       support_statistics=has_inner_loop(cfg), channels_last=uses_channels_last(cfg),
                       text=text_settings(cfg), audio=audio_settings(cfg))


def uses_channels_last(cfg: Config) -> bool:
    """`model.channels_last`, except under `learner.vectorize` (vmap cannot restride the conv weights)."""
    return cfg.model.channels_last and not cfg.learner.vectorize


def text_settings(cfg: Config) -> dict | None:
    """The Transformer's settings for a text run (None for images and regression)."""
    if not is_text_config(cfg):
        return None
    d, m = cfg.data, cfg.model
    return dict(vocab_size=d.vocab_size, max_tokens=d.max_tokens, layers=m.layers, heads=m.heads, dropout=m.dropout,
                pooling=m.pooling)


def audio_settings(cfg: Config) -> dict | None:
    """The audio encoder's settings for an audio run (None otherwise)."""
    if not is_audio_config(cfg):
        return None
    m = cfg.model
    return dict(kernels=tuple(m.kernels), strides=tuple(m.strides), context=m.context, context_net=m.context_net,
                frontend=m.frontend, sample_rate=cfg.data.sample_rate, n_fft=m.n_fft, hop=m.hop,
                mel_bands=m.mel_bands, cmn=m.cmn)


def audio_options(cfg: Config) -> dict:
    """The `load_audio` options a config sets."""
    d = cfg.data
    return dict(sample_rate=d.sample_rate, clip_seconds=d.clip_seconds, class_split=d.class_split,
                split_fractions=d.split_fractions, split_seed=d.split_seed)


def augment_settings(cfg: Config):
    """The views of the run's items: `generator.audio` for audio, `generator.augment` for images."""
    return cfg.generator.audio if is_audio_config(cfg) else cfg.generator.augment


def has_inner_loop(cfg: Config) -> bool:
    """True for learners that adapt by gradient steps (MAML, first-order MAML, Meta-SGD, Reptile):
    their BatchNorm uses support-set statistics in the inner loop and for queries (never running ones)."""
    return cfg.learner.name in ("maml", "fomaml", "reptile")


def build_sampler(cfg: Config, split: str, *, n_way: int, k_shot: int, n_query: int, seed: int,
                  dataset: str | None = None, root: str | None = None, disjoint_groups: bool = False):
    """Return an episode source with `.episode(i)` and `.batch(start, count)` for one split.

    `dataset`/`root` override the config's (for evaluating on another dataset). An image
    folder other than the one a run trained on is unseen: its classes (the `split`
    subfolder's, or all of a folder of classes) must not be the run's meta-train classes.
    `disjoint_groups` draws each episode's support and queries from disjoint groups of the
    split (audio: speakers; see EpisodeSampler).
    """
    dataset = dataset or cfg.data.dataset
    if dataset == "sinusoid":
        check_split_allowed(split)  # image splits are checked by load_split
        return SinusoidTasks(k_shot, n_query, seed=seed + _SINUSOID_SPLIT_OFFSET[split])
    if is_text(dataset) != is_text_config(cfg) or is_audio(dataset) != is_audio_config(cfg):
        kind = "text" if is_text_config(cfg) else "audio" if is_audio_config(cfg) else "images"
        raise ConfigError(f"the run was trained on {kind} ({cfg.data.dataset}); it cannot be evaluated on {dataset!r}")
    if is_audio(dataset):
        check_split_allowed(split)
        data = load_audio(dataset, split, root=root if root is not None else cfg.data.root,
                          trained_on=_training_folder(cfg), **audio_options(cfg))
        return EpisodeSampler(data, n_way, k_shot, n_query, seed=seed, disjoint_groups=disjoint_groups)
    if is_text(dataset):
        check_split_allowed(split)
        d = cfg.data
        texts = read_split(dataset, split, root=root if root is not None else d.root, class_split=d.class_split,
                           split_fractions=d.split_fractions, split_seed=d.split_seed,
                           trained_on=_training_text(cfg))
        return EpisodeSampler(to_split(texts, text_tokenizer(cfg)), n_way, k_shot, n_query, seed=seed)
    data = load_split(dataset, split, root=root if root is not None else cfg.data.root,
                      trained_on=_training_folder(cfg), **_image_options(cfg))
    return EpisodeSampler(data, n_way, k_shot, n_query, seed=seed, disjoint_groups=disjoint_groups)


def load_unlabelled(cfg: Config):
    """What generators build episodes from, without labels: the meta-train images `[M, C, H, W]`,
    or for text a `TextCorpus` (the meta-train texts and the run's tokenizer)."""
    if is_text_config(cfg):
        check_split_allowed("train")
        d = cfg.data
        texts = unlabelled_texts(d.dataset, root=d.root, class_split=d.class_split,
                                 split_fractions=d.split_fractions, split_seed=d.split_seed)
        return TextCorpus(texts, text_tokenizer(cfg).to_json(), d.max_tokens)
    if is_audio_config(cfg):
        check_split_allowed("train")
        return load_audio(cfg.data.dataset, "train", root=cfg.data.root, **audio_options(cfg)).x
    return load_split(cfg.data.dataset, "train", root=cfg.data.root, **_image_options(cfg)).x


_TOKENIZERS: dict[tuple, TextTokenizer] = {}  # this process's tokenizers, by where they came from


def read_tokenizer_text(location: str) -> str | None:
    """The JSON text of a tokenizer file (path or URI), None when there is none; DataError when unreadable."""
    try:
        if not is_uri(location):
            path = Path(location)
            if not path.is_file():
                return None
            if path.stat().st_size > MAX_TOKENIZER_BYTES:
                raise DataError(f"tokenizer {location!r} is larger than {MAX_TOKENIZER_BYTES} bytes")
            return path.read_text(encoding="utf-8")
        return read_text(location)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer {location!r} cannot be read ({getattr(e, 'strerror', None) or e})") from None


def text_tokenizer(cfg: Config) -> TextTokenizer:
    """The run's tokenizer: `data.tokenizer` (a tokenizer.json, path or URI) when set, else one learned
    from the meta-train text (once per process: learning is not reproducible across processes, so a
    run learns it once in `tokenizer_stage` and its processes load the file)."""
    d = cfg.data
    if d.tokenizer is not None:
        key = ("file", d.tokenizer, d.max_tokens)
        if key not in _TOKENIZERS:
            text = read_tokenizer_text(d.tokenizer)
            if text is None:
                raise DataError(f"data.tokenizer={d.tokenizer!r}: no such file")
            _TOKENIZERS[key] = TextTokenizer.from_json(text, d.max_tokens, f"data.tokenizer={d.tokenizer!r}")
        tok = _TOKENIZERS[key]
        if tok.vocab_size > d.vocab_size:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r} has {tok.vocab_size} word pieces but the model "
                              f"embeds data.vocab_size={d.vocab_size}; raise data.vocab_size")
        return tok
    key = ("learned",) + _vocabulary_settings(cfg)
    if key not in _TOKENIZERS:
        texts = unlabelled_texts(d.dataset, root=d.root, class_split=d.class_split,
                                 split_fractions=d.split_fractions, split_seed=d.split_seed)
        _TOKENIZERS[key] = TextTokenizer.train(texts, d.vocab_size, d.max_tokens)
    return _TOKENIZERS[key]


def _vocabulary_settings(cfg: Config) -> tuple:
    d = cfg.data
    return d.dataset, d.root, d.class_split, tuple(d.split_fractions), d.split_seed, d.vocab_size, d.max_tokens


def tokenizer_stage(cfg: Config, run_dir: str) -> Config:
    """`cfg` with `data.tokenizer` = RUN/tokenizer.json: the vocabulary every process of a text run reads.

    The file is made once: learned from the meta-train text, or copied from `data.tokenizer`
    (or, with `generator.shards`, from the tokenizer.json the shards were encoded with); a
    re-run or resume reuses it. RUN/tokenizer_source.json records where it came from, and a
    re-run whose vocabulary would come from elsewhere (another dataset, split, size or file)
    is refused before anything is written, as `check_resumable` refuses other config changes.
    Checkpoints also carry the vocabulary (`trainer.load_trained` evaluates with it).
    """
    located = tokenizer_location(cfg, run_dir)
    if located is cfg:
        return cfg
    source = _tokenizer_source(cfg)
    given = source.get("file")
    given_text = None
    if given is not None:
        given_text = read_tokenizer_text(given)
        if given_text is None:
            what = "generator.shards" if cfg.data.tokenizer is None else "data.tokenizer"
            raise DataError(f"{what}: there is no {given!r} (the vocabulary to use); "
                            + ("write the shards again with `metassl generate`, or set data.tokenizer"
                               if what == "generator.shards" else "give an existing tokenizer.json"))
        source["sha256"] = hashlib.sha256(given_text.encode()).hexdigest()
    record_location = _run_file(run_dir, SOURCE_FILE)
    existing = read_tokenizer_text(located.data.tokenizer)
    if existing is not None:
        recorded = read_text(record_location)
        try:
            recorded = json.loads(recorded) if recorded is not None else None
        except json.JSONDecodeError:
            recorded = None
        if recorded != source:
            raise ConfigError(f"the run directory {str(run_dir)!r} holds a vocabulary (tokenizer.json) learned or "
                              f"copied from other settings ({recorded} here, {source} now); use another --run-dir")
    else:
        save_tokenizer(given_text if given_text is not None else text_tokenizer(cfg).to_json(), run_dir)
        _write_text(json.dumps(source), record_location)
    text_tokenizer(located)  # a damaged file fails here, before any worker starts
    return located


def _tokenizer_source(cfg: Config) -> dict:
    """Where a text run's vocabulary comes from: a file, or the settings it is learned with."""
    given = cfg.data.tokenizer or (storage_join(str(cfg.generator.shards), TOKENIZER_FILE) if cfg.generator.shards
                                   else None)
    if given is not None:
        return {"file": given if is_uri(given) else str(Path(given).resolve())}
    names = ("dataset", "root", "class_split", "split_fractions", "split_seed", "vocab_size", "max_tokens")
    return {"learned_from": dict(zip(names, [list(v) if isinstance(v, tuple) else v
                                             for v in _vocabulary_settings(cfg)]))}


def tokenizer_location(cfg: Config, run_dir: str) -> Config:
    """`cfg` as `tokenizer_stage` will return it (nothing is read or written): what a re-run compares."""
    if not is_text_config(cfg):
        return cfg
    import dataclasses

    run_dir = str(run_dir)
    location = _run_file(run_dir, TOKENIZER_FILE)
    if cfg.data.tokenizer == location:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=location))


def _run_file(folder, name: str) -> str:
    """`folder/name`: a URI in object storage, else an absolute local path (what configs record)."""
    folder = str(folder)
    return storage_join(folder, name) if is_uri(folder) else str(Path(folder).resolve() / name)


def _write_text(text: str, location: str) -> None:
    if is_uri(location):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "f").write_text(text, encoding="utf-8")
            upload(Path(tmp) / "f", location)
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(location + ".part")
    partial.write_text(text, encoding="utf-8")
    partial.replace(location)


def save_tokenizer(text: str, folder: str) -> str:
    """Write a tokenizer's JSON as `folder/tokenizer.json` (a local folder or a storage URI); return where."""
    folder = str(folder)
    location = _run_file(folder, TOKENIZER_FILE)
    _write_text(text, location)
    return location


def _training_text(cfg: Config) -> str | None:
    """The file or folder a text run meta-trains on when it is a `text:PATH`, else None."""
    name, _, path = cfg.data.dataset.partition(":")
    return (path or cfg.data.root) if name == "text" else None


def _image_options(cfg: Config) -> dict:
    """The `load_split` options a config sets: protocol, image size, channels, class split."""
    d = cfg.data
    return dict(protocol=d.protocol, image_size=d.image_size, channels=d.channels,
                split_fractions=d.split_fractions, split_seed=d.split_seed)


def _training_folder(cfg: Config) -> str | None:
    """The folder a run meta-trains on when its dataset is an image or audio folder, else None."""
    name, _, path = cfg.data.dataset.partition(":")
    return (path or cfg.data.root) if name in ("imagefolder", "audio") else None


def build_generator(cfg: Config, images: torch.Tensor, encoder: tuple[dict, int] | None = None,
                    generative: dict | None = None):
    """Return the episode generator named by `cfg.generator.kind` over unlabelled `images` (a TextCorpus for smlmt).

    `encoder` = (weights, version) makes a cluster generator embed with the model's
    features (`generator.encoder: model`) from the start. `generative` is the fitted
    generative checkpoint (`load_generative`); None loads `generator.generative.checkpoint`.
    """
    from metassl.generate.augment import AugmentEpisodes
    from metassl.generate.cluster import ClusterEpisodes, WarmStartEpisodes
    from metassl.generate.generative import GenerativeEpisodes, MixedEpisodes

    g, ep = cfg.generator, cfg.episodes
    seed = cfg.seed
    augment = augment_settings(cfg)
    if g.kind == "smlmt":
        from metassl.generate.smlmt import SMLMTEpisodes
        return SMLMTEpisodes(images, ep.n_way, ep.k_shot, ep.n_query, g.smlmt, seed=seed, ssl_views=g.ssl_views)
    if g.kind == "mix":
        return MixedEpisodes({kind: build_generator(mix_member(cfg, kind), images, encoder, generative)
                              for kind in g.mix}, g.mix)
    if g.kind == "augment":
        return AugmentEpisodes(images, ep.n_way, ep.k_shot, ep.n_query, augment, seed=seed,
                               ssl_views=g.ssl_views)
    if g.kind == "generative":
        gen = g.generative
        state = generative if generative is not None else load_generative_for(cfg)
        return GenerativeEpisodes(state["params"], ep.n_way, ep.k_shot, ep.n_query, strategy=gen.strategy,
                                  threshold=gen.threshold, noise=gen.noise, interpolate=gen.interpolate, seed=seed,
                                  augment=g.augment if gen.views else None, ssl_views=g.ssl_views,
                                  ssl_augment=g.augment)
    if g.kind == "cluster":
        def make_cluster(embed, version):
            return ClusterEpisodes(images, ep.n_way, ep.k_shot, ep.n_query, clusters=g.clusters,
                                   partitions=g.partitions, seed=seed, embed=embed, embedding_dim=g.embedding_dim,
                                   augment=augment if g.cluster_views else None, ssl_views=g.ssl_views,
                                   ssl_augment=augment, encoder_version=version,
                                   threads=g.refresh_threads or torch.get_num_threads(),
                                   core_fraction=g.core_fraction)

        embed, version = (model_embedder(cfg, encoder[0]), encoder[1]) if encoder else (None, 0)
        if g.warmup_steps:  # augment episodes until the trainer publishes the network
            warm = WarmStartEpisodes(AugmentEpisodes(images, ep.n_way, ep.k_shot, ep.n_query, augment,
                                                     seed=seed, ssl_views=g.ssl_views), make_cluster)
            if encoder:
                warm.set_encoder(embed, version)
            return warm
        return make_cluster(embed, version)
    raise ConfigError(f"generator.kind={g.kind!r} has no generator; valid: {list(CHOICES['generator.kind'][1:])}")


def mix_member(cfg: Config, kind: str) -> Config:
    """The config of one member of a mix: the self-improving settings stay with the cluster member
    (a refit is the trainer's: its decoder reaches the generative member with the encoder)."""
    import dataclasses
    loop = {} if kind == "cluster" else {"warmup_steps": 0, "refresh_every": 0, "encoder": "pca",
                                         "encoder_momentum": 0.0, "core_fraction": 1.0}
    generative = dataclasses.replace(cfg.generator.generative, refit_steps=0)
    return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, kind=kind, mix={},
                                                                  generative=generative, **loop))


def load_generative_for(cfg: Config) -> dict:
    """The fitted generative model `generator.generative.checkpoint` names, checked against the run's data."""
    from metassl.generative.fit import check_fits, load_generative

    location = cfg.generator.generative.checkpoint
    if location is None:
        raise ConfigError("generator.kind uses a generative model but generator.generative.checkpoint is not "
                          "set: fit one with `metassl fit-generative CONFIG`, or let `metassl train` fit it")
    state = load_generative(location)
    check_fits(state, cfg)
    return state


def model_embedder(cfg: Config, state: dict):
    """Return `embed(x [B, C, H, W]) -> [B, D]`: the backbone's features with the weights in `state`.

    The weights are copied into a module of the embedder's own, which is only read after
    that (eval mode, no gradients): `embed` may be called from several threads at once, and
    later changes to `state` do not reach it.
    """
    m = cfg.model
    model = build_model(m.backbone, out_features=None, in_channels=cfg.data.channels, hidden=m.hidden,
                        norm=m.norm, image_size=cfg.data.image_size, mlp_hidden=m.mlp_hidden,
                        support_statistics=has_inner_loop(cfg), channels_last=uses_channels_last(cfg),
                        audio=audio_settings(cfg)).eval()
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(f"encoder weights lack {missing[:3]}... for model.backbone={m.backbone!r}")
    with torch.no_grad():
        for name, tensor in own.items():
            given = state[name]
            if not isinstance(given, torch.Tensor) or given.shape != tensor.shape:
                got = list(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
                raise ConfigError(f"encoder weight {name!r} is {got}, but model.backbone={m.backbone!r} "
                                  f"needs {list(tensor.shape)}")
            tensor.copy_(given)
    model.requires_grad_(False)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return embed

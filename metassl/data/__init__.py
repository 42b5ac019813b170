"""Datasets and few-shot episodes.

`load_split(spec, split)` picks an image dataset by name and returns a `FewShotSplit`;
`EpisodeSampler` draws seeded N-way K-shot `Episode`s from it. The sinusoid regression
tasks have no classes and come from `SinusoidTasks` directly.

Dataset specs:
    "digits"              scikit-learn's 8x8 digits, bundled offline (train 0-3, val 4-6, test 7-9)
    "omniglot"            Omniglot with Vinyals splits, from `root` (or $METASSL_DATA/omniglot)
    "omniglot:PATH"       Omniglot from PATH
    "imagefolder:PATH"    PATH/{train,val,test}/<class>/<image>, or PATH/<class>/<image> split
                          into train/val/test classes by a seeded class split (see imagefolder.py)
"""

from __future__ import annotations

import os
from pathlib import Path

from metassl.data.digits import DIGITS_SPLITS, load_digits
from metassl.data.download import download_omniglot
from metassl.data.episodes import Episode, EpisodeSampler, FewShotSplit, stack_episodes
from metassl.data.imagefolder import DEFAULT_FRACTIONS, load_imagefolder, split_class_names
from metassl.data.omniglot import PROTOCOLS, load_omniglot
from metassl.data.sinusoid import SinusoidTasks
from metassl.errors import DataError

DATASETS = ("digits", "omniglot", "imagefolder")

__all__ = [
    "DATASETS",
    "FORBIDDEN_SPLITS_ENV",
    "check_split_allowed",
    "DIGITS_SPLITS",
    "Episode",
    "EpisodeSampler",
    "FewShotSplit",
    "SinusoidTasks",
    "download_omniglot",
    "load_digits",
    "load_imagefolder",
    "load_omniglot",
    "load_split",
    "split_class_names",
    "stack_episodes",
]


FORBIDDEN_SPLITS_ENV = "METASSL_FORBIDDEN_SPLITS"  # comma-separated splits this process may not read


def check_split_allowed(split: str) -> None:
    """Raise DataError when `split` is listed in $METASSL_FORBIDDEN_SPLITS.

    `metassl tune` sets it to "test" in every trial, so that nothing about the meta-test
    classes can reach tuning: a trial that tried to read them fails, naming the split.
    """
    forbidden = [s for s in os.environ.get(FORBIDDEN_SPLITS_ENV, "").split(",") if s]
    if split in forbidden:
        raise DataError(f"the {split!r} split may not be read in this process ({FORBIDDEN_SPLITS_ENV}="
                        f"{','.join(forbidden)}): tuning and model selection use meta-val only")


def load_split(
    spec: str,
    split: str,
    *,
    root: str | Path | None = None,
    protocol: str = "supervised",
    image_size: int = 28,
    channels: int = 1,
    split_fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    trained_on: str | Path | None = None,
) -> FewShotSplit:
    """Returns split `split` ("train", "val", "test") of the dataset named by `spec`.

    `spec` is a name from DATASETS, optionally followed by ":PATH" for the data folder;
    a PATH in the spec takes precedence over `root`, and digits (bundled with scikit-learn)
    ignores both, so one `root` setting can serve several datasets. `protocol`
    ("supervised", "unsupervised" or "psco") changes the classes of Omniglot only (see
    metassl.data.omniglot). `channels` 3 is for imagefolder only; digits and Omniglot are
    grayscale. imagefolder only: `split_fractions` and `split_seed` split a folder of
    classes (a folder with train/, val/, test/ is split already), and `trained_on`, the
    folder a run was meta-trained on, makes another folder an unseen one (its classes must
    not be meta-train classes of the run; see metassl.data.imagefolder).
    """
    check_split_allowed(split)
    name, _, spec_path = spec.partition(":")
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {spec!r}; valid: {', '.join(DATASETS)} (omniglot and imagefolder "
            f"take an optional ':PATH'). 'sinusoid' is a regression task: use SinusoidTasks"
        )
    folder = spec_path or root
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    if name != "imagefolder" and channels != 1:
        raise DataError(f"dataset {name!r} is grayscale, so channels must be 1, got {channels!r}")

    if name == "digits":
        if spec_path:
            raise DataError(
                f"dataset 'digits' ships with scikit-learn and takes no folder; use 'digits', not {spec!r}"
            )
        return load_digits(split, image_size=image_size)
    if name == "omniglot":
        return load_omniglot(folder, split, protocol=protocol, image_size=image_size)
    if not folder:
        raise DataError("dataset 'imagefolder' needs a folder: use 'imagefolder:PATH' or pass root")
    return load_imagefolder(folder, split, image_size=image_size, channels=channels,
                            split_fractions=split_fractions, split_seed=split_seed, trained_on=trained_on)

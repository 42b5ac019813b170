"""Folders of images as few-shot splits with held-out classes.

Two layouts of `PATH` (image files end in .png, .jpg or .jpeg, in any letter case):

    (a) PATH/{train,val,test}/<class>/<image>   the classes are split by hand; all three needed
    (b) PATH/<class>/<image>                     one folder of classes, split by a seeded class split

In layout (b) the classes go to train/val/test in the proportions `split_fractions`
(default 0.6/0.2/0.2), drawn with `split_seed`: the split is a function of the sorted class
names, the fractions and the seed only (a SHA-256 of seed and name orders the classes), so
it is the same on every machine, in every process and whatever order the file system lists
the folders in. Every split gets at least one class.

A class is identified by its folder name (exact, case-sensitive): in layout (a) a name that
appears in two of train/, val/, test/ is refused, since those would be the same class.

Only the images of the requested split are decoded. Classes and files are taken in sorted
name order; hidden entries (names starting with ".") are skipped.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from metassl.data.episodes import FewShotSplit, check_int
from metassl.errors import DataError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB"}
_EXAMPLES = {"image": "<image>.png", "audio": "<clip>.wav"}  # how errors show a file of a class folder


def _subfolders(folder: Path) -> list[Path]:
    """Returns the non-hidden subfolders of `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _quote(names: Sequence[str], limit: int = 10) -> str:
    """Returns up to `limit` names quoted and comma-separated, with a count of the rest."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Returns `fractions` as (train, val, test), or raises DataError unless three values > 0 sum to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise DataError(f"split_fractions={list(fractions)} must be three fractions > 0 "
                        "(train, val, test) that sum to 1, e.g. [0.6, 0.2, 0.2]")
    return values  # type: ignore[return-value]


def split_counts(num_classes: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Returns the number of (train, val, test) classes: `fractions` of `num_classes`, summing to it.

    Largest-remainder rounding: each split gets the floor of its share, and the classes left
    over go to the largest fractional parts (ties to the earlier split). Raises DataError when
    there are fewer than 3 classes or a split would get none.
    """
    fractions = check_fractions(fractions)
    if num_classes < 3:
        raise DataError(f"a seeded class split needs at least 3 classes (one each for train, val, test), "
                        f"got {num_classes}")
    shares = [f * num_classes for f in fractions]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(3), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: num_classes - sum(counts)]:
        counts[i] += 1
    for split, count, fraction in zip(SPLITS, counts, fractions):
        if count == 0:
            raise DataError(f"split_fractions={list(fractions)} gives the {split!r} split 0 of the "
                            f"{num_classes} classes; raise its fraction to at least {1 / num_classes:.3g} "
                            "or add classes")
    return counts[0], counts[1], counts[2]


def split_class_names(names: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                      seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Returns {"train", "val", "test": class names, sorted} of a seeded split of `names`.

    The classes are ordered by SHA-256 of "<seed>/<name>" and cut into `split_counts`
    pieces, so the result depends only on the set of names, the fractions and the seed.
    """
    seed = check_int("split_seed", seed, 0)
    unique = sorted(set(names))
    if len(unique) != len(names):
        raise DataError(f"class names must be unique, got {len(names) - len(unique)} repeated")
    n_train, n_val, _ = split_counts(len(unique), fractions)

    def key(name: str) -> tuple[bytes, str]:
        return hashlib.sha256(f"{seed}/{name}".encode()).digest(), name

    shuffled = sorted(unique, key=key)
    parts = (shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:])
    return {split: tuple(sorted(part)) for split, part in zip(SPLITS, parts)}


def check_disjoint(classes: Mapping[str, Sequence[str]], where: str) -> None:
    """Raises DataError naming the classes that appear in two of the `classes` splits."""
    keys = list(classes)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            both = sorted(set(classes[a]) & set(classes[b]))
            if both:
                raise DataError(f"{where}: {len(both)} class(es) are in both {a} and {b}: {_quote(both)}; "
                                "a class (identified by its folder name) may be in one split only, or "
                                "the held-out results would score classes the model was trained on")


def find_layout(root: Path, kind: str = "image") -> str:
    """Returns "splits" (layout (a): train/, val/, test/) or "classes" (layout (b)) for the folder `root`.

    `kind` ("image" or "audio") only words the errors.
    """
    example = _EXAMPLES[kind]
    if not root.exists():
        raise DataError(f"the {kind} folder {root} does not exist; expected {root}/<class>/{example} "
                        f"or {root}/{{train,val,test}}/<class>/{example}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected a folder with one subfolder of images per class")
    names = [p.name for p in _subfolders(root)]
    if not names:
        raise DataError(f"the {kind} folder {root} has no class subfolders; expected {root}/<class>/{example}")
    present = [s for s in SPLITS if s in names]
    if not present:
        return "classes"
    missing = [s for s in SPLITS if s not in names]
    if missing:
        raise DataError(f"the {kind} folder {root} has {', '.join(s + '/' for s in present)} but no "
                        f"{', '.join(s + '/' for s in missing)}: a folder split by hand needs all of train/, "
                        f"val/ and test/ (rename a class folder called {present[0]!r}, or put every class "
                        f"directly under {root} for a seeded split)")
    extra = [n for n in names if n not in SPLITS]
    if extra:
        raise DataError(f"the {kind} folder {root} has train/, val/, test/ and also {_quote(extra)}; put "
                        "every class folder inside one of train/, val/, test/")
    return "splits"


def _check_split(split: str) -> None:
    """Raises DataError unless `split` is train, val, test or all."""
    if split not in SPLITS + ("all",):
        raise DataError(f"unknown split {split!r}; valid splits: train, val, test, all")


def split_folders(path: str | Path, split: str, split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  split_seed: int = 0, kind: str = "image") -> tuple[list[Path], str]:
    """Returns (the class folders of `split`, sorted by name; a name saying which classes they are).

    `split` is "train", "val", "test" or "all" (every class of the folder). No image is read.
    Raises DataError when a class is in two splits of a layout (a) folder.
    """
    _check_split(split)
    root = Path(path).expanduser()
    example = _EXAMPLES[kind]
    layout = find_layout(root, kind)
    if layout == "splits":
        folders = {s: _subfolders(root / s) for s in SPLITS}
        for s, found in folders.items():
            if not found:
                raise DataError(f"{root / s} has no class subfolders; expected {root / s}/<class>/{example}")
        check_disjoint({s: [p.name for p in found] for s, found in folders.items()}, f"the {kind} folder {root}")
        chosen = sorted((p for s in SPLITS for p in folders[s]), key=lambda p: p.name) if split == "all" \
            else folders[split]
        return chosen, f"{kind}folder/{root.name}:{split}"
    folders = _subfolders(root)
    if split == "all":
        return folders, f"{kind}folder/{root.name}:all"
    try:
        fractions = check_fractions(split_fractions)
        names = set(split_class_names([p.name for p in folders], fractions, split_seed)[split])
    except DataError as err:
        raise DataError(f"the {kind} folder {root} (one folder of classes): {err}") from None
    return ([p for p in folders if p.name in names],
            f"{kind}folder/{root.name}:{split}(split_seed={split_seed}, "
            f"split_fractions={'/'.join(f'{f:g}' for f in fractions)})")


def same_folder(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name the same folder (after ~ and symlinks are resolved)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def unseen_folders(path: str | Path, split: str, trained_on: str | Path, split_fractions: Sequence[float],
                   split_seed: int, kind: str = "image") -> tuple[list[Path], str]:
    """Returns (class folders, name) for evaluating a run trained on `trained_on` on another folder `path`.

    Layout (a): the `split` subfolder's classes; layout (b): every class (none were trained
    on). Unless `split` is "train", raises DataError when a class name is also one of the
    run's meta-train classes (read from `trained_on` with the same split settings).
    """
    _check_split(split)
    root = Path(path).expanduser()
    if find_layout(root, kind) == "splits":
        folders, name = split_folders(root, split, kind=kind)
    else:
        folders, name = split_folders(root, "all", kind=kind)
    if split != "train":
        try:
            trained, _ = split_folders(trained_on, "train", split_fractions, split_seed, kind)
        except DataError as err:
            raise DataError(f"cannot check that the classes of {root} were not trained on: the run's "
                            f"training folder could not be read ({err})") from None
        seen = sorted({p.name for p in folders} & {p.name for p in trained})
        if seen:
            raise DataError(f"{len(seen)} class(es) of {root} are meta-train classes of the run (trained on "
                            f"{Path(trained_on).expanduser()}): {_quote(seen)}; evaluate on classes the run "
                            "did not train on (a class is identified by its folder name)")
    return folders, name


def _read_image(file: Path, mode: str, image_size: int) -> np.ndarray:
    """Returns the image at `file` as uint8 [S, S, C] (or [S, S] for mode "L"), resized with BOX."""
    try:
        with Image.open(file) as image:
            image = image.convert(mode)
            if image.size != (image_size, image_size):
                # BOX averages every source pixel that falls in the output pixel (area averaging).
                image = image.resize((image_size, image_size), Image.BOX)
            return np.asarray(image, dtype=np.uint8)
    except OSError as err:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"cannot read the image {file} ({err}); expected a PNG or JPEG file") from err


def read_classes(class_folders: Sequence[Path], name: str, image_size: int = 28, channels: int = 1) -> FewShotSplit:
    """Returns the images of `class_folders`: x [N, channels, S, S] float32 in [0, 1], y [N] class ids.

    Class c is class_folders[c]; channels 1 converts to grayscale ("L"), 3 to RGB; S =
    image_size (images are resized to a square, without keeping the aspect ratio).
    """
    image_size = check_int("image_size", image_size, 1)
    if channels not in _MODES:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    images, labels = [], []
    for label, folder in enumerate(class_folders):
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"class folder {folder} holds no images; "
                            f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
        images.extend(_read_image(file, _MODES[channels], image_size) for file in files)
        labels.extend([label] * len(files))
    x = torch.from_numpy(np.stack(images))  # uint8 [N, S, S] or [N, S, S, 3]
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return FewShotSplit(x=x.float().div_(255.0).contiguous(), y=torch.tensor(labels, dtype=torch.int64),
                        class_names=tuple(folder.name for folder in class_folders), name=name)


def load_imagefolder(path: str | Path, split: str = "all", *, image_size: int = 28, channels: int = 1,
                     split_fractions: Sequence[float] = DEFAULT_FRACTIONS, split_seed: int = 0,
                     trained_on: str | Path | None = None) -> FewShotSplit:
    """Returns split `split` ("train", "val", "test" or "all") of the image folder `path`.

    `trained_on`, the folder a run was meta-trained on, matters when it is not `path`: then
    `path` is an unseen folder (see `unseen_folders`). The split's `name` says which classes
    it holds, e.g. "imagefolder/pets:test(split_seed=0, split_fractions=0.6/0.2/0.2)".
    """
    if channels not in _MODES:  # before any listing, so a bad option is named first
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if trained_on is not None and not same_folder(path, trained_on):
        folders, name = unseen_folders(path, split, trained_on, split_fractions, split_seed)
    else:
        folders, name = split_folders(path, split, split_fractions, split_seed)
    return read_classes(folders, name, image_size=image_size, channels=channels)

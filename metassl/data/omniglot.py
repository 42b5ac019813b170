"""Omniglot (Lake et al. 2015) with the character splits of Vinyals et al. (2016).

The 1,623 characters are split into 1028 train, 172 val and 423 test characters (the
lists published with Prototypical Networks). Two protocols build classes from them:

* "supervised" (MAML, ProtoNets): each (character, rotation) is a class, for rotations
  0, 90, 180 and 270 degrees, so train/val/test have 4112/688/1692 classes. A rotation
  turns the whole image counter-clockwise (torch.rot90 over the last two dims).
* "unsupervised" (CACTUs, UMTRA, ...): the characters unrotated, 1028/172/423 classes.
* "psco": PsCo's protocol (Jang et al. 2023, public code `alinlab/PsCo`): the classes of
  "supervised" (its `splits/omniglot/vinyals_{train,val,test}_labels.json` list these same
  1028/172/423 characters, and its `Omniglot` dataset makes each of the 4 rotations a class),
  with the labels unused in meta-training: the unlabelled pool is every rotated train image
  (82,240). Its evaluation is 2000 test tasks with 15 queries per class, BatchNorm in eval
  mode (`experiments/omniglot_unsupervised_psco.yaml` sets these). PsCo also normalises
  pixels with a dataset mean and std and resizes the 105x105 bitmaps bilinearly; here the
  28x28 images are area-averaged and not standardised (the first BatchNorm absorbs the scale).

Every class has the 20 drawings of its character. Images are [1, S, S] float32 with ink
= 1 and paper = 0; the value of a pixel is its inked fraction (area averaging). S = 28
uses the dataset's stored 28x28 images; other sizes are resized from the 105x105 bitmaps.

Where the data comes from (see omniglot_files.py for the layouts):
`load_omniglot(root=...)` reads `root`. With root=None, 28x28 images come from the copy
shipped in the package (metassl/data/omniglot28, checked against its sha256: offline, no
download); other sizes read $METASSL_DATA/omniglot (or ~/.cache/metassl/omniglot) and
download the official zips there when it is empty. The
split lists come from `root/splits/vinyals/{train,val,test}.txt` when present (lines
"Alphabet/characterNN/rotDDD"), else from the copy shipped in this package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metassl.data.download import download_omniglot
from metassl.data.episodes import FewShotSplit, check_int
from metassl.data.omniglot_embedded import embedded_root
from metassl.data.omniglot_files import LAYOUTS_HELP, find_layout, read_characters
from metassl.data.paths import data_home
from metassl.errors import DataError

SPLITS = ("train", "val", "test")
PROTOCOLS = ("supervised", "unsupervised", "psco")  # psco: supervised's classes, see above
ROTATIONS = (0, 90, 180, 270)
SHIPPED_SPLITS = Path(__file__).with_name("omniglot_vinyals_splits.txt")


def default_root() -> Path:
    """Returns the folder used when no root is given: <data_home()>/omniglot."""
    return data_home() / "omniglot"


def _parse_class_line(line: str, source: Path) -> tuple[str, int]:
    """Returns (character, rotation in degrees) of a split line "Alphabet/characterNN/rotDDD"."""
    character, _, rotation = line.rpartition("/")
    degrees = int(rotation[3:]) if rotation.startswith("rot") and rotation[3:].isdigit() else None
    if not character or degrees not in ROTATIONS:
        raise DataError(
            f"bad line {line!r} in the split list {source}: expected 'Alphabet/characterNN/rotDDD' "
            f"with DDD one of 000, 090, 180, 270"
        )
    return character, degrees


def split_classes(root: Path | None, split: str) -> list[tuple[str, int]]:
    """Returns the (character, rotation) classes of a Vinyals split, in list order.

    Reads root/splits/vinyals/<split>.txt when root has a splits/vinyals folder, else the
    shipped list, where every character comes with the rotations 0, 90, 180, 270.
    """
    own = root / "splits" / "vinyals" if root is not None else None
    if own is not None and own.is_dir():
        path = own / f"{split}.txt"
        if not path.is_file():
            raise DataError(
                f"the split list {path} does not exist (the folder {own} should hold {split}.txt)"
            )
        lines = path.read_text(encoding="utf-8").split()
        return [_parse_class_line(line, path) for line in lines]
    classes = []
    for line in SHIPPED_SPLITS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            line_split, character = line.split("\t")
            if line_split == split:
                classes.extend((character, degrees) for degrees in ROTATIONS)
    return classes


def resolve_root(root: str | Path | None, image_size: int | None = None) -> tuple[Path, str]:
    """Returns (folder, layout) of the Omniglot data to read, downloading it when root is None.

    An explicit root must already hold one of the two layouts. With root=None and
    image_size 28 the shipped copy is used; otherwise the default folder, filled by
    `download_omniglot` when it holds neither layout.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DataError(f"the Omniglot folder {path} does not exist; it should be {LAYOUTS_HELP}")
        layout = find_layout(path)
        if layout is None:
            raise DataError(f"no Omniglot data in {path}; the folder should be {LAYOUTS_HELP}")
        return path, layout
    if image_size == 28:
        return embedded_root(), "npz"
    path = default_root()
    if find_layout(path) is None:
        download_omniglot(path)  # raises a DataError that says what to do when offline
    layout = find_layout(path)
    if layout is None:
        raise DataError(f"downloading Omniglot to {path} did not produce {LAYOUTS_HELP}")
    return path, layout


def load_omniglot(
    root: str | Path | None,
    split: str,
    protocol: str = "supervised",
    image_size: int = 28,
) -> FewShotSplit:
    """Returns one Vinyals split of Omniglot: x [N, 1, S, S] float32 in [0, 1] (ink = 1), y [N].

    Class names are "Alphabet/characterNN/rotDDD" (rot000 only for protocol "unsupervised";
    "psco" has the classes of "supervised").
    """
    if split not in SPLITS:
        raise DataError(f"unknown Omniglot split {split!r}; valid splits: {', '.join(SPLITS)}")
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown Omniglot protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    image_size = check_int("image_size", image_size, 1)
    folder, layout = resolve_root(root, image_size)
    classes = split_classes(folder, split)
    characters = list(dict.fromkeys(character for character, _ in classes))  # unique, in order
    if protocol == "unsupervised":
        classes = [(character, 0) for character in characters]

    # images holds the drawings of characters[0], then characters[1], ...: uint8 [M, S, S]
    images, counts = read_characters(folder, layout, characters, image_size)
    starts = np.cumsum(counts) - counts
    position = {character: i for i, character in enumerate(characters)}
    class_character = [position[character] for character, _ in classes]
    # one row per image of the split: its row in `images`, its class, its rotation
    rows = np.concatenate(
        [np.zeros(0, np.int64)] + [np.arange(starts[c], starts[c] + counts[c]) for c in class_character]
    )
    class_sizes = counts[class_character]
    labels = np.repeat(np.arange(len(classes)), class_sizes)
    quarter_turns = np.repeat([degrees // 90 for _, degrees in classes], class_sizes)

    x = torch.from_numpy(images[rows])  # uint8 [N, S, S]
    for turns in (1, 2, 3):
        selected = torch.from_numpy(np.flatnonzero(quarter_turns == turns))
        if len(selected):
            x[selected] = torch.rot90(x[selected], turns, dims=(-2, -1))
    return FewShotSplit(
        x=x.unsqueeze(1).float().div_(255.0),
        y=torch.from_numpy(labels.astype(np.int64)),
        class_names=tuple(f"{character}/rot{degrees:03d}" for character, degrees in classes),
        name=f"omniglot/{protocol}/{split}",
    )

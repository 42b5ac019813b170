"""Reading Omniglot characters from disk, in either of its two layouts, as 8-bit ink images.

Layouts of an Omniglot folder `root`:

* "npz": `root/omniglot.npz`, with per-split keys `background_*` and `evaluation_*`:
  `images28` uint8 [N, 28, 28] (255 = fully inked), `images105_packed` uint8 [N, 105, 14]
  (`np.packbits` of the 105x105 bitmaps, bit 1 = ink), `character` int16 [N] and
  `character_names` [C] ("Alphabet/characterNN").
* "folders": `root/images_background/<Alphabet>/characterNN/*.png` and the same under
  `images_evaluation/`, as unpacked from the official zips (1-bit PNGs, black ink on white).

Both give the same numbers: pixel value = round(255 x the inked fraction of the pixel's
area), by exact area averaging of the 105x105 bitmap. So at 28x28 the folder layout
reproduces the npz's stored `images28` (each output pixel covers 3.75 x 3.75 source pixels).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metassl.errors import DataError

NPZ_FILE = "omniglot.npz"
FOLDERS = ("images_background", "images_evaluation")
LAYOUTS_HELP = (
    f"a folder with {NPZ_FILE}, or a folder with {FOLDERS[0]}/ and {FOLDERS[1]}/ "
    "(the unpacked official zips)"
)


def find_layout(root: Path) -> str | None:
    """Returns "npz" or "folders" for the layout found in `root`, or None if it holds neither."""
    if (root / NPZ_FILE).is_file():
        return "npz"
    if all((root / folder).is_dir() for folder in FOLDERS):
        return "folders"
    return None


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Returns the [out_size, in_size] float64 matrix of exact area averaging along one axis.

    Entry (i, j) is the fraction of output pixel i's extent covered by input pixel j, so
    `A_rows @ image @ A_cols.T` resizes an [in_h, in_w] image by area averaging.
    """
    scale = in_size / out_size
    low = np.arange(out_size)[:, None] * scale
    high = low + scale
    j = np.arange(in_size)[None, :]
    overlap = np.clip(np.minimum(high, j + 1) - np.maximum(low, j), 0.0, None)
    return overlap / scale


def area_resize_ink(ink: np.ndarray, size: int) -> np.ndarray:
    """Returns uint8 [N, size, size] = round(255 x area-averaged ink) of `ink` [N, H, W] in [0, 1]."""
    # torch rather than numpy matmul: mixing numpy's BLAS threads with torch's thread pool
    # in one process can slow both down many times over on a busy machine.
    rows = torch.from_numpy(area_matrix(ink.shape[1], size).astype(np.float32))  # [S, H]
    cols_t = torch.from_numpy(area_matrix(ink.shape[2], size).T.astype(np.float32))  # [W, S]
    out = torch.empty((len(ink), size, size), dtype=torch.uint8)
    chunk = 1024  # bounds the float32 working memory at 105x105 to about 45 MB
    for start in range(0, len(ink), chunk):
        block = torch.from_numpy(np.ascontiguousarray(ink[start : start + chunk])).float()
        averaged = rows @ (block @ cols_t)  # [n, S, S] inked fraction per output pixel
        out[start : start + chunk] = torch.floor(averaged * 255.0 + 0.5).clamp_(0, 255)
    return out.numpy()


def read_characters(
    root: Path, layout: str, names: list[str], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [M, S, S], counts int64 [len(names)]) for characters `names`.

    `names` are "Alphabet/characterNN"; the images of names[0] come first (counts[0] of
    them, in drawing order), then those of names[1], and so on. S = image_size; 255 = ink.
    """
    if layout == "npz":
        return _read_npz_characters(root / NPZ_FILE, names, image_size)
    return _read_folder_characters(root, names, image_size)


def _missing_error(root: Path, missing: list[str]) -> DataError:
    """Returns the DataError for characters of a split list that `root` does not hold."""
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return DataError(
        f"{len(missing)} characters of the split list are missing from the Omniglot data at "
        f"{root}: {shown}. The data must hold every character the split names."
    )


def _npz_stamp(path: Path) -> tuple[str, int, int]:
    """Returns (path, mtime, size): a cache key that changes when the file is replaced."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _read_npz_pair(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (background_<key>, evaluation_<key>) of the npz file at `path`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[f"background_{key}"], npz[f"evaluation_{key}"]
    except Exception as err:  # zip, zlib, format and missing-key errors all mean a bad file
        raise DataError(
            f"cannot read key {key!r} of the Omniglot file {path} ({type(err).__name__}: {err}); "
            "it should be the omniglot.npz described in the dataset's README"
        ) from err


# The caches below are keyed by _npz_stamp, so loading train, val and test reads the file once.
@functools.lru_cache(maxsize=4)
def _npz_images(stamp: tuple[str, int, int], key: str) -> np.ndarray:
    """Returns background_<key> and evaluation_<key> (images28 or images105_packed), concatenated."""
    return np.concatenate(_read_npz_pair(stamp[0], key))


@functools.lru_cache(maxsize=4)
def _npz_rows_by_name(stamp: tuple[str, int, int]) -> dict[str, np.ndarray]:
    """Returns {"Alphabet/characterNN": int64 rows of that character in _npz_images}."""
    background_names, evaluation_names = _read_npz_pair(stamp[0], "character_names")
    background_codes, evaluation_codes = _read_npz_pair(stamp[0], "character")
    # character indices restart at 0 in the evaluation half; offset them past the background's.
    codes = np.concatenate([background_codes.astype(np.int64), evaluation_codes + len(background_names)])
    names = [str(name) for name in np.concatenate([background_names, evaluation_names])]
    if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
        raise DataError(f"the Omniglot file {stamp[0]} has character indices outside its character_names")
    order = np.argsort(codes, kind="stable")  # rows grouped by character, drawing order kept
    bounds = np.cumsum(np.bincount(codes, minlength=len(names)))[:-1]
    return dict(zip(names, np.split(order, bounds)))


def _read_npz_characters(path: Path, names: list[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns read_characters' result from the npz layout (stored 28x28 or resized 105x105)."""
    if not path.is_file():
        raise DataError(f"the Omniglot file {path} does not exist")
    stamp = _npz_stamp(path)
    rows_by_name = _npz_rows_by_name(stamp)
    missing = [name for name in names if name not in rows_by_name]
    if missing:
        raise _missing_error(path.parent, missing)
    per_character = [rows_by_name[name] for name in names]
    counts = np.array([len(rows) for rows in per_character], dtype=np.int64)
    rows = np.concatenate(per_character) if per_character else np.zeros(0, np.int64)
    if image_size == 28:
        return _npz_images(stamp, "images28")[rows], counts
    packed = _npz_images(stamp, "images105_packed")[rows]
    # unpack in chunks: all 105x105 bitmaps of a split at once would take hundreds of MB
    chunks = [
        area_resize_ink(np.unpackbits(packed[start : start + 1024], axis=-1, count=105), image_size)
        for start in range(0, len(packed), 1024)
    ]
    if not chunks:
        return np.zeros((0, image_size, image_size), np.uint8), counts
    return np.concatenate(chunks), counts


@functools.lru_cache(maxsize=8192)
def _read_folder_character(folder: str, image_size: int) -> np.ndarray:
    """Returns uint8 [n, S, S] for the PNGs of one character folder, in file-name order."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"the Omniglot character folder {folder} holds no .png images")
    inks = []
    for file in files:
        try:
            with Image.open(file) as image:
                gray = np.asarray(image.convert("L"), dtype=np.float32)
        except OSError as err:
            raise DataError(f"cannot read the Omniglot image {file} ({err})") from err
        inks.append(1.0 - gray / 255.0)  # the PNGs draw black ink (0) on white paper (255)
    if len({ink.shape for ink in inks}) == 1:  # the usual case: resize all drawings at once
        return area_resize_ink(np.stack(inks), image_size)
    return np.concatenate([area_resize_ink(ink[None], image_size) for ink in inks])


def _read_folder_characters(root: Path, names: list[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns read_characters' result from the folder layout."""
    folders, missing = [], []
    for name in names:
        found = [root / top / name for top in FOLDERS if (root / top / name).is_dir()]
        if found:
            folders.append(found[0])
        else:
            missing.append(name)
    if missing:
        raise _missing_error(root, missing)
    per_character = [_read_folder_character(str(folder), image_size) for folder in folders]
    counts = np.array([len(images) for images in per_character], dtype=np.int64)
    if not per_character:
        return np.zeros((0, image_size, image_size), np.uint8), counts
    return np.concatenate(per_character), counts

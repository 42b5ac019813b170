"""scikit-learn's bundled 8x8 handwritten digits as a small few-shot benchmark.

The data (`sklearn.datasets.load_digits`, 1,797 images, about 180 per digit) ships with
scikit-learn, so it needs no download and suits smoke tests and quick experiments. The ten
digits are split into disjoint class sets (see `DIGITS_SPLITS`):

    train: 0 1 2 3      val: 4 5 6      test: 7 8 9      all: 0..9

so meta-val and meta-test episodes are at most 3-way. Pixel values 0..16 are scaled to
[0, 1] and the images are upsampled (bilinear) to image_size x image_size, 28 by default,
so that a Conv-4 with four 2x2 max-pools applies unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from metassl.data.episodes import FewShotSplit, check_int
from metassl.errors import DataError

DIGITS_SPLITS: dict[str, tuple[int, ...]] = {
    "train": (0, 1, 2, 3),
    "val": (4, 5, 6),
    "test": (7, 8, 9),
    "all": tuple(range(10)),
}


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits: images float32 [1797, 8, 8] in [0, 1], targets int64 [1797]."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def load_digits(split: str = "train", image_size: int = 28) -> FewShotSplit:
    """Returns the digits of `split` as a FewShotSplit with x [N, 1, image_size, image_size].

    Labels are relabelled 0..len(digits)-1 in the order of DIGITS_SPLITS[split]; the class
    names are the digits themselves ("7", "8", "9" for test).
    """
    if split not in DIGITS_SPLITS:
        raise DataError(f"unknown digits split {split!r}; valid splits: {', '.join(DIGITS_SPLITS)}")
    image_size = check_int("image_size", image_size, 1)
    images, targets = _digits_arrays()
    digits = DIGITS_SPLITS[split]
    keep = np.isin(targets, digits)
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[list(digits)] = np.arange(len(digits))
    x = torch.from_numpy(images[keep]).unsqueeze(1)  # [N, 1, 8, 8]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return FewShotSplit(
        x=x.clamp_(0.0, 1.0).contiguous(),  # bilinear weights sum to 1 only up to rounding
        y=torch.from_numpy(relabel[targets[keep]]),
        class_names=tuple(str(d) for d in digits),
        name=f"digits/{split}",
    )

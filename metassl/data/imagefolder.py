"""Any folder of images with one subfolder per class, as a FewShotSplit.

    path/<class name>/<image>.png|.jpg|.jpeg     (extensions in any letter case)

Classes and files are taken in sorted name order; hidden entries (names starting with
".") are skipped. The folder has no meta-train/val/test division of its own: every class
is in the split, so use separate folders for disjoint class sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metassl.data.episodes import FewShotSplit, check_int
from metassl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_MODES = {1: "L", 3: "RGB"}


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


def load_imagefolder(path: str | Path, image_size: int = 28, channels: int = 1) -> FewShotSplit:
    """Returns every image under `path`: x [N, channels, S, S] float32 in [0, 1], y [N] class ids.

    channels 1 converts to grayscale ("L"), 3 to RGB; S = image_size (images are resized to
    a square, without keeping the aspect ratio).
    """
    image_size = check_int("image_size", image_size, 1)
    if channels not in _MODES:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"the image folder {root} does not exist; expected one subfolder of images per class")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected a folder with one subfolder of images per class")
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        raise DataError(
            f"the image folder {root} has no class subfolders; expected {root}/<class>/<image>.png"
        )

    images, labels = [], []
    for label, folder in enumerate(class_folders):
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"class folder {folder} holds no images; "
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
            )
        images.extend(_read_image(file, _MODES[channels], image_size) for file in files)
        labels.extend([label] * len(files))

    x = torch.from_numpy(np.stack(images))  # uint8 [N, S, S] or [N, S, S, 3]
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return FewShotSplit(
        x=x.float().div_(255.0).contiguous(),
        y=torch.tensor(labels, dtype=torch.int64),
        class_names=tuple(folder.name for folder in class_folders),
        name=f"imagefolder/{root.name}",
    )

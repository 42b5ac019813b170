"""The 28x28 Omniglot that ships inside the package, and the script that builds it.

`metassl/data/omniglot28/` holds all 32,460 drawings of Omniglot (Lake et al. 2015) at
28x28 as uint8 ink (255 = fully inked), in the "npz" layout of omniglot_files.py reduced
to the keys a 28x28 load reads:

  background_images28 / evaluation_images28         uint8 [N, 28, 28]
  background_character / evaluation_character       int16 [N]
  background_character_names / evaluation_character_names   [C] "Alphabet/characterNN"

So `data.dataset: omniglot` at image_size 28 works offline, with no root and no download;
other sizes need the 105x105 bitmaps (a root or a download). The folder also holds the
dataset's MIT license and a README with the attribution and the file's sha256, which
`embedded_root()` checks before the file is used.

Rebuild the file from any Omniglot folder (the unpacked official zips or an omniglot.npz):

    python -m metassl.data.omniglot_embedded PATH/TO/omniglot [OUT_FOLDER]

The zip entries carry a fixed date, so the same images give the same bytes and checksum.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from metassl.data.omniglot_files import FOLDERS, NPZ_FILE, find_layout, read_characters
from metassl.errors import DataError

EMBEDDED_DIR = Path(__file__).with_name("omniglot28")
EMBEDDED_SHA256 = "88f578427396e134d12f8b8ae43b4dcec2e87da53b21110fd2b82f17606fb215"
HALVES = ("background", "evaluation")  # the official split of Omniglot into two archives
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip entries' timestamp: reproducible bytes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _checked(path: str, mtime_ns: int, size: int) -> None:
    """Raises DataError unless the file at `path` has EMBEDDED_SHA256 (once per file version)."""
    found = sha256_of(Path(path))
    if found != EMBEDDED_SHA256:
        raise DataError(
            f"the embedded Omniglot file {path} is damaged: sha256 {found}, expected {EMBEDDED_SHA256}. "
            "Reinstall metassl, or rebuild it with `python -m metassl.data.omniglot_embedded ROOT`"
        )


def embedded_root() -> Path:
    """Returns the folder of the shipped 28x28 Omniglot after checking its checksum."""
    path = EMBEDDED_DIR / NPZ_FILE
    if not path.is_file():
        raise DataError(
            f"the embedded Omniglot file {path} is missing from this installation; reinstall metassl "
            "or pass data.root (a folder with Omniglot) to read another copy"
        )
    stat = path.stat()
    _checked(str(path), stat.st_mtime_ns, stat.st_size)
    return EMBEDDED_DIR


def _half_characters(root: Path, layout: str) -> dict[str, list[str]]:
    """Returns {"background": [...], "evaluation": [...]}: each half's "Alphabet/characterNN", sorted."""
    if layout == "npz":
        with np.load(root / NPZ_FILE, allow_pickle=False) as npz:
            return {half: sorted(str(n) for n in npz[f"{half}_character_names"]) for half in HALVES}
    return {half: sorted(f"{alphabet.name}/{character.name}"
                         for alphabet in (root / folder).iterdir() if alphabet.is_dir()
                         for character in alphabet.iterdir() if character.is_dir())
            for half, folder in zip(HALVES, FOLDERS)}


def build(source: str | Path, out_dir: str | Path = EMBEDDED_DIR) -> tuple[Path, str]:
    """Writes out_dir/omniglot.npz (28x28 only) from the Omniglot folder `source`; returns (path, sha256)."""
    source = Path(source).expanduser()
    layout = find_layout(source)
    if layout is None:
        raise DataError(f"no Omniglot data in {source}")
    arrays = {}
    for half, names in _half_characters(source, layout).items():
        images, counts = read_characters(source, layout, names, 28)
        arrays[f"{half}_images28"] = images
        arrays[f"{half}_character"] = np.repeat(np.arange(len(names), dtype=np.int16), counts)
        arrays[f"{half}_character_names"] = np.array(names)
    out = Path(out_dir) / NPZ_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_DATE), buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(out)
    return out, sha256_of(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the embedded 28x28 Omniglot file from an Omniglot folder.")
    parser.add_argument("source", help="a folder with omniglot.npz or with images_background/ and images_evaluation/")
    parser.add_argument("out_dir", nargs="?", default=str(EMBEDDED_DIR), help="where omniglot.npz goes")
    args = parser.parse_args(argv)
    try:
        path, digest = build(args.source, args.out_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: {path.stat().st_size} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

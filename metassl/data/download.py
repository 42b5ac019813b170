"""Downloading dataset archives: fetch a zip over HTTP(S) (or file://), check it, extract it."""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from metassl.data.paths import DATA_ENV_VAR
from metassl.errors import DataError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")

_OFFLINE_ADVICE = (
    "Without internet access, copy the data yourself and either pass its folder as root "
    "(or the dataset spec 'omniglot:PATH'), or set {env} to a folder whose omniglot/ "
    "subfolder holds it. Accepted layouts: a folder with omniglot.npz, or a folder with "
    "images_background/ and images_evaluation/ (the unpacked official zips)."
).format(env=DATA_ENV_VAR)


def fetch_zip_folder(url: str, dest: Path, folder: str, timeout_s: float = 60.0) -> Path:
    """Returns dest/folder after downloading the zip at `url` and extracting it into `dest`.

    Only the archive's top-level folder `folder` is extracted. Extraction goes to a
    temporary folder inside `dest` first, so an interrupted download never leaves a
    half-extracted `dest/folder` behind. Raises DataError naming the URL on any failure.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{folder}-") as tmp:
        archive = Path(tmp) / f"{folder}.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError, HTTPError and socket timeouts are all OSErrors
            raise DataError(f"could not download {url} ({err}). {_OFFLINE_ADVICE}") from err
        if not zipfile.is_zipfile(archive):
            raise DataError(f"the file downloaded from {url} is not a zip archive")
        with zipfile.ZipFile(archive) as zf:
            damaged = zf.testzip()
            if damaged is not None:
                raise DataError(
                    f"the zip downloaded from {url} is corrupt: member {damaged!r} fails its CRC check"
                )
            members = [name for name in zf.namelist() if name.startswith(f"{folder}/")]
            if not members:
                tops = sorted({name.split("/", 1)[0] for name in zf.namelist()})
                raise DataError(
                    f"the zip downloaded from {url} should hold a top-level folder {folder!r}, "
                    f"but holds {tops}"
                )
            # Only members under folder/ are extracted (not, say, __MACOSX/); extractall also
            # drops '..' parts, so nothing lands outside tmp.
            zf.extractall(Path(tmp) / "extracted", members=members)
        target = dest / folder
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / "extracted" / folder).rename(target)
    return target


def download_omniglot(dest: str | Path, base_url: str = OMNIGLOT_URL) -> Path:
    """Returns `dest` after downloading and extracting the two official Omniglot zips into it.

    Fetches <base_url>/images_background.zip and <base_url>/images_evaluation.zip (about
    16 MB together) and extracts them to dest/images_background/ and dest/images_evaluation/,
    the folder layout that `load_omniglot` reads. Folders already present are kept.
    """
    dest = Path(dest).expanduser()
    for folder in OMNIGLOT_ARCHIVES:
        if not (dest / folder).is_dir():
            fetch_zip_folder(f"{base_url.rstrip('/')}/{folder}.zip", dest, folder)
    return dest

"""Downloading dataset archives: fetch a zip over HTTP(S) (or file://), check it, extract it.

Downloads into a folder hold a file lock beside it (`.<folder>.lock`), so several
processes of one node (Ray Train workers, generator actors) that find the data missing
at the same time download it once: the first fetches, the others wait and then find it.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from filelock import FileLock, Timeout

from metassl.data.paths import DATA_ENV_VAR
from metassl.errors import DataError

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")
LOCK_TIMEOUT_S = 1800.0  # how long a process waits for another one's download of the same folder

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


def download_lock(dest: Path, timeout_s: float = LOCK_TIMEOUT_S) -> FileLock:
    """The lock that serialises downloads into `dest` on this node: the file `.<dest name>.lock` beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=timeout_s)


def download_omniglot(dest: str | Path, base_url: str = OMNIGLOT_URL, lock_timeout_s: float = LOCK_TIMEOUT_S) -> Path:
    """Returns `dest` after downloading and extracting the two official Omniglot zips into it.

    Fetches <base_url>/images_background.zip and <base_url>/images_evaluation.zip (about
    16 MB together) and extracts them to dest/images_background/ and dest/images_evaluation/,
    the folder layout that `load_omniglot` reads. Folders already present are kept. The
    whole download holds `download_lock(dest)`: a second caller waits (at most
    `lock_timeout_s`), then finds the folders and fetches nothing.
    """
    dest = Path(dest).expanduser()
    lock = download_lock(dest, lock_timeout_s)
    try:
        with lock:
            for folder in OMNIGLOT_ARCHIVES:
                if not (dest / folder).is_dir():  # checked under the lock: another process may have fetched it
                    fetch_zip_folder(f"{base_url.rstrip('/')}/{folder}.zip", dest, folder)
    except Timeout:
        raise DataError(f"waited {lock_timeout_s:g} s for another process downloading Omniglot into {dest} "
                        f"(the lock {lock.lock_file} is still held); is that download stuck?") from None
    return dest

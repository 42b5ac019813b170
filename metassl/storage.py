"""Run directories in object storage: a run works in a local mirror that is synced with a URI.

A run directory may be a URI (`s3://bucket/prefix/run`, `gs://...`, anything `pyarrow.fs`
understands), given as `--run-dir` or through the config's `storage` (the run directory
is then `storage/<name>`). Training, checkpoints and TensorBoard write to a local mirror
(`$METASSL_CACHE/runs/<hash>/<name>`, default `~/.cache/metassl`): rank 0 fills it from the
URI before the run (so a run resumes from object storage on any machine) and uploads what
changed after every checkpoint and at the end; step checkpoints pruned locally are
deleted remotely too. Ray Train's own checkpoints go to the same URI through
`RunConfig(storage_path)`.

Credentials are never read from files of this project: pyarrow takes them from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, an instance role,
GOOGLE_APPLICATION_CREDENTIALS, ...). A storage that cannot be reached, or refuses
access, raises StorageError naming the URI and where credentials come from.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from metassl.errors import StorageError

CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance "
          "role); a non-AWS endpoint is AWS_ENDPOINT_URL",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run with a service "
          "account attached)",
}


RUN_FILES = ("config.yaml", "result.json", "checkpoints/", "tensorboard/", "tokenizer.json",
             "tokenizer_source.json")  # what metassl writes


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations other than plain local paths and file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def split(location: str) -> tuple[str, str]:
    """(parent, name) of a URI or an absolute local path."""
    parent, _, name = location.rstrip("/").rpartition("/")
    return parent, name


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def _hint(uri: str) -> str:
    return CREDENTIALS_HINT.get(uri.split("://", 1)[0], "check the credentials in the environment")


@contextmanager
def _errors(action: str, location: str):
    """Report pyarrow and OS errors inside the block as a StorageError naming the action,
    the location and where credentials come from."""
    try:
        yield
    except StorageError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{action} {location!r}: {e}. {_hint(location)}") from None


def check_credentials(uri: str) -> None:
    """Raise StorageError when the environment's credentials for `uri` are visibly incomplete."""
    if uri.startswith("s3://"):
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if bool(key) != bool(secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"storage {uri!r}: {missing} is not set but its partner is; {_hint(uri)}")
    if uri.startswith("gs://"):
        creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if creds and not Path(creds).is_file():
            raise StorageError(f"storage {uri!r}: GOOGLE_APPLICATION_CREDENTIALS={creds!r} is not a file")


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a storage URI; StorageError when pyarrow cannot open it."""
    check_credentials(uri)
    try:
        with _errors("cannot open storage", uri):
            fs, path = pafs.FileSystem.from_uri(uri)
    except ValueError as e:
        raise StorageError(f"cannot open storage {uri!r}: {e}. {_hint(uri)}") from None
    return fs, path.rstrip("/")


def cache_root() -> Path:
    return Path(os.environ.get("METASSL_CACHE", Path.home() / ".cache" / "metassl"))


def list_names(location: str | Path) -> list[str]:
    """Names of the entries directly under a folder or URI ([] when it does not exist)."""
    if not is_uri(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = open_uri(str(location))
    with _errors("cannot list", str(location)):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_text(location: str | Path) -> str | None:
    """The text of a file in a folder or at a URI; None when there is no such file."""
    if not is_uri(location):
        path = Path(location)
        return path.read_text() if path.is_file() else None
    fs, path = open_uri(str(location))
    with _errors("cannot read", str(location)):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode()


def upload(path: Path, uri: str) -> None:
    """Copy the local file `path` to the storage URI `uri`."""
    fs, target = open_uri(uri)
    with _errors("cannot write", uri):
        pafs.copy_files(str(path), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class RunStore:
    """A run directory: `local` is where the run works; `pull`/`push` sync it with `location`.

    For a local `location` the mirror is the directory itself and syncing does nothing.
    """

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = is_uri(location)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        if not self.remote:
            self.local = Path(location).resolve()
            return
        self.fs, self.path = open_uri(self.location)
        digest = hashlib.sha1(self.location.encode()).hexdigest()[:16]
        self.local = cache_root() / "runs" / digest / split(self.path)[1]

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def parent(self) -> str:
        """The folder or URI that holds the run directory (Ray's `storage_path`)."""
        return split(self.location)[0] if self.remote else str(self.local.parent)

    def _remote_files(self) -> dict[str, int]:
        """Relative path -> size of every file under the remote run directory ({} when there is none)."""
        with _errors("cannot list", self.location):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return {i.path[len(self.path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def pull(self) -> None:
        """Make the mirror a copy of the run's files (not Ray's own) in storage.

        Everything is downloaded (a run directory is a few checkpoints and event files),
        and mirror files that storage does not have are deleted, so a stale mirror from
        an earlier run on this machine never leaks into the run.
        """
        if not self.remote:
            return
        remote = {rel: size for rel, size in self._remote_files().items() if rel.startswith(RUN_FILES)}
        if self.local.is_dir():
            for p in self.local.rglob("*"):
                rel = str(p.relative_to(self.local))
                if p.is_file() and rel.startswith(RUN_FILES) and rel not in remote:
                    p.unlink()
        self._pushed.clear()
        for rel in remote:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            with _errors("cannot read", f"{self.location}/{rel}"):
                pafs.copy_files(f"{self.path}/{rel}", str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, target)
            self._pushed[rel] = _signature(target)

    def push(self) -> None:
        """Upload the mirror's new or changed files; delete remote step checkpoints pruned locally."""
        if not self.remote:
            return
        local = {str(p.relative_to(self.local)): p for p in self.local.rglob("*")
                 if p.is_file() and not p.name.endswith((".tmp", ".part"))}
        with _errors("cannot write to", self.location):
            for rel, p in sorted(local.items()):
                signature = _signature(p)
                if self._pushed.get(rel) == signature:
                    continue
                pafs.copy_files(str(p), f"{self.path}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
                self._pushed[rel] = signature
            for rel in self._remote_files():
                if rel.startswith("checkpoints/step_") and rel not in local:
                    self.fs.delete_file(f"{self.path}/{rel}")
                    self._pushed.pop(rel, None)


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns

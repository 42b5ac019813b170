"""Parquet shards of episodes on any `pyarrow.fs` filesystem: writer, verified reader, source.

A dataset is a folder (a local path, or a URI such as ``file:///data/eps``,
``s3://bucket/prefix``, ``gs://bucket/prefix``) holding::

    part-00000.parquet   episodes 0..E-1 in the Arrow format of `metassl.generate.schema`
    part-00001.parquet   the next E episodes, and so on (E = episodes_per_shard)
    manifest.json        written last, by `ShardWriter.close`

``manifest.json`` is::

    {"schema_version": 1, "episodes": total,
     "shards": [{"file", "episodes", "first_episode_id", "last_episode_id", "bytes", "sha256"}],
     "metadata": {...caller's...}, "created": ISO-8601 UTC time}

A folder without a manifest is an incomplete (interrupted) write and is refused by readers.
Readers check each shard's size and sha256 against the manifest before parsing it.
Replacing a dataset (`overwrite=True`) writes the new shards under new names
(``part-00000-<tag>.parquet``) beside the old ones and deletes the old ones only after the
new manifest is written, so a replacement that fails leaves the old dataset as it was.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import uuid
import warnings
from datetime import datetime, timezone
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from metassl.data.episodes import check_int
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord, RecordSource
from metassl.generate.schema import (
    SCALAR_COLUMNS, SCHEMA_VERSION, from_record_batch, to_record_batch,
)

MANIFEST = "manifest.json"
SHARD_KEYS = ("file", "episodes", "first_episode_id", "last_episode_id", "bytes", "sha256")


def shard_name(index: int, tag: str = "") -> str:
    """Returns the file name of shard `index`, e.g. part-00001.parquet (part-00001-TAG.parquet with a tag)."""
    return f"part-{index:05d}{'-' + tag if tag else ''}.parquet"


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Returns (filesystem, path inside it) for a dataset folder `uri`.

    `uri` is anything `pyarrow.fs.FileSystem.from_uri` understands, or a plain local path
    (made absolute). With `filesystem` given, `uri` is a path inside it.
    """
    if filesystem is not None:
        return filesystem, uri.rstrip("/")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"cannot open {uri!r}: {err}. Use a local path or a URI pyarrow.fs understands "
            f"(file://, s3://, gs://, hdfs://, abfs://)"
        ) from err
    return fs, path.rstrip("/")


def read_manifest(uri: str, filesystem: pafs.FileSystem | None = None) -> dict:
    """Returns the manifest of the shard dataset at `uri`; DataError if missing or corrupt."""
    fs, path = resolve(uri, filesystem)
    where = _join(uri, MANIFEST)
    try:
        with fs.open_input_stream(_join(path, MANIFEST)) as f:
            raw = f.read()
    except FileNotFoundError as err:
        raise DataError(
            f"no manifest at {where}: not a shard dataset, or its write was interrupted "
            f"(a ShardWriter writes the manifest last, on close)"
        ) from err
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read manifest {where}: {err}") from err
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"manifest {where} is not valid JSON ({err}); rewrite the dataset") from err
    _check_manifest(manifest, where)
    return manifest


def _check_manifest(manifest: object, where: str) -> None:
    if not isinstance(manifest, dict) or not {"schema_version", "episodes", "shards"} <= set(manifest):
        raise DataError(
            f"manifest {where} is corrupt: expected a JSON object with schema_version, "
            f"episodes and shards"
        )
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(
            f"manifest {where} has schema version {manifest['schema_version']!r}; "
            f"this metassl reads version {SCHEMA_VERSION} only"
        )
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and set(SHARD_KEYS) <= s.keys()
        and isinstance(s["file"], str) and isinstance(s["sha256"], str)
        and all(isinstance(s[k], int) for k in ("episodes", "bytes"))
        for s in shards
    ):
        raise DataError(f"manifest {where} is corrupt: each shard entry needs keys {list(SHARD_KEYS)}")
    if sum(s["episodes"] for s in shards) != manifest["episodes"]:
        raise DataError(
            f"manifest {where} is corrupt: its shards hold {sum(s['episodes'] for s in shards)} "
            f"episodes but it says {manifest['episodes']}"
        )


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


class ShardWriter:
    """Writes EpisodeRecords to Parquet shards of `episodes_per_shard` episodes plus a manifest.

    Use as a context manager, or call `close()`: only a clean close writes the manifest, so a
    write that fails or is interrupted leaves a folder readers refuse. Every episode must
    have the shapes of the first one written. The dataset has SSL columns when the first
    `write` has any SSL view; episodes lacking a view then store null, and otherwise no
    later episode may have one.
    """

    def __init__(
        self,
        uri: str,
        episodes_per_shard: int = 256,
        metadata: dict | None = None,
        overwrite: bool = False,
        filesystem: pafs.FileSystem | None = None,
    ):
        self.uri = uri
        self.episodes_per_shard = check_int("episodes_per_shard", episodes_per_shard, 1)
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise DataError(f"ShardWriter metadata must be JSON-serialisable: {err}") from err
        self.fs, self.path = resolve(uri, filesystem)
        self.shards: list[dict] = []
        self.episodes = 0
        self.manifest: dict | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_count = 0
        self._closed = False
        self._tag = ""  # set when replacing a dataset: new shard names differ from the old ones
        self._replaced: list[str] = []  # the old dataset's shard files, deleted after the new manifest
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        manifest_path = _join(self.path, MANIFEST)
        try:
            exists = self.fs.get_file_info(manifest_path).type != pafs.FileType.NotFound
            if exists and not overwrite:
                raise DataError(
                    f"{_join(self.uri, MANIFEST)} exists: {self.uri} already holds a shard "
                    f"dataset; pass overwrite=True to replace it, or choose another folder"
                )
            if exists:
                try:
                    self._replaced = [s["file"] for s in read_manifest(self.path, self.fs)["shards"]]
                except DataError:
                    pass  # a corrupt manifest: replace it, leave unknown files alone
                self._tag = uuid.uuid4().hex[:8]
            self.fs.create_dir(self.path, recursive=True)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot prepare {self.uri} for writing shards: {err}") from err

    def write(self, records: Sequence[EpisodeRecord]) -> None:
        """Returns None; appends `records`, writing each shard as soon as it is full."""
        if self._closed:
            raise DataError(f"ShardWriter for {self.uri} is closed; open a new one to write more")
        start = 0
        while start < len(records):
            take = min(self.episodes_per_shard - self._pending_count, len(records) - start)
            batch = to_record_batch(records[start : start + take], schema=self._schema)
            self._schema = batch.schema
            self._pending.append(batch)
            self._pending_count += take
            start += take
            if self._pending_count == self.episodes_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending)
        sink = pa.BufferOutputStream()
        # statistics only where a reader could filter on them, not on the image tensors
        pq.write_table(table, sink, compression="zstd", write_statistics=list(SCALAR_COLUMNS))
        data = sink.getvalue()
        name = shard_name(len(self.shards), self._tag)
        ids = table.column("episode_id")
        try:
            with self.fs.open_output_stream(_join(self.path, name)) as f:
                f.write(data)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot write shard {_join(self.uri, name)}: {err}") from err
        self.shards.append({
            "file": name,
            "episodes": table.num_rows,
            "first_episode_id": ids[0].as_py(),
            "last_episode_id": ids[-1].as_py(),
            "bytes": data.size,
            "sha256": hashlib.sha256(data).hexdigest(),
        })
        self.episodes += table.num_rows
        self._pending, self._pending_count = [], 0

    def close(self) -> dict:
        """Returns the manifest, after writing the last (partial) shard and manifest.json."""
        if self.manifest is not None:
            return self.manifest
        if self._closed:
            raise DataError(f"ShardWriter for {self.uri} was aborted; it wrote no manifest")
        try:
            self._flush()
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "episodes": self.episodes,
                "shards": self.shards,
                "metadata": self.metadata,
                "created": datetime.now(timezone.utc).isoformat(),
            }
            self._write_manifest(manifest)
        except DataError:
            self.abort()  # a replacement removes what it wrote: the old dataset stays as it was
            raise
        self._closed = True
        self.manifest = manifest
        kept = {s["file"] for s in self.shards}
        left = self._delete([name for name in self._replaced if name not in kept])
        if left:  # the new dataset is complete either way; the old files are just unreferenced
            warnings.warn(f"{self.uri}: could not delete the replaced shards {left}", stacklevel=2)
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        target = _join(self.path, MANIFEST)
        # An object store's PUT replaces a file whole; elsewhere write aside and rename, so
        # that readers see the old manifest or the new one, never half of one.
        aside = self.fs.type_name not in ("s3", "gcs", "abfs")
        try:
            with self.fs.open_output_stream(target + ".tmp" if aside else target) as f:
                f.write(json.dumps(manifest, indent=2).encode())
            if aside:
                self.fs.move(target + ".tmp", target)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot write {_join(self.uri, MANIFEST)}: {err}") from err

    def abort(self) -> None:
        """Returns None; drops unwritten episodes. A new folder is left without a manifest; a
        replacement deletes the shards it wrote, so the old dataset stays as it was."""
        self._pending, self._pending_count, self._closed = [], 0, True
        if self._tag:
            self._delete([s["file"] for s in self.shards])  # leftovers would be unreferenced, harmless

    def _delete(self, names: list[str]) -> list[str]:
        """Delete these files of the folder; return the ones that could not be deleted."""
        left = []
        for name in names:
            target = _join(self.path, name)
            try:
                if self.fs.get_file_info(target).type == pafs.FileType.File:
                    self.fs.delete_file(target)
            except (pa.ArrowException, OSError):
                left.append(name)
        return left

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        elif self.manifest is None:
            self.abort()


def read_shard(
    fs: pafs.FileSystem, path: str, uri: str, entry: dict, verify: bool
) -> list[EpisodeRecord]:
    """Returns the records of manifest shard `entry` of the dataset at `uri` (`path` in `fs`).

    With `verify`, checks the shard's size and sha256 against `entry` before parsing it.
    """
    where = _join(uri, entry["file"])
    try:
        with fs.open_input_stream(_join(path, entry["file"])) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise DataError(f"shard {where} listed in the manifest is missing") from err
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read shard {where}: {err}") from err
    if verify and len(data) != entry["bytes"]:
        raise DataError(
            f"shard {where} has {len(data)} bytes but the manifest says {entry['bytes']}: "
            f"it is truncated or was replaced; regenerate the dataset"
        )
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(
            f"shard {where} is corrupt: its sha256 {hashlib.sha256(data).hexdigest()} differs "
            f"from the manifest's {entry['sha256']}; regenerate the dataset"
        )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot parse shard {where} as Parquet: {err}") from err
    if table.num_rows != entry["episodes"]:
        raise DataError(
            f"shard {where} holds {table.num_rows} episodes but the manifest says {entry['episodes']}"
        )
    try:
        return from_record_batch(table)
    except DataError as err:
        raise DataError(f"shard {where}: {err}") from err


def iter_shards(
    uri: str, verify: bool = True, filesystem: pafs.FileSystem | None = None
) -> Iterator[EpisodeRecord]:
    """Returns an iterator over every EpisodeRecord of the dataset at `uri`, in manifest order.

    With `verify`, each shard's size and sha256 are checked against the manifest before it
    is parsed; a mismatch raises DataError naming the shard.
    """
    manifest = read_manifest(uri, filesystem)
    fs, path = resolve(uri, filesystem)
    for entry in manifest["shards"]:
        yield from read_shard(fs, path, uri, entry, verify)


class ShardEpisodes(RecordSource):
    """An episode source over a shard dataset, like the live generators: `record(i)`,
    `episode(i)`, `batch(start, count)` and `len()`.

    Index i is the i-th episode in manifest order. Shards are read lazily and the most
    recently used one is kept decoded, so sequential access reads each shard once. An index
    at or past `len(self)` raises DataError: the caller decides whether to wrap around
    (e.g. `source.episode(step % len(source))` for several passes).
    """

    def __init__(self, uri: str, verify: bool = True, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        self.verify = verify
        self.manifest = read_manifest(uri, filesystem)
        self.fs, self.path = resolve(uri, filesystem)
        self._starts: list[int] = []
        total = 0
        for entry in self.manifest["shards"]:
            self._starts.append(total)
            total += entry["episodes"]
        self._cached: tuple[int, list[EpisodeRecord]] | None = None

    def __len__(self) -> int:
        return self.manifest["episodes"]

    def record(self, index: int) -> EpisodeRecord:
        """Returns EpisodeRecord `index` (0-based position in the dataset)."""
        index = check_int("episode index", index, 0)
        if index >= len(self):
            raise DataError(
                f"episode index {index} is past the end of {self.uri}, which holds {len(self)} "
                f"episodes (valid indices are 0..{len(self) - 1}); the caller decides whether "
                f"to wrap around, e.g. index % {len(self)}"
            )
        shard = bisect.bisect_right(self._starts, index) - 1
        if self._cached is None or self._cached[0] != shard:
            entry = self.manifest["shards"][shard]
            self._cached = (shard, read_shard(self.fs, self.path, self.uri, entry, self.verify))
        return self._cached[1][index - self._starts[shard]]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cached"] = None  # workers reload shards themselves rather than receive them
        return state

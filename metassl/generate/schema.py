"""The Arrow format of generated episodes: one row per `EpisodeRecord`.

Schema version 1 (schema metadata ``{"metassl.schema_version": "1"}``). For an episode with
N = n_way, K = k_shot, Q = n_query, items of shape S and M SSL source items. Items are images
(float32, S = [C, H, W]), texts (int64, S = [2, L]: token ids and attention mask) or audio
clips (float32, S = [1, T]); the table below shows images, a text table has int64 x columns of
the same layout and an audio table float32 ones:

=================  ===========================================  ====================================
column             Arrow type                                   meaning
=================  ===========================================  ====================================
episode_id         int64                                        position in the generated stream
generator          string                                       name of the generator that made it
seed               int64                                        seed of its randomness, 0..2**63-1
n_way              int32                                        N
k_shot             int32                                        K
n_query            int32                                        Q
encoder_version    int32                                        embedding a cluster generator used
support_x          fixed_shape_tensor(float32, [N*K, C, H, W])  support images, label-major
support_y          fixed_shape_tensor(int64, [N*K])             support labels 0..N-1
query_x            fixed_shape_tensor(float32, [N*Q, C, H, W])  query images, label-major
query_y            fixed_shape_tensor(int64, [N*Q])             query labels 0..N-1
ssl_x1 (optional)  fixed_shape_tensor(float32, [M, C, H, W])    first SimCLR view, null if absent
ssl_x2 (optional)  fixed_shape_tensor(float32, [M, C, H, W])    second SimCLR view, null if absent
rot_x (optional)   fixed_shape_tensor(float32, [M, C, H, W])    rotated images, null if absent
rot_y (optional)   fixed_shape_tensor(int64, [M])               quarter turns 0..3, null if absent
=================  ===========================================  ====================================

For audio `rot_x` holds the source clips unchanged (what CPC reads) and `rot_y` zeros.
For texts the pretext columns hold masked-language modelling instead of rotations: `rot_x`
the masked items `[M, 2, L]`, `rot_y` int64 `[M, L]` the original ids at masked positions and
-100 elsewhere (metassl.ssl.masking).

The four SSL columns are present together or not at all (`ssl_m` None); when present, a
row whose record lacks a view holds null there. Every row of one table has the same shapes.
Tensors round-trip bitwise: `from_record_batch(to_record_batch(records))` returns records
whose tensors equal the originals bit for bit, with the same dtypes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from metassl.data.episodes import Episode
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord

SCHEMA_VERSION = 1
VERSION_KEY = b"metassl.schema_version"
SSL_COLUMNS = ("ssl_x1", "ssl_x2", "rot_x", "rot_y")
SCALAR_COLUMNS = {
    "episode_id": pa.int64(),
    "generator": pa.string(),
    "seed": pa.int64(),
    "n_way": pa.int32(),
    "k_shot": pa.int32(),
    "n_query": pa.int32(),
    "encoder_version": pa.int32(),
}
TENSOR_COLUMNS = ("support_x", "support_y", "query_x", "query_y")
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


def episode_schema(
    x_shape: tuple, n_way: int, k_shot: int, n_query: int, ssl_m: int | None, text: bool = False
) -> pa.Schema:
    """Returns the Arrow schema of episodes with items `x_shape` (images [C, H, W]; `text`: [2, L] int64)."""
    image = [int(d) for d in x_shape]
    value = pa.int64() if text else pa.float32()
    images = lambda n: pa.fixed_shape_tensor(value, [n, *image])  # noqa: E731
    labels = lambda n: pa.fixed_shape_tensor(pa.int64(), [n])  # noqa: E731
    fields = [pa.field(name, kind, nullable=False) for name, kind in SCALAR_COLUMNS.items()]
    fields += [
        pa.field("support_x", images(n_way * k_shot), nullable=False),
        pa.field("support_y", labels(n_way * k_shot), nullable=False),
        pa.field("query_x", images(n_way * n_query), nullable=False),
        pa.field("query_y", labels(n_way * n_query), nullable=False),
    ]
    if ssl_m is not None:
        fields += [pa.field(name, images(ssl_m)) for name in ("ssl_x1", "ssl_x2", "rot_x")]
        targets = [ssl_m, image[-1]] if text else [ssl_m]  # texts: a target per token
        fields.append(pa.field("rot_y", pa.fixed_shape_tensor(pa.int64(), targets)))
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})


def record_schema(record: EpisodeRecord, ssl_m: int | None) -> pa.Schema:
    """Returns the schema `record` is stored under, with `ssl_m` SSL images (None: no SSL columns)."""
    support_x = record.episode.support_x
    text = support_x.dtype == torch.int64
    audio = support_x.dtype == torch.float32 and support_x.ndim == 3 and support_x.shape[1] == 1
    if record.episode.batched or support_x.ndim != (3 if text or audio else 4):
        raise DataError(
            f"episode {record.episode_id}: support_x must be an unbatched [N*K, C, H, W] float32 tensor "
            f"(images), [N*K, 2, L] int64 (texts) or [N*K, 1, T] float32 (audio), got {support_x.dtype} with shape "
            f"{list(support_x.shape)} (batched={record.episode.batched})"
        )
    if len(record.episode.support_y) == 0:
        raise DataError(f"episode {record.episode_id}: support_y is empty; an episode needs labels")
    return episode_schema(
        tuple(support_x.shape[1:]), record.n_way, record.k_shot, record.n_query, ssl_m, text
    )


def to_record_batch(
    records: Sequence[EpisodeRecord], schema: pa.Schema | None = None
) -> pa.RecordBatch:
    """Returns `records` as one Arrow RecordBatch, one row per record, in order.

    Every record must have the same shapes; `schema` (default: derived from the first record
    and whether any record has SSL views) pins them, which is how a writer keeps one schema
    across batches. Raises DataError naming the offending episode ids otherwise.
    """
    if len(records) == 0:
        raise DataError("to_record_batch needs at least one EpisodeRecord, got none")
    if schema is None:
        with_ssl = [r for r in records if any(getattr(r, c) is not None for c in SSL_COLUMNS)]
        ssl_m = _ssl_m(with_ssl[0]) if with_ssl else None
        schema = record_schema(records[0], ssl_m)
    tensors = {
        name: _tensor_column(records, name, [getattr(r.episode, name) for r in records], schema)
        for name in TENSOR_COLUMNS
    }
    if schema.get_field_index("ssl_x1") >= 0:
        for name in SSL_COLUMNS:
            tensors[name] = _tensor_column(records, name, [getattr(r, name) for r in records], schema)
    else:
        _refuse_ssl(records)
    scalars = {name: _scalar_column(records, name, kind) for name, kind in SCALAR_COLUMNS.items()}
    columns = [scalars.get(name, tensors.get(name)) for name in schema.names]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> list[EpisodeRecord]:
    """Returns the EpisodeRecords stored in `batch` (the inverse of `to_record_batch`)."""
    check_schema(batch.schema)
    batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
    return [record for b in batches for record in _batch_records(b)]


def check_schema(schema: pa.Schema) -> None:
    """Returns None if `schema` is a readable episode schema, else raises DataError saying why."""
    version = (schema.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise DataError(
            "not a metassl episode table: its schema has no 'metassl.schema_version' metadata"
        )
    if version != str(SCHEMA_VERSION).encode():
        raise DataError(
            f"episode table has schema version {version.decode(errors='replace')!r}; "
            f"this metassl reads version {SCHEMA_VERSION} only"
        )
    for name, kind in SCALAR_COLUMNS.items():
        _check_field(schema, name, lambda t, kind=kind: t == kind, str(kind))
    present = [c for c in SSL_COLUMNS if schema.get_field_index(c) >= 0]
    if present and len(present) != len(SSL_COLUMNS):
        raise DataError(
            f"episode table has SSL columns {present} but not all of {list(SSL_COLUMNS)}"
        )
    x_type = schema.field("support_x").type if schema.get_field_index("support_x") >= 0 else None
    text = isinstance(x_type, pa.FixedShapeTensorType) and x_type.value_type == pa.int64()
    for name in TENSOR_COLUMNS + tuple(present):
        value = pa.int64() if name.endswith("_y") or text else pa.float32()
        _check_field(
            schema, name,
            lambda t, value=value: isinstance(t, pa.FixedShapeTensorType) and t.value_type == value,
            f"fixed_shape_tensor({value}, ...)",
        )


def _check_field(schema: pa.Schema, name: str, ok, expected: str) -> None:
    index = schema.get_field_index(name)
    if index < 0:
        raise DataError(
            f"episode table lacks the required column {name!r}; it has {schema.names}"
        )
    if not ok(schema.field(index).type):
        raise DataError(
            f"episode table column {name!r} has type {schema.field(index).type}, expected {expected}"
        )


def _ssl_m(record: EpisodeRecord) -> int:
    view = next(getattr(record, c) for c in SSL_COLUMNS if getattr(record, c) is not None)
    return int(view.shape[0])


def _refuse_ssl(records: Sequence[EpisodeRecord]) -> None:
    with_ssl = [r.episode_id for r in records if any(getattr(r, c) is not None for c in SSL_COLUMNS)]
    if with_ssl:
        raise DataError(
            f"episodes {with_ssl[:10]} have SSL views but this table's schema has no SSL columns "
            f"(earlier episodes had none); a dataset's episodes must all have SSL views or none"
        )


def _scalar_column(records: Sequence[EpisodeRecord], name: str, kind: pa.DataType) -> pa.Array:
    values = [getattr(r, name) for r in records]
    if kind == pa.string():
        bad = [r.episode_id for r, v in zip(records, values) if not isinstance(v, str)]
        if bad:
            raise DataError(f"episodes {bad[:10]}: {name} must be a str")
        return pa.array(values, kind)
    low, high = (0, INT64_MAX) if kind == pa.int64() else (0, INT32_MAX)
    bad = [
        (r.episode_id, v) for r, v in zip(records, values)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not low <= v <= high
    ]
    if bad:
        raise DataError(
            f"{name} must be an integer in {low}..{high}; got (episode id, {name}) {bad[:10]}"
        )
    return pa.array([int(v) for v in values], kind)


def _tensor_column(
    records: Sequence[EpisodeRecord], name: str, tensors: list, schema: pa.Schema
) -> pa.Array:
    """Returns the fixed-shape tensor column `name` of `tensors` (None: a null row)."""
    field = schema.field(name)
    shape = list(field.type.shape)
    dtype = torch.int64 if field.type.value_type == pa.int64() else torch.float32
    bad = [
        (r.episode_id, _describe(t))
        for r, t in zip(records, tensors)
        if (t is None and not field.nullable)
        or (t is not None and not (_is_tensor(t) and t.dtype == dtype and list(t.shape) == shape))
    ]
    if bad:
        raise DataError(
            f"{name} must be {dtype} {shape} in every episode of a batch (the shape of the "
            f"first episode, or of the dataset being written); got (episode id, tensor) {bad[:10]}"
        )
    valid = np.array([t is not None for t in tensors])
    values = np.zeros if not valid.all() else np.empty
    out = values((len(tensors), *shape), dtype=np.int64 if dtype == torch.int64 else np.float32)
    for i, t in enumerate(tensors):
        if t is not None:
            out[i] = t.detach().cpu().numpy()
    flat = pa.array(out.reshape(-1))  # zero-copy: wraps the numpy buffer
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    storage = pa.Array.from_buffers(field.type.storage_type, len(tensors), [bitmap], children=[flat])
    return pa.ExtensionArray.from_storage(field.type, storage)


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _describe(value: object) -> str:
    if value is None:
        return "missing"
    if _is_tensor(value):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _column_rows(column: pa.Array, name: str) -> list:
    """Returns the rows of a fixed-shape tensor column as torch tensors (None for null rows)."""
    shape = list(column.type.shape)
    size = int(np.prod(shape))
    storage = column.storage
    values = storage.values.slice(storage.offset * size, len(storage) * size)
    if values.null_count:
        values = values.fill_null(0)  # parquet reads the values of null rows as nulls
    # One copy of the whole column (Arrow memory is read-only, often shared), then a view per row.
    array = torch.from_numpy(np.array(values.to_numpy(zero_copy_only=False)).reshape(len(storage), *shape))
    valid = storage.is_valid().to_numpy(zero_copy_only=False)
    return [array[i] if valid[i] else None for i in range(len(storage))]


def _batch_records(batch: pa.RecordBatch) -> list[EpisodeRecord]:
    scalars = {name: batch.column(name).to_pylist() for name in SCALAR_COLUMNS}
    tensors = {name: _column_rows(batch.column(name), name) for name in TENSOR_COLUMNS}
    has_ssl = batch.schema.get_field_index("ssl_x1") >= 0
    ssl = {name: _column_rows(batch.column(name), name) for name in SSL_COLUMNS} if has_ssl else {}
    for name in TENSOR_COLUMNS + ("episode_id", "generator", "seed", "encoder_version"):
        column = tensors.get(name, scalars.get(name))
        if any(v is None for v in column):
            raise DataError(f"episode table column {name!r} has null rows; every episode needs one")
    return [
        EpisodeRecord(
            episode_id=scalars["episode_id"][i],
            generator=scalars["generator"][i],
            seed=scalars["seed"][i],
            episode=Episode(**{name: tensors[name][i] for name in TENSOR_COLUMNS}),
            encoder_version=scalars["encoder_version"][i],
            **{name: ssl[name][i] for name in ssl},
        )
        for i in range(batch.num_rows)
    ]

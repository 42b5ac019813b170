"""Arrow schema and Parquet shards of EpisodeRecords: round trips, manifests, corruption."""
import json

import pyarrow as pa
import pytest
import torch

from metassl.data.episodes import Episode
from metassl.errors import DataError
from metassl.generate.record import EpisodeRecord
from metassl.generate.schema import (
    SCHEMA_VERSION, episode_schema, from_record_batch, to_record_batch,
)
from metassl.generate.shards import (
    ShardEpisodes, ShardWriter, iter_shards, read_manifest,
)

BIG_SEED = 2**63 - 1


def make_record(i: int, ssl: bool = False, n_way: int = 3, k_shot: int = 2, n_query: int = 4,
                image: tuple = (1, 6, 5), m: int = 4) -> EpisodeRecord:
    """A hand-built record with random tensors; SSL views when `ssl`."""
    g = torch.Generator().manual_seed(i)
    episode = Episode(
        support_x=torch.randn(n_way * k_shot, *image, generator=g),
        support_y=torch.arange(n_way).repeat_interleave(k_shot),
        query_x=torch.randn(n_way * n_query, *image, generator=g),
        query_y=torch.arange(n_way).repeat_interleave(n_query),
    )
    views = {}
    if ssl:
        views = dict(
            ssl_x1=torch.randn(m, *image, generator=g),
            ssl_x2=torch.randn(m, *image, generator=g),
            rot_x=torch.randn(m, *image, generator=g),
            rot_y=torch.randint(0, 4, (m,), generator=g),
        )
    return EpisodeRecord(episode_id=i, generator=f"gen-{i % 2}", seed=BIG_SEED - i,
                         episode=episode, encoder_version=i % 3, **views)


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def assert_same(got: EpisodeRecord, want: EpisodeRecord) -> None:
    assert (got.episode_id, got.generator, got.seed, got.encoder_version) == (
        want.episode_id, want.generator, want.seed, want.encoder_version)
    assert type(got.seed) is int and not got.episode.batched
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert same_bits(getattr(got.episode, name), getattr(want.episode, name)), name
    for name in ("ssl_x1", "ssl_x2", "rot_x", "rot_y"):
        assert same_bits(getattr(got, name), getattr(want, name)), name


def test_record_batch_round_trip_is_bitwise():
    records = [make_record(0, ssl=True), make_record(1), make_record(2, ssl=True)]
    # NaN payloads and signed zeros must survive too
    records[0].episode.support_x.view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")])
    batch = to_record_batch(records)
    assert batch.schema.metadata == {b"metassl.schema_version": str(SCHEMA_VERSION).encode()}
    assert batch.schema.field("support_x").type.shape == [6, 1, 6, 5]
    assert batch.column("seed").to_pylist() == [BIG_SEED, BIG_SEED - 1, BIG_SEED - 2]
    assert batch.column("n_way").to_pylist() == [3, 3, 3]
    assert batch.column("ssl_x1").null_count == 1
    for table in (batch, pa.Table.from_batches([batch.slice(0, 1), batch.slice(1)])):
        got = from_record_batch(table)
        assert len(got) == 3
        for g, w in zip(got, records):
            assert_same(g, w)
    assert from_record_batch(to_record_batch(records[1:2]))[0].ssl_x1 is None


def test_episode_schema_columns():
    schema = episode_schema((3, 8, 8), 5, 1, 15, ssl_m=None)
    assert "ssl_x1" not in schema.names
    assert schema.field("query_x").type.shape == [75, 3, 8, 8]
    assert schema.field("seed").type == pa.int64()
    ssl = episode_schema((3, 8, 8), 5, 1, 15, ssl_m=6)
    assert ssl.field("rot_y").type.shape == [6] and ssl.field("rot_y").type.value_type == pa.int64()


def test_mismatched_shapes_and_bad_tables_raise():
    with pytest.raises(DataError, match=r"query_x.*\(7,"):
        to_record_batch([make_record(6), make_record(7, n_query=5)])
    with pytest.raises(DataError, match="support_x.*episode id"):
        to_record_batch([make_record(0), make_record(1, image=(1, 5, 5))])
    with pytest.raises(DataError, match="ssl_x1"):
        to_record_batch([make_record(0, ssl=True), make_record(1, ssl=True, m=3)])
    with pytest.raises(DataError, match="seed"):
        to_record_batch([EpisodeRecord(0, "g", 2**63, make_record(0).episode)])
    batch = to_record_batch([make_record(0)])
    with pytest.raises(DataError, match="schema_version"):
        from_record_batch(batch.replace_schema_metadata({}))
    with pytest.raises(DataError, match="version '2'"):
        from_record_batch(batch.replace_schema_metadata({"metassl.schema_version": "2"}))
    with pytest.raises(DataError, match="'query_y'"):
        from_record_batch(batch.drop_columns(["query_y"]))


def write(uri, records, per_shard=4, **kwargs) -> dict:
    with ShardWriter(uri, episodes_per_shard=per_shard, metadata={"run": "t"}, **kwargs) as w:
        w.write(records[:5])  # a write that straddles shard boundaries
        w.write(records[5:])
    return w.manifest


@pytest.mark.parametrize("as_uri", [False, True])
def test_shards_round_trip(tmp_path, as_uri):
    import hashlib
    records = [make_record(i, ssl=i % 2 == 0) for i in range(10)]
    folder = tmp_path / "eps"
    uri = folder.as_uri() if as_uri else str(folder)
    manifest = write(uri, records)
    assert manifest == read_manifest(uri)
    assert manifest["episodes"] == 10 and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["metadata"] == {"run": "t"} and "created" in manifest
    assert [s["file"] for s in manifest["shards"]] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [s["episodes"] for s in manifest["shards"]] == [4, 4, 2]
    assert [(s["first_episode_id"], s["last_episode_id"]) for s in manifest["shards"]] == [
        (0, 3), (4, 7), (8, 9)]
    for s in manifest["shards"]:
        data = (folder / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    got = list(iter_shards(uri))
    assert len(got) == 10
    for g, w in zip(got, records):
        assert_same(g, w)

    source = ShardEpisodes(uri)
    assert len(source) == 10
    for i in [9, 0, 5, 4, 3, 8, 1]:  # random access across shards
        assert_same(source.record(i), records[i])
    assert same_bits(source.episode(6).query_x, records[6].episode.query_x)
    batch = source.batch(2, 4)
    assert batch.batched and batch.support_x.shape == (4, 6, 1, 6, 5)
    assert same_bits(batch.query_x[3], records[5].episode.query_x)
    with pytest.raises(DataError, match="holds 10 episodes"):
        source.record(10)


def test_empty_dataset_and_write_after_close(tmp_path):
    with ShardWriter(str(tmp_path / "e")) as w:
        pass
    assert w.manifest["episodes"] == 0 and w.manifest["shards"] == []
    assert list(iter_shards(str(tmp_path / "e"))) == []
    with pytest.raises(DataError, match="closed"):
        w.write([make_record(0)])


def test_corrupted_shards_are_named(tmp_path):
    folder = tmp_path / "eps"
    write(str(folder), [make_record(i) for i in range(10)])
    shard = folder / "part-00001.parquet"
    data = shard.read_bytes()

    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"part-00001\.parquet has \d+ bytes"):
        list(iter_shards(str(folder)))
    with pytest.raises(DataError, match=r"part-00001\.parquet as Parquet"):
        list(iter_shards(str(folder), verify=False))

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"part-00001\.parquet is corrupt: its sha256"):
        ShardEpisodes(str(folder)).record(4)
    assert_same(ShardEpisodes(str(folder)).record(3), make_record(3))  # other shards still read

    shard.unlink()
    with pytest.raises(DataError, match=r"part-00001\.parquet .*missing"):
        list(iter_shards(str(folder)))


def test_missing_or_corrupt_manifest_and_overwrite(tmp_path):
    folder = tmp_path / "eps"
    with pytest.raises(DataError, match="no manifest.*interrupted"):
        read_manifest(str(folder))

    with pytest.raises(RuntimeError):  # an error inside the block leaves no manifest
        with ShardWriter(str(folder), episodes_per_shard=2) as w:
            w.write([make_record(i) for i in range(5)])
            raise RuntimeError("generator crashed")
    assert (folder / "part-00001.parquet").exists() and not (folder / "manifest.json").exists()
    with pytest.raises(DataError, match=r"manifest\.json.*interrupted"):
        ShardEpisodes(str(folder))

    write(str(folder), [make_record(i) for i in range(10)], per_shard=2)
    with pytest.raises(DataError, match="already holds a shard dataset.*overwrite=True"):
        ShardWriter(str(folder))
    with pytest.raises(RuntimeError):  # a replacement that fails leaves the old dataset as it was
        with ShardWriter(str(folder), episodes_per_shard=2, overwrite=True) as w:
            w.write([make_record(i) for i in range(5)])
            raise RuntimeError("generator crashed")
    assert [r.episode_id for r in iter_shards(str(folder))] == list(range(10))
    assert sorted(p.name for p in folder.glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(5)]
    manifest = write(str(folder), [make_record(i) for i in range(6)], overwrite=True)
    assert manifest["episodes"] == 6 and len(manifest["shards"]) == 2
    assert not (folder / "part-00004.parquet").exists()  # the old dataset's shards are gone
    assert len(list(folder.glob("*.parquet"))) == 2
    assert [r.episode_id for r in iter_shards(str(folder))] == list(range(6))
    (folder / "manifest.json.tmp").mkdir()  # the new manifest cannot be written
    with pytest.raises(DataError, match=r"cannot write .*manifest\.json"):
        write(str(folder), [make_record(i) for i in range(9)], overwrite=True)
    (folder / "manifest.json.tmp").rmdir()
    assert [r.episode_id for r in iter_shards(str(folder))] == list(range(6))  # the old dataset, untouched
    assert len(list(folder.glob("*.parquet"))) == 2
    write(str(folder), [make_record(i) for i in range(9)], overwrite=True)  # replacing a replacement
    assert [r.episode_id for r in iter_shards(str(folder))] == list(range(9))
    assert len(list(folder.glob("*.parquet"))) == 3

    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(str(folder))
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 9, "episodes": 0, "shards": []}))
    with pytest.raises(DataError, match="schema version 9"):
        read_manifest(str(folder))


def test_writer_keeps_one_schema(tmp_path):
    with pytest.raises(DataError, match="n_query|query_x"):
        with ShardWriter(str(tmp_path / "a"), episodes_per_shard=4) as w:
            w.write([make_record(0), make_record(1)])
            w.write([make_record(2, n_query=5)])
    with pytest.raises(DataError, match="SSL views"):
        with ShardWriter(str(tmp_path / "b"), episodes_per_shard=4) as w:
            w.write([make_record(0)])
            w.write([make_record(1, ssl=True)])
    with pytest.raises(DataError, match="JSON"):
        ShardWriter(str(tmp_path / "c"), metadata={"x": object()})

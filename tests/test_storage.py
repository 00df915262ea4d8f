"""Storage layer: URIs, atomic objects, versioned datasets (local and S3 via moto), directories."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from jf_ray.errors import UserInputError
from jf_ray.storage import (
    DatasetError,
    DatasetWriter,
    VersionedSchema,
    check_columns,
    delete_tree,
    download_dir,
    exists,
    fs_and_path,
    join_uri,
    read_bytes,
    read_dataset,
    read_json,
    read_manifest,
    read_table,
    upload_dir,
    write_bytes_atomic,
    write_json_atomic,
    write_table_atomic,
)

SCHEMA = VersionedSchema(
    "test.rows", 2, pa.schema([("key", pa.string()), ("values", pa.list_(pa.int32())), ("flag", pa.bool_())])
)


def _table(keys: list[str]) -> pa.Table:
    return pa.table(
        {
            "values": [[i, i + 1] for i in range(len(keys))],
            "key": keys,
            "flag": [True] * len(keys),
            "extra": keys,
        }
    )


def test_uri_forms(tmp_path):
    fs, path = fs_and_path(f"file://{tmp_path}/a")
    assert path == f"{tmp_path}/a" and fs.type_name == "local"
    assert fs_and_path(str(tmp_path / "b"))[1] == f"{tmp_path}/b"
    assert join_uri("s3://bkt/", "x/", "/y.json") == "s3://bkt/x/y.json"
    assert join_uri("file:///tmp", "a", "") == "file:///tmp/a"
    with pytest.raises(UserInputError, match="unsupported storage scheme"):
        fs_and_path("gopher://x/y")
    with pytest.raises(UserInputError, match="bucket"):
        fs_and_path("s3:///nobucket")


def test_atomic_objects_local(tmp_path):
    uri = f"file://{tmp_path}/deep/dir/obj.bin"
    assert not exists(uri)
    write_bytes_atomic(uri, b"one")
    write_bytes_atomic(uri, b"two")
    assert read_bytes(uri) == b"two"
    assert sorted(p.name for p in (tmp_path / "deep/dir").iterdir()) == ["obj.bin"]  # no temporaries left
    write_json_atomic(join_uri(f"file://{tmp_path}", "x.json"), {"a": [1, 2]})
    assert read_json(f"{tmp_path}/x.json") == {"a": [1, 2]}
    write_table_atomic(f"{tmp_path}/t.parquet", _table(["a", "b"]))
    assert read_table(f"{tmp_path}/t.parquet", columns=["key"]).column("key").to_pylist() == ["a", "b"]
    with pytest.raises(UserInputError, match="not found"):
        read_bytes(f"{tmp_path}/missing")


def test_dataset_roundtrip_and_resume_bookkeeping(tmp_path):
    uri = str(tmp_path / "ds")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(["a", "b"]))
    writer.write_shard("s1", _table(["c"]))
    with pytest.raises(DatasetError, match="manifest.json missing"):
        read_dataset(uri)
    assert sorted(writer.finished_shards()) == ["s0", "s1"]
    with pytest.raises(DatasetError, match="unfinished shards s2"):
        writer.commit(expected_shards=["s0", "s1", "s2"])
    manifest = writer.commit({"round": 3}, expected_shards=["s0", "s1"])
    assert manifest["num_rows"] == 3 and manifest["meta"] == {"round": 3}
    table = read_dataset(uri, required_columns=["key", "values"], schema=SCHEMA)
    assert table.column_names == SCHEMA.column_names  # extra column dropped, order fixed
    assert sorted(table.column("key").to_pylist()) == ["a", "b", "c"]
    assert table.schema.field("values").type == pa.list_(pa.int32())
    # A new shard un-commits the dataset until the next commit.
    DatasetWriter(uri, SCHEMA).write_shard("s2", _table(["d"]))
    with pytest.raises(DatasetError, match="manifest.json missing"):
        read_dataset(uri)
    writer.reset()
    assert writer.finished_shards() == {}
    assert writer.commit()["num_rows"] == 0


def test_reader_rejects_wrong_schema_and_missing_columns(tmp_path):
    uri = str(tmp_path / "ds")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(["a"]))
    writer.commit()
    other = VersionedSchema("test.rows", 3, SCHEMA.arrow)
    with pytest.raises(DatasetError, match="expected test.rows v3"):
        read_dataset(uri, schema=other)
    with pytest.raises(DatasetError, match="missing from the data: nope, nada"):
        read_dataset(uri, required_columns=["key", "nope", "nada"])
    with pytest.raises(DatasetError, match="missing from the data: flag"):
        SCHEMA.conform(pa.table({"key": ["a"], "values": [[1]]}))
    with pytest.raises(DatasetError, match="holds schema 'test.rows'"):
        DatasetWriter(uri, VersionedSchema("other.rows", 1, SCHEMA.arrow)).finished_shards()
    check_columns(pa.table({"a": [1]}), ["a"], "stage")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_record"])
def test_corrupt_or_truncated_shard_is_detected(tmp_path, damage):
    uri = str(tmp_path / "ds")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(["a", "b", "c"]))
    writer.write_shard("s1", _table(["d"]))
    writer.commit()
    shard = Path(uri) / "shards" / "s0.parquet"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        (Path(uri) / "shards" / "s0.json").unlink()
    if damage != "delete_record":
        with pytest.raises(DatasetError, match="s0: (size|checksum)"):
            read_dataset(uri)
    assert sorted(writer.finished_shards()) == ["s1"]  # s0 must be redone


def test_reader_rejects_row_count_mismatch(tmp_path):
    uri = str(tmp_path / "ds")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(["a", "b"]))
    writer.commit()
    manifest_path = Path(uri) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["rows"] = 5
    manifest["num_rows"] = 5
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="has 2 rows, manifest says 5"):
        read_dataset(uri)


def test_empty_dataset_keeps_schema(tmp_path):
    uri = str(tmp_path / "ds")
    DatasetWriter(uri, SCHEMA).commit()
    table = read_dataset(uri, required_columns=["key"])
    assert table.num_rows == 0 and table.column_names == SCHEMA.column_names


def test_s3_dataset_roundtrip(s3_bucket):
    uri = join_uri(s3_bucket, "runs/r1/data")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(["a", "b"]))
    writer.write_shard("s1", _table(["c"]))
    assert sorted(writer.finished_shards()) == ["s0", "s1"]
    writer.commit({"where": "s3"})
    assert read_manifest(uri, SCHEMA)["meta"] == {"where": "s3"}
    assert sorted(read_dataset(uri, schema=SCHEMA).column("key").to_pylist()) == ["a", "b", "c"]
    # Corrupt an object in place on the server: the reader must refuse it.
    write_bytes_atomic(join_uri(uri, "shards/s1.parquet"), b"PAR1garbagePAR1")
    with pytest.raises(DatasetError, match="s1: size"):
        read_dataset(uri)


def test_dirs_roundtrip_s3_and_cache(s3_bucket, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    uri = join_uri(s3_bucket, "ckpts/m1")
    marker = upload_dir(src, uri)
    assert marker["files"] == {"config.json": 8, "sub/weights.bin": 1000}
    local = download_dir(uri, cache_dir=tmp_path / "cache")
    assert (local / "sub" / "weights.bin").read_bytes() == b"\x00" * 1000
    assert download_dir(uri, cache_dir=tmp_path / "cache") == local  # cached
    (src / "config.json").write_text('{"a": 2}')
    upload_dir(src, uri)
    assert json.loads((download_dir(uri, cache_dir=tmp_path / "cache") / "config.json").read_text()) == {"a": 2}
    assert download_dir(f"file://{src}") == src


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delete_tree_removes_a_directory_and_only_it(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    for name in ("run/round1/train/checkpoint-1/model.bin", "run/round1/train/metrics.jsonl", "run/keep.json"):
        write_bytes_atomic(join_uri(root, name), b"x")
    delete_tree(join_uri(root, "run/round1/train"))
    assert not exists(join_uri(root, "run/round1/train/metrics.jsonl"))
    assert read_bytes(join_uri(root, "run/keep.json")) == b"x"
    delete_tree(join_uri(root, "run/nothing-here"))  # absent is fine

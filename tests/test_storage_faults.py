"""Storage faults: an S3 that throttles, errs, drops connections and stalls (tests/faulty_s3.py in front of
moto), an S3 that is gone, and a local disk that fills up mid-write."""

from __future__ import annotations

import errno
import json
import os
import time

import pyarrow as pa
import pytest
from faulty_s3 import FaultyS3Proxy
from test_trajectories import PROMPT_TEXTS, build_tiny_checkpoint

import jf_ray.storage.io as storage_io
from jf_ray.errors import UserInputError
from jf_ray.prompts import read_prompts
from jf_ray.storage import (
    DatasetError,
    DatasetWriter,
    StorageUnavailable,
    StorageWriteError,
    VersionedSchema,
    check_writable,
    fs_and_path,
    join_uri,
    read_bytes,
    read_dataset,
    read_manifest,
    retry_count,
    write_bytes_atomic,
    write_json_atomic,
)
from jf_ray.storage.dataset import _read_verified_shard
from jf_ray.trajectories import TRAJECTORY_SCHEMA, CollectConfig, collect
from jf_ray.trajectories.collect import verify_exactly_once
from jf_ray.trajectories.ray_pool import CollectionFailed

SCHEMA = VersionedSchema("faults_test", 1, pa.schema([("id", pa.int64()), ("text", pa.string())]))
ERROR_KINDS = ("slowdown", "internal", "reset", "truncate")


@pytest.fixture
def faulty_s3(s3_bucket, moto_s3_endpoint, monkeypatch):
    """(proxy, bucket URI): the environment points every S3 client at a fault-free proxy in front of moto;
    tests set its ``fault_rate``/``kinds``/``down``. Retries back off 20 ms (doubling) to keep tests short."""
    proxy = FaultyS3Proxy(moto_s3_endpoint, seed=7, latency_s=0.2).start()
    monkeypatch.setenv("JF_S3_ENDPOINT", proxy.endpoint)
    monkeypatch.setenv("JF_STORAGE_RETRY_BASE_S", "0.02")
    yield proxy, s3_bucket
    proxy.stop()


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"id": list(range(offset, offset + n)), "text": [f"row {i} " * 50 for i in range(n)]})


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_each_injected_fault_reaches_the_client_as_an_error(faulty_s3, kind):
    """The proxy works: with retries off, every kind fails the request; a cut body is an error, not data."""
    proxy, bucket = faulty_s3
    uri = join_uri(bucket, "one")
    write_bytes_atomic(uri, os.urandom(50_000))
    fs, path = fs_and_path(uri, sdk_retries=False)
    proxy.kinds, proxy.fault_rate = (kind,), 1.0
    with pytest.raises(
        OSError,
        match=r"AWS Error (SERVICE_UNAVAILABLE|INTERNAL_FAILURE|NETWORK_CONNECTION|UNKNOWN \(HTTP status 50[03]\))",
    ):
        with fs.open_input_stream(path) as stream:
            stream.read()
    assert proxy.injected[kind] >= 1


@pytest.mark.parametrize(
    ("kinds", "every_error_retried"),
    [(("slowdown", "internal", "latency"), True), (("reset", "truncate", "latency"), False)],
)
def test_objects_survive_faults_and_retries_are_counted(faulty_s3, kinds, every_error_retried):
    proxy, bucket = faulty_s3
    blobs = {join_uri(bucket, f"objs/{i}"): os.urandom(20_000 + i) for i in range(12)}
    proxy.kinds, proxy.fault_rate = kinds, 0.15
    before = retry_count()
    for uri, data in blobs.items():
        write_bytes_atomic(uri, data)
    assert all(read_bytes(uri) == data for uri, data in blobs.items())
    errors = sum(proxy.injected[k] for k in ERROR_KINDS)
    retries = retry_count() - before
    assert errors > 0 and proxy.injected["latency"] > 0
    # Without SDK retries an error answer fails one attempt, retried once and counted. A connection dropped
    # before any byte of the answer may instead be resent by curl on a fresh connection, uncounted.
    assert retries == errors if every_error_retried else 0 < retries <= errors


def test_a_dataset_read_through_cut_or_corrupted_transfers_is_never_short_or_wrong(faulty_s3):
    proxy, bucket = faulty_s3
    uri = join_uri(bucket, "ds")
    writer = DatasetWriter(uri, SCHEMA)
    for i in range(3):
        writer.write_shard(f"s{i}", _table(40, offset=40 * i))
    writer.commit()
    expected = read_dataset(uri, schema=SCHEMA)
    proxy.kinds, proxy.fault_rate = ("reset", "truncate"), 0.5
    assert read_dataset(uri, schema=SCHEMA).equals(expected)  # cut bodies were retried, never accepted
    proxy.fault_rate = 1.0
    with pytest.raises(StorageUnavailable, match=f"(stat|read) {uri}/.* failed 6 times"):
        read_dataset(uri, schema=SCHEMA)  # every body cut: an error, not a short table
    proxy.kinds, proxy.fault_rate = ("corrupt",), 1.0  # a flipped byte, length intact: only checks can tell
    with pytest.raises(UserInputError, match="manifest.json is not valid JSON"):
        read_dataset(uri, schema=SCHEMA)
    proxy.fault_rate = 0.0
    manifest = read_manifest(uri, SCHEMA)
    proxy.fault_rate = 1.0
    with pytest.raises(DatasetError, match="shard s0: checksum mismatch"):
        _read_verified_shard(uri, manifest["shards"][0], manifest["schema"], None)  # the reader, manifest in hand


def test_a_short_read_the_transport_missed_is_caught(monkeypatch):
    """Our own size check, for a store or gateway that ends a body early without an error."""

    class Handle:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def size(self):
            return 10

        def read(self):
            return b"12345"

    class FS:
        def open_input_file(self, path):
            return Handle()

    monkeypatch.setenv("JF_STORAGE_ATTEMPTS", "2")
    monkeypatch.setenv("JF_STORAGE_RETRY_BASE_S", "0.01")
    monkeypatch.setattr(storage_io, "_remote", lambda uri: (FS(), "b/k"))
    with pytest.raises(StorageUnavailable, match="read s3://b/k failed 2 times .*read 5 of its 10 bytes"):
        read_bytes("s3://b/k")


def test_storage_gone_fails_fast_naming_the_location(faulty_s3):
    proxy, bucket = faulty_s3
    uri = join_uri(bucket, "gone/x.json")
    proxy.down = True
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match=f"write {uri} failed 6 times .*JF_S3_ENDPOINT"):
        write_json_atomic(uri, {"a": 1})
    assert time.monotonic() - start < 10  # bounded: 6 attempts, 20 ms doubling
    assert proxy.injected["down"] >= 6
    out = join_uri(bucket, "run")
    with pytest.raises(UserInputError, match=f"cannot write --out {out}: storage unavailable: write {out}/"):
        check_writable(out, "--out")  # the entry points' check, before any work


# --- collection under faults (Ray) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def _collect_config(checkpoint, prompts: str, out: str, **overrides) -> CollectConfig:
    values = dict(
        model=str(checkpoint),
        prompts=prompts,
        out=out,
        block_size=4,
        max_new_tokens=8,
        workers=2,
        batch_size=2,
        shard_size=2,
        progress=False,
    )
    return CollectConfig(**{**values, **overrides})


def _write_prompts(bucket: str, n: int) -> str:
    uri = join_uri(bucket, "in/prompts.jsonl")
    lines = [json.dumps({"prompt": f"{PROMPT_TEXTS[i % len(PROMPT_TEXTS)]} #{i}", "id": f"p{i}"}) for i in range(n)]
    write_bytes_atomic(uri, ("\n".join(lines) + "\n").encode())
    return uri


def test_collection_to_s3_survives_faulted_requests(ray_session, faulty_s3, checkpoint):
    proxy, bucket = faulty_s3
    prompts = _write_prompts(bucket, 8)
    out = join_uri(bucket, "runs/faulty/trajectories")
    # Seeded: the n-th request the proxy sees draws the same fault in every run (~70 requests: 4 errors, 3 delays);
    # only which request gets it depends on timing.
    proxy.fault_rate = 0.08
    summary = collect(_collect_config(checkpoint, prompts, out))
    errors = sum(proxy.injected[k] for k in ERROR_KINDS)
    print(f"injected {dict(proxy.injected)} of {proxy.forwarded} forwarded; retries {summary['storage_retries']}")
    assert errors > 0
    assert 0 < summary["storage_retries"] <= errors  # the driver's and the actors' retries, all counted
    assert summary["retries"] == []  # survived inside storage calls: no shard had to be redone
    proxy.fault_rate = 0.0
    assert verify_exactly_once(out, read_prompts(prompts)) == summary["rows"]
    assert read_dataset(out, schema=TRAJECTORY_SCHEMA).num_rows == summary["rows"]


def test_collection_when_storage_goes_away_fails_clearly_then_resumes(ray_session, faulty_s3, checkpoint):
    proxy, bucket = faulty_s3
    prompts = _write_prompts(bucket, 8)
    out = join_uri(bucket, "runs/gone/trajectories")
    config = _collect_config(checkpoint, prompts, out, workers=1, max_shard_attempts=2)

    def storage_dies(report: dict) -> None:
        proxy.down = True  # after the first shard is written

    start = time.monotonic()
    with pytest.raises(CollectionFailed, match=f"storage unavailable: .* {out}/shards/"):
        collect(config, on_shard_done=storage_dies)
    assert time.monotonic() - start < 60
    proxy.down = False
    summary = collect(config)
    assert summary["shards_skipped"] >= 1 and summary["shards_run"] == 4 - summary["shards_skipped"]
    assert verify_exactly_once(out, read_prompts(prompts)) == summary["rows"]


# --- a full local disk ---------------------------------------------------------------------------------


def _disk_fills_after(monkeypatch, nbytes: int) -> None:
    """Local writes in jf_ray.storage.io fail with ENOSPC once ``nbytes`` of a file are written."""
    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.handle = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, data):
            self.handle.write(data[:nbytes])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(storage_io, "open", FullDisk, raising=False)


def test_a_full_disk_leaves_the_previous_shards_and_manifest_intact(tmp_path, monkeypatch):
    uri = str(tmp_path / "ds")
    writer = DatasetWriter(uri, SCHEMA)
    writer.write_shard("s0", _table(30))
    writer.write_shard("s1", _table(30, offset=30))
    writer.commit()
    manifest_before = (tmp_path / "ds" / "manifest.json").read_bytes()
    _disk_fills_after(monkeypatch, 100)
    with pytest.raises(StorageWriteError, match="manifest.json: No space left on device.*keeps its previous"):
        write_json_atomic(join_uri(uri, "manifest.json"), {"broken": True})
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == manifest_before
    with pytest.raises(StorageWriteError, match="s2.parquet: No space left on device.*s2.parquet was not created"):
        DatasetWriter(uri, SCHEMA).write_shard("s2", _table(30, offset=60))
    monkeypatch.undo()
    assert sorted(DatasetWriter(uri, SCHEMA).finished_shards(verify=True)) == ["s0", "s1"]
    leftovers = [p.name for p in (tmp_path / "ds").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []

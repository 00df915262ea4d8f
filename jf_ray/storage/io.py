"""Atomic whole-object reads and writes through ``pyarrow.fs``.

Atomicity: on a local filesystem the data goes to a hidden temporary file in the target directory and is
renamed over the target (``rename`` is atomic on POSIX). On an object store the data is serialised in
memory first and sent as one object: S3 publishes an object only when its PUT (or multipart completion)
succeeds, so a reader sees the old object or the whole new one, never a prefix. A writer killed mid-way
leaves at most an orphan temporary file (local) or an incomplete multipart upload (S3), both invisible.

Faults: on an object store every operation here is retried as a whole after a transient error (throttling,
server errors, dropped connections, a read shorter than the object), bounded and counted
(:mod:`jf_ray.storage.retry`). A local write that fails (a full disk) removes its temporary file and raises
:class:`StorageWriteError`, which says that the previous file is unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jf_ray.errors import UserInputError
from jf_ray.storage.retry import ShortRead, retrying
from jf_ray.storage.uri import fs_and_path, is_local

TMP_PREFIX = ".tmp-"


class StorageWriteError(UserInputError):
    """A local write failed (disk full, quota, I/O error); the target keeps its previous contents."""


def _remote(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem without SDK retries: the operations here retry (and count) whole operations."""
    return fs_and_path(uri, sdk_retries=False)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    if is_local(uri):
        _write_local_atomic(uri, fs_and_path(uri)[1], data)
        return
    fs, path = _remote(uri)

    def put() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    retrying("write", uri, put)


def _write_local_atomic(uri: str, path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageWriteError(_local_write_failure(uri, path, exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _local_write_failure(uri: str, path: str, exc: OSError) -> str:
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause += " (free space on that disk, or write elsewhere)"
    before = "keeps its previous contents" if os.path.exists(path) else "was not created"
    return f"cannot write {uri}: {cause}; nothing was replaced: {os.path.basename(path)} {before}"


def read_bytes(uri: str) -> bytes:
    if is_local(uri):
        return _read_whole(uri, *fs_and_path(uri))
    return retrying("read", uri, lambda: _read_whole(uri, *_remote(uri)))


def _read_whole(uri: str, fs: pafs.FileSystem, path: str) -> bytes:
    """The whole object, checked against the size the store reports (a cut connection is no short read)."""
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            data = handle.read()
    except FileNotFoundError:
        raise UserInputError(f"not found: {uri}") from None
    if len(data) != size:
        raise ShortRead(f"{uri}: read {len(data)} of its {size} bytes")
    return data


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise UserInputError(f"{uri} is not valid JSON: {exc}") from None


def table_to_parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def parquet_bytes_to_table(data: bytes, columns: Sequence[str] | None = None, source: str = "") -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{source or 'data'} is not a readable Parquet file: {exc}") from None


def write_table_atomic(uri: str, table: pa.Table) -> None:
    write_bytes_atomic(uri, table_to_parquet_bytes(table))


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    return parquet_bytes_to_table(read_bytes(uri), columns, source=uri)


def _local_or_retrying(operation: str, uri: str, func):
    """``func(fs, path)`` once on a local filesystem, retried as a whole on an object store."""
    if is_local(uri):
        return func(*fs_and_path(uri))
    return retrying(operation, uri, lambda: func(*_remote(uri)))


def delete_file(uri: str, missing_ok: bool = True) -> None:
    def delete(fs: pafs.FileSystem, path: str) -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    _local_or_retrying("delete", uri, delete)


def delete_tree(uri: str) -> None:
    """Remove a directory (or object prefix) and everything under it; nothing there is fine."""

    def delete(fs: pafs.FileSystem, path: str) -> None:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    _local_or_retrying("delete", uri, delete)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Base names of the files directly under ``uri`` ending in ``suffix`` (temporaries skipped), sorted."""

    def listing(fs: pafs.FileSystem, path: str) -> list:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))

    infos = _local_or_retrying("list", uri, listing)
    names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith(TMP_PREFIX))

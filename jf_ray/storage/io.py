"""Atomic whole-object reads and writes through ``pyarrow.fs``.

Atomicity: on a local filesystem the data goes to a hidden temporary file in the target directory and is
renamed over the target (``rename`` is atomic on POSIX). On an object store the data is serialised in
memory first and sent as one object: S3 publishes an object only when its PUT (or multipart completion)
succeeds, so a reader sees the old object or the whole new one, never a prefix. A writer killed mid-way
leaves at most an orphan temporary file (local) or an incomplete multipart upload (S3), both invisible.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jf_ray.errors import UserInputError
from jf_ray.storage.uri import fs_and_path, is_local

TMP_PREFIX = ".tmp-"


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = fs_and_path(uri)
    if is_local(uri):
        _write_local_atomic(fs, path, data)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def _write_local_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, name = os.path.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise UserInputError(f"not found: {uri}") from None


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
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


def delete_file(uri: str, missing_ok: bool = True) -> None:
    fs, path = fs_and_path(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def delete_tree(uri: str) -> None:
    """Remove a directory (or object prefix) and everything under it; nothing there is fine."""
    fs, path = fs_and_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Base names of the files directly under ``uri`` ending in ``suffix`` (temporaries skipped), sorted."""
    fs, path = fs_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith(TMP_PREFIX))

"""Versioned Parquet datasets: atomic shards, a manifest committed last, a reader that trusts nothing.

Layout of a dataset at ``URI``::

    URI/shards/<name>.parquet   one shard, written atomically
    URI/shards/<name>.json      its record (rows, sha256, bytes, schema), written after the shard
    URI/manifest.json           the committed list of shards, written last; absent = not committed

A shard counts as finished only when its record exists and (for resume) its bytes still hash to the
recorded sha256, so a shard cut short or corrupted is redone rather than read. The reader checks the
manifest's schema name and version, each shard's size, checksum, row count and embedded schema tags.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from jf_ray.errors import UserInputError
from jf_ray.storage.io import (
    delete_file,
    list_files,
    parquet_bytes_to_table,
    read_bytes,
    read_json,
    table_to_parquet_bytes,
    write_bytes_atomic,
    write_json_atomic,
)
from jf_ray.storage.retry import StorageUnavailable
from jf_ray.storage.uri import exists, fs_and_path, join_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = "jf_ray.dataset"
FORMAT_VERSION = 1
_SCHEMA_NAME_KEY = b"jf_ray.schema.name"
_SCHEMA_VERSION_KEY = b"jf_ray.schema.version"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class DatasetError(UserInputError):
    """A dataset is missing, uncommitted, corrupt, or does not have the schema/columns a stage needs."""


@dataclass(frozen=True)
class VersionedSchema:
    """A named Arrow schema with an integer version; bump the version on any incompatible change."""

    name: str
    version: int
    arrow: pa.Schema

    @property
    def column_names(self) -> list[str]:
        return list(self.arrow.names)

    def tagged_arrow(self) -> pa.Schema:
        """The Arrow schema carrying name/version in its metadata (stored inside every Parquet shard)."""
        tags = {_SCHEMA_NAME_KEY: self.name.encode(), _SCHEMA_VERSION_KEY: str(self.version).encode()}
        return self.arrow.with_metadata(tags)

    def conform(self, table: pa.Table) -> pa.Table:
        """Select this schema's columns in order and cast to its types; error naming missing columns."""
        check_columns(table, self.column_names, f"schema {self.name} v{self.version}")
        try:
            return table.select(self.column_names).cast(self.tagged_arrow())
        except (ValueError, TypeError, pa.ArrowNotImplementedError) as exc:  # Arrow errors subclass these
            raise DatasetError(f"table does not fit schema {self.name} v{self.version}: {exc}") from None

    def empty_table(self) -> pa.Table:
        return self.tagged_arrow().empty_table()


def check_columns(table: pa.Table | pa.Schema, required: Iterable[str], stage_name: str) -> None:
    """Fail fast, naming every column ``stage_name`` needs that ``table`` lacks."""
    names = set(table.names if isinstance(table, pa.Schema) else table.column_names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DatasetError(
            f"{stage_name} needs columns missing from the data: {', '.join(missing)} (has: {', '.join(sorted(names))})"
        )


def _check_shard_name(name: str) -> None:
    if not _SHARD_NAME.match(name):
        raise UserInputError(f"invalid shard name {name!r}: use letters, digits, '.', '_' or '-'")


class DatasetWriter:
    """Writes shards of one dataset, possibly from many processes (each shard has a unique name).

    Picklable: holds only the URI and the schema, so Ray actors can each build or receive one.
    """

    def __init__(self, dataset_uri: str, schema: VersionedSchema):
        self.dataset_uri = dataset_uri
        self.schema = schema
        self._manifest_cleared = False

    def shard_uri(self, name: str) -> str:
        return join_uri(self.dataset_uri, SHARDS_DIR, f"{name}.parquet")

    def record_uri(self, name: str) -> str:
        return join_uri(self.dataset_uri, SHARDS_DIR, f"{name}.json")

    def write_shard(self, name: str, table: pa.Table) -> dict[str, Any]:
        """Write one shard atomically, then its record (rows + sha256). Rewriting a name replaces it."""
        _check_shard_name(name)
        self._clear_manifest()
        data = table_to_parquet_bytes(self.schema.conform(table))
        record = {
            "name": name,
            "file": f"{SHARDS_DIR}/{name}.parquet",
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "schema": {"name": self.schema.name, "version": self.schema.version},
            "written_at": time.time(),
        }
        # Record last: a shard without a record is unfinished, so a crash in between means "redo".
        delete_file(self.record_uri(name))
        write_bytes_atomic(self.shard_uri(name), data)
        write_json_atomic(self.record_uri(name), record)
        return record

    def _clear_manifest(self) -> None:
        # Changing shards un-commits the dataset; readers must not see a manifest that no longer matches.
        if not self._manifest_cleared:
            delete_file(join_uri(self.dataset_uri, MANIFEST))
            self._manifest_cleared = True

    def reset(self) -> None:
        """Remove the manifest and every shard (start the dataset over)."""
        delete_file(join_uri(self.dataset_uri, MANIFEST))
        fs, path = fs_and_path(join_uri(self.dataset_uri, SHARDS_DIR))
        fs.delete_dir_contents(path, missing_dir_ok=True)

    def finished_shards(self, verify: bool = True) -> dict[str, dict[str, Any]]:
        """Shards whose record exists, has this schema, and (``verify``) whose bytes match the checksum."""
        finished: dict[str, dict[str, Any]] = {}
        for file_name in list_files(join_uri(self.dataset_uri, SHARDS_DIR), suffix=".json"):
            name = file_name[: -len(".json")]
            record = self._load_record(name)
            if record is None:
                continue
            if verify:
                problem = _shard_problem(self.dataset_uri, record)
                if problem:
                    logger.warning("shard %s will be redone: %s", name, problem)
                    continue
            finished[name] = record
        return finished

    def _load_record(self, name: str) -> dict[str, Any] | None:
        try:
            record = read_json(self.record_uri(name))
        except StorageUnavailable:
            raise
        except UserInputError as exc:
            logger.warning("shard %s will be redone: unreadable record (%s)", name, exc)
            return None
        schema = record.get("schema", {}) if isinstance(record, dict) else {}
        if schema.get("name") != self.schema.name:
            raise DatasetError(
                f"{self.dataset_uri} holds schema {schema.get('name')!r}, not {self.schema.name!r}; "
                "choose another output location"
            )
        if schema.get("version") != self.schema.version or record.get("name") != name:
            logger.warning("shard %s will be redone: written with schema version %s", name, schema.get("version"))
            return None
        return record

    def commit(self, extra_meta: dict[str, Any] | None = None, expected_shards: Sequence[str] | None = None) -> dict:
        """Write ``manifest.json`` listing the finished shards (exactly ``expected_shards`` when given)."""
        records = self.finished_shards(verify=False)
        if expected_shards is not None:
            missing = sorted(set(expected_shards) - set(records))
            if missing:
                raise DatasetError(f"cannot commit {self.dataset_uri}: unfinished shards {', '.join(missing[:10])}")
            stale = sorted(set(records) - set(expected_shards))
            if stale:
                logger.warning("leaving %d stale shards out of the manifest: %s", len(stale), stale[:5])
            records = {name: records[name] for name in expected_shards}
        shards = [{k: r[k] for k in ("name", "file", "rows", "bytes", "sha256")} for _, r in sorted(records.items())]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "schema": {"name": self.schema.name, "version": self.schema.version},
            "arrow_schema": base64.b64encode(self.schema.tagged_arrow().serialize().to_pybytes()).decode(),
            "shards": shards,
            "num_rows": sum(s["rows"] for s in shards),
            "meta": extra_meta or {},
            "committed_at": time.time(),
        }
        write_json_atomic(join_uri(self.dataset_uri, MANIFEST), manifest)
        self._manifest_cleared = False
        logger.info("committed %s: %d shards, %d rows", self.dataset_uri, len(shards), manifest["num_rows"])
        return manifest


def _shard_problem(dataset_uri: str, record: dict[str, Any]) -> str | None:
    """Why a shard's bytes do not match its record, or None when they do."""
    return _fetch_shard(dataset_uri, record)[1]


def _fetch_shard(dataset_uri: str, record: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """(the shard's bytes, None) when they match its record's size and checksum, else (None, why not).
    One read: the bytes checked are the bytes used."""
    try:
        data = read_bytes(join_uri(dataset_uri, record["file"]))
    except StorageUnavailable:
        raise  # the store, not the shard, is at fault: redoing the shard would not help
    except UserInputError:
        return None, "shard file missing"
    if len(data) != record["bytes"]:
        return None, f"size {len(data)} != recorded {record['bytes']} (truncated?)"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return None, "checksum mismatch (corrupt)"
    return data, None


def read_manifest(dataset_uri: str, schema: VersionedSchema | None = None) -> dict[str, Any]:
    """The committed manifest; checks format, and schema name + version when ``schema`` is given."""
    manifest_uri = join_uri(dataset_uri, MANIFEST)
    if not exists(manifest_uri):
        raise DatasetError(f"no committed dataset at {dataset_uri} (manifest.json missing: unfinished run?)")
    manifest = read_json(manifest_uri)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{manifest_uri} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{manifest_uri}: manifest format {manifest.get('format_version')} != {FORMAT_VERSION}")
    found = manifest.get("schema", {})
    if schema is not None and (found.get("name"), found.get("version")) != (schema.name, schema.version):
        raise DatasetError(
            f"{dataset_uri} has schema {found.get('name')} v{found.get('version')}, "
            f"expected {schema.name} v{schema.version}"
        )
    return manifest


def iter_dataset(
    dataset_uri: str,
    required_columns: Sequence[str] | None = None,
    schema: VersionedSchema | None = None,
    columns: Sequence[str] | None = None,
) -> Iterator[pa.Table]:
    """Yield each shard as a table, fully validated before it is yielded."""
    manifest = read_manifest(dataset_uri, schema)
    arrow_schema = _manifest_arrow_schema(manifest)
    stage = f"reader of {dataset_uri}"
    check_columns(arrow_schema, list(required_columns or []) + list(columns or []), stage)
    if sum(s["rows"] for s in manifest["shards"]) != manifest.get("num_rows"):
        raise DatasetError(f"{dataset_uri}: manifest row count does not add up")
    for shard in manifest["shards"]:
        yield _read_verified_shard(dataset_uri, shard, manifest["schema"], columns)


def _read_verified_shard(dataset_uri: str, shard: dict, schema_tag: dict, columns) -> pa.Table:
    data, problem = _fetch_shard(dataset_uri, shard)
    if problem:
        raise DatasetError(f"{dataset_uri}: shard {shard['name']}: {problem}")
    table = parquet_bytes_to_table(data, columns, source=f"shard {shard['name']}")
    if table.num_rows != shard["rows"]:
        raise DatasetError(
            f"{dataset_uri}: shard {shard['name']} has {table.num_rows} rows, manifest says {shard['rows']}"
        )
    meta = table.schema.metadata or {}
    tag = (meta.get(_SCHEMA_NAME_KEY, b"").decode(), meta.get(_SCHEMA_VERSION_KEY, b"").decode())
    if tag != (schema_tag["name"], str(schema_tag["version"])):
        raise DatasetError(f"{dataset_uri}: shard {shard['name']} is tagged {tag}, manifest says {schema_tag}")
    return table


def _manifest_arrow_schema(manifest: dict) -> pa.Schema:
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["arrow_schema"])))
    except (KeyError, ValueError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"manifest has no readable arrow_schema: {exc}") from None


def read_dataset_rows(
    dataset_uri: str,
    start: int,
    stop: int,
    schema: VersionedSchema | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows ``start:stop`` of the dataset in manifest order, reading (and verifying) only the shards that
    hold them: a reader that needs a slice never downloads the rest."""
    manifest = read_manifest(dataset_uri, schema)
    check_columns(_manifest_arrow_schema(manifest), list(columns or []), f"reader of {dataset_uri}")
    if not 0 <= start <= stop <= manifest["num_rows"]:
        raise DatasetError(f"{dataset_uri}: rows {start}:{stop} outside its {manifest['num_rows']} rows")
    tables, first = [], 0
    for shard in manifest["shards"]:
        end = first + shard["rows"]
        if first < stop and start < end:
            table = _read_verified_shard(dataset_uri, shard, manifest["schema"], columns)
            tables.append(table.slice(max(start - first, 0), min(stop, end) - max(start, first)))
        first = end
    if not tables:
        empty = _manifest_arrow_schema(manifest).empty_table()
        return empty.select(list(columns)) if columns else empty
    return pa.concat_tables(tables)


def read_dataset(
    dataset_uri: str,
    required_columns: Sequence[str] | None = None,
    schema: VersionedSchema | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """All validated shards concatenated (an empty table with the stored schema when there are none)."""
    tables = list(iter_dataset(dataset_uri, required_columns, schema, columns))
    if not tables:
        empty = _manifest_arrow_schema(read_manifest(dataset_uri)).empty_table()
        return empty.select(list(columns)) if columns else empty
    return pa.concat_tables(tables)

"""Ray Data job of the packing stage: trajectory shards -> packed sequences -> versioned Parquet shards.

Pipeline: read the shards listed in the committed trajectory manifest (``read_parquet`` over
``pyarrow.fs``), group rows by ``prompt_id`` (a response's blocks may sit in different shards), pack each
response with the plain functions of :mod:`jf_ray.packing.pack`, then write shards of ``rows_per_shard``
sequences through :class:`jf_ray.storage.DatasetWriter` (atomic shard + record) and commit the manifest
last, listing exactly the shards of this run. Skipped responses are counted per reason, never dropped
silently.
"""

from __future__ import annotations

import hashlib
import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from jf_ray.errors import UserInputError
from jf_ray.packing.config import PackConfig
from jf_ray.packing.pack import PackOptions, pack_rows, packed_to_table
from jf_ray.packing.schema import PACKED_ARROW_SCHEMA, PACKED_SCHEMA

logger = logging.getLogger(__name__)

SKIP_COLUMN = "skip_reason"  # "" for a packed row; the reason for a placeholder row of a skipped response
STAT_COLUMNS = ("rows", "blocks", "tokens", "truncated", "malformed", "too_long")


def options_of(config: PackConfig) -> PackOptions:
    return PackOptions(
        window=config.window,
        strategy=config.strategy,
        seed=config.seed,
        max_tokens=config.max_tokens,
        random_phase=config.random_phase,
    )


def pack_group(group: pa.Table, options: PackOptions) -> pa.Table:
    """All trajectory rows of one response -> one packed row, or one placeholder row naming the skip."""
    packed, stats = pack_rows(group.to_pylist(), options)
    table = packed_to_table(packed).append_column(SKIP_COLUMN, pa.array([""] * len(packed), pa.string()))
    skipped = [reason for reason, count in stats.skipped.items() for _ in range(count)]
    if not skipped:
        return table
    placeholder = {name: [] for name in PACKED_ARROW_SCHEMA.names}
    for _ in skipped:
        for field in PACKED_ARROW_SCHEMA:
            placeholder[field.name].append(_empty_value(field.type))
    placeholder[SKIP_COLUMN] = skipped
    schema = PACKED_ARROW_SCHEMA.append(pa.field(SKIP_COLUMN, pa.string()))
    return pa.concat_tables([table, pa.Table.from_pydict(placeholder, schema=schema)])


def _empty_value(arrow_type: pa.DataType):
    if pa.types.is_list(arrow_type):
        return []
    if pa.types.is_string(arrow_type):
        return ""
    if pa.types.is_boolean(arrow_type):
        return False
    return 0


def write_shard_batch(batch: pa.Table, out: str) -> pa.Table:
    """Ray Data UDF: write the packed rows of a batch as one shard; return one row of counts."""
    from jf_ray.storage import DatasetWriter

    reasons = batch.column(SKIP_COLUMN)
    rows = batch.filter(pc.equal(reasons, "")).drop_columns([SKIP_COLUMN])
    name = ""
    if rows.num_rows:
        # Named by content, so a re-run that forms the same batch rewrites the same shard.
        digest = hashlib.sha256("\n".join(sorted(rows.column("prompt_id").to_pylist())).encode())
        name = f"part-{digest.hexdigest()[:16]}"
        DatasetWriter(out, PACKED_SCHEMA).write_shard(name, rows)
    counts = {
        "rows": rows.num_rows,
        "blocks": _total(pc.list_value_length(rows.column("clean_blocks"))),
        "tokens": _total(rows.column("num_tokens")),
        "truncated": _total(rows.column("truncated")),
        "malformed": _total(pc.equal(reasons, "malformed")),
        "too_long": _total(pc.equal(reasons, "too_long")),
    }
    return pa.Table.from_pydict({"shard": [name], **{key: [value] for key, value in counts.items()}})


def _total(values) -> int:
    return int(pc.sum(values.cast(pa.int64())).as_py() or 0)


def pack(config: PackConfig) -> dict:
    """Run the packing job on the Ray cluster this process has joined (docs/cluster.md); returns a summary dict."""
    import ray.data

    from jf_ray.storage import DatasetWriter, fs_and_path, join_uri, read_manifest
    from jf_ray.trajectories.schema import TRAJECTORY_COLUMNS, TRAJECTORY_SCHEMA

    started = time.perf_counter()
    manifest = read_manifest(config.trajectories, TRAJECTORY_SCHEMA)
    if not manifest["shards"]:
        raise UserInputError(f"trajectory dataset {config.trajectories} has no shards")
    filesystem, _ = fs_and_path(config.trajectories)
    files = [fs_and_path(join_uri(config.trajectories, shard["file"]))[1] for shard in manifest["shards"]]
    trajectories = ray.data.read_parquet(files, filesystem=filesystem).select_columns(TRAJECTORY_COLUMNS)
    # One hash partition per input shard keeps the shuffle proportional to the data, not Ray's default 200.
    packed = trajectories.groupby("prompt_id", num_partitions=len(files)).map_groups(
        pack_group, batch_format="pyarrow", fn_kwargs={"options": options_of(config)}
    )
    results = packed.map_batches(
        write_shard_batch,
        batch_size=config.rows_per_shard,
        batch_format="pyarrow",
        fn_kwargs={"out": config.out},
    ).take_all()
    shards = sorted({row["shard"] for row in results if row["shard"]})
    totals = {name: sum(int(row[name]) for row in results) for name in STAT_COLUMNS}
    summary = {
        "out": config.out,
        "shards": len(shards),
        "responses": totals["rows"] + totals["malformed"] + totals["too_long"],
        "packed": totals["rows"],
        "blocks": totals["blocks"],
        "tokens": totals["tokens"],
        "truncated": totals["truncated"],
        "skipped": {"malformed": totals["malformed"], "too_long": totals["too_long"]},
        "trajectory_rows": manifest["num_rows"],
        "options": config.model_dump(mode="json", exclude={"out"}),
    }
    DatasetWriter(config.out, PACKED_SCHEMA).commit(extra_meta=summary, expected_shards=shards)
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    logger.info(
        "packed %d of %d responses into %d shards (%d tokens)",
        summary["packed"],
        summary["responses"],
        len(shards),
        summary["tokens"],
    )
    return summary

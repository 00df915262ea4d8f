"""Parquet contract of trajectory collection: schema "jf_ray.trajectories" v1, one row per Jacobi block.

``states[0]`` is the *true* initial draft of the block (verified head + context-sampled guesses); every
later state is the draft after one rejecting forward; ``states[-1] == fixed_point``. The official
JacobiForcing data differs here: its recorder aliases state 0 with the block accumulator, so its state 0 is
always the fixed point and its noisiest state has ratio <= (n-2)/n (docs/method-notes.md §2). Ours can reach
ratio (n-1)/n. A packer that wants to mimic the official data drops ``states[0]`` and prepends the fixed
point.

``prefix_ids`` is the prompt followed by every earlier block's fixed point, so ``prefix_ids[:prompt_len]``
is the prompt and blocks chain: ``prefix_ids(j+1) == prefix_ids(j) + fixed_point(j)``. The last block of a
response may be shorter than ``block_size`` (EOS or the token cap ended it); ``ends_with_eos`` is true only
on a last block whose fixed point ends in an EOS token.
"""

from __future__ import annotations

import pyarrow as pa

from jf_ray.storage import VersionedSchema

TRAJECTORY_SCHEMA_NAME = "jf_ray.trajectories"
TRAJECTORY_SCHEMA_VERSION = 1

_ids = pa.list_(pa.int32())

TRAJECTORY_ARROW_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("block_index", pa.int32(), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("prefix_ids", _ids, nullable=False),
        pa.field("states", pa.list_(_ids), nullable=False),
        pa.field("fixed_point", _ids, nullable=False),
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("ends_with_eos", pa.bool_(), nullable=False),
    ]
)

TRAJECTORY_SCHEMA = VersionedSchema(TRAJECTORY_SCHEMA_NAME, TRAJECTORY_SCHEMA_VERSION, TRAJECTORY_ARROW_SCHEMA)
TRAJECTORY_COLUMNS = list(TRAJECTORY_ARROW_SCHEMA.names)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with every schema column) -> a table of exactly the trajectory schema."""
    if not rows:
        return TRAJECTORY_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA.tagged_arrow())

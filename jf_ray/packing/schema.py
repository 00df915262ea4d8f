"""Parquet contracts of the packing stage: what it reads (trajectories) and what it writes (packed sequences).

Schema "jf_ray.packed" v1, one row per response. The packed training sequence is not stored flat: it is
``prompt_ids ++ (noisy_blocks[j] ++ clean_blocks[j]) for j in 0..N-1``, rebuilt by the trainer's collate
(``jf_ray.training.batches``), which also derives positions and the mask layout from these columns. Keeping
blocks separate keeps the block boundaries (the last block of a response may be shorter than n) explicit.
"""

from __future__ import annotations

import pyarrow as pa

from jf_ray.storage import VersionedSchema

PACKED_SCHEMA_NAME = "jf_ray.packed"
PACKED_SCHEMA_VERSION = 1

_ids = pa.list_(pa.int32())

PACKED_ARROW_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_ids", _ids, nullable=False),
        pa.field("noisy_blocks", pa.list_(_ids), nullable=False),
        pa.field("clean_blocks", pa.list_(_ids), nullable=False),
        pa.field("state_indices", _ids, nullable=False),  # which recorded state became each noisy block
        pa.field("target_ratios", pa.list_(pa.float32()), nullable=False),
        pa.field("noise_ratios", pa.list_(pa.float32()), nullable=False),  # achieved ratio of each noisy block
        pa.field("num_tokens", pa.int32(), nullable=False),  # packed length P + 2 * sum(block lengths)
        pa.field("block_size", pa.int32(), nullable=False),
        pa.field("window", pa.int32(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("ends_with_eos", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),  # blocks were dropped to fit max_tokens
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
    ]
)

PACKED_SCHEMA = VersionedSchema(PACKED_SCHEMA_NAME, PACKED_SCHEMA_VERSION, PACKED_ARROW_SCHEMA)

# Columns the trainer needs; the rest are provenance for analysis.
TRAIN_COLUMNS = ["prompt_id", "prompt_ids", "noisy_blocks", "clean_blocks", "num_tokens"]

# Columns of "jf_ray.trajectories" v1 (written by jf_ray.trajectories) that packing reads.
TRAJECTORY_COLUMNS = [
    "prompt_id",
    "block_index",
    "prompt_len",
    "prefix_ids",
    "states",
    "fixed_point",
    "block_size",
    "model_id",
    "round",
    "ends_with_eos",
]

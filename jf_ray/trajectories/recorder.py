"""Trajectory recorder (no Ray): greedy Jacobi decode of a batch of prompts -> validated rows of the schema.

The backend does the decoding (block by block, block size n, up to EOS or the token cap, every draft state
kept); this module checks each trajectory against the facts the training stage relies on before anything is
written: the fixed points concatenated are the response, every block's prefix is the prompt plus the earlier
fixed points, states have the block's length and end at the fixed point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from jf_ray.decoding.types import DecodeResult, DecodeStats
from jf_ray.prompts import Prompt
from jf_ray.trajectories.backend_base import GenerationBackend
from jf_ray.trajectories.schema import rows_to_table

logger = logging.getLogger(__name__)


class TrajectoryError(RuntimeError):
    """A backend returned a trajectory that contradicts its own output (a decoder bug, never user input)."""


@dataclass
class RecordedBatch:
    table: pa.Table
    stats: DecodeStats = field(default_factory=DecodeStats)
    generate_s: float = 0.0


def whole_block_cap(max_new_tokens: int, block_size: int) -> int:
    """Responses are cut at a block boundary, as in the official recorder: ``max_new_tokens`` rounded up to n."""
    return -(-max_new_tokens // block_size) * block_size


def trajectory_rows(
    prompt_id: str,
    prompt_ids: list[int],
    result: DecodeResult,
    *,
    block_size: int,
    model_id: str,
    round_index: int,
    eos_ids: Sequence[int],
    max_tokens: int | None = None,
) -> list[dict]:
    """One row per block of one response (cut to ``max_tokens``, a multiple of the block size).

    Raises :class:`TrajectoryError` when the trajectory contradicts the response.
    """
    if result.trajectory is None:
        raise TrajectoryError(f"{prompt_id}: backend returned no trajectory")
    check_coverage(result)
    tokens = list(result.token_ids[:max_tokens] if max_tokens is not None else result.token_ids)
    blocks = [b for b in result.trajectory if b.prefix_len - len(prompt_ids) < len(tokens)]
    prefix = list(prompt_ids)
    rows = []
    for index, block in enumerate(blocks):
        _check_block(prompt_id, index, block, prefix, block_size)
        rows.append(
            {
                "prompt_id": prompt_id,
                "block_index": index,
                "prompt_len": len(prompt_ids),
                "prefix_ids": list(prefix),
                "states": [list(s) for s in block.states],
                "fixed_point": list(block.fixed_point),
                "block_size": block_size,
                "model_id": model_id,
                "round": round_index,
                # Decoding stops at the first EOS, so an EOS at the very end is the one that ended it.
                "ends_with_eos": index == len(blocks) - 1 and block.fixed_point[-1] in eos_ids,
            }
        )
        prefix.extend(block.fixed_point)
    if prefix[len(prompt_ids) :] != tokens:
        raise TrajectoryError(f"{prompt_id}: block fixed points do not concatenate to the decoded response")
    return rows


def check_coverage(result: DecodeResult) -> None:
    covered = sum(len(b.fixed_point) for b in result.trajectory or [])
    if covered != len(result.token_ids):
        raise TrajectoryError(f"trajectory covers {covered} of {len(result.token_ids)} response tokens")


def _check_block(prompt_id: str, index: int, block, prefix: list[int], block_size: int) -> None:
    where = f"{prompt_id} block {index}"
    if block.block_index != index or block.prefix_len != len(prefix):
        raise TrajectoryError(f"{where}: index/prefix length {block.block_index}/{block.prefix_len} out of order")
    n = len(block.fixed_point)
    if not 1 <= n <= block_size:
        raise TrajectoryError(f"{where}: fixed point has {n} tokens, block size is {block_size}")
    if not block.states or list(block.states[-1]) != list(block.fixed_point):
        raise TrajectoryError(f"{where}: last state is not the fixed point")
    if any(len(s) != n for s in block.states):
        raise TrajectoryError(f"{where}: states differ in length from the fixed point")


def record_trajectories(
    backend: GenerationBackend,
    prompts: list[Prompt],
    *,
    block_size: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    model_id: str,
    round_index: int,
    progress: Callable[[int], None] | None = None,
) -> RecordedBatch:
    """Decode ``prompts`` with the backend and return their rows as one table, plus decode stats.

    Each response runs to EOS or to ``max_new_tokens`` rounded up to a whole block, as in the official
    recorder, so that every block but an EOS-ended last one holds n tokens.
    """
    prompt_ids = backend.encode_prompts([p.text for p in prompts])
    eos_ids = backend.eos_token_ids()
    cap = whole_block_cap(max_new_tokens, block_size)
    start = time.perf_counter()
    results = backend.jacobi_trajectories(prompt_ids, block_size, cap, batch_size, seed, progress)
    generate_s = time.perf_counter() - start
    if len(results) != len(prompts):
        raise TrajectoryError(f"backend returned {len(results)} results for {len(prompts)} prompts")
    rows: list[dict] = []
    stats = DecodeStats()
    for prompt, ids, result in zip(prompts, prompt_ids, results):
        prompt_rows = trajectory_rows(
            prompt.id,
            ids,
            result,
            block_size=block_size,
            model_id=model_id,
            round_index=round_index,
            eos_ids=eos_ids,
            max_tokens=cap,
        )
        rows.extend(prompt_rows)
        stats = stats.merge(result.stats)
    return RecordedBatch(table=rows_to_table(rows), stats=stats, generate_s=generate_s)

"""Packing: the blocks of one response's Jacobi trajectories -> one training sequence (plain Python).

Layout (docs/method-notes.md §4): ``prompt ++ noisy_0 ++ clean_0 ++ noisy_1 ++ clean_1 ++ ...``. The
clean block is the fixed point; the noisy block is the recorded state nearest the block's target noise ratio
(:mod:`jf_ray.packing.schedules`). The prompt is taken from block 0's record and every block's prefix is
checked against prompt + earlier fixed points, so rows of different responses can never be mixed
(docs/method-notes.md §4).
"""

from __future__ import annotations

import logging
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from jf_ray.packing.schedules import Strategy, choose_state, noise_ratio, target_ratios
from jf_ray.packing.schema import PACKED_ARROW_SCHEMA

logger = logging.getLogger(__name__)


class MalformedTrajectory(ValueError):
    """The blocks of one response do not fit together (missing block, wrong prefix, bad states)."""


@dataclass
class PackOptions:
    window: int = 16
    strategy: Strategy = "progressive"
    seed: int = 0  # only the random strategy draws; each response gets its own stream from (seed, prompt_id)
    max_tokens: int | None = None  # keep the longest run of leading blocks whose packed length fits
    random_phase: bool = True  # each response's ramp starts at a step drawn from (seed, prompt_id)


@dataclass
class PackedSequence:
    prompt_id: str
    prompt_ids: list[int]
    noisy_blocks: list[list[int]]
    clean_blocks: list[list[int]]
    state_indices: list[int]
    target_ratios: list[float]
    noise_ratios: list[float]
    block_size: int
    window: int
    strategy: str
    ends_with_eos: bool
    truncated: bool
    model_id: str
    round: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + 2 * sum(len(block) for block in self.clean_blocks)

    def flat_ids(self) -> list[int]:
        ids = list(self.prompt_ids)
        for noisy, clean in zip(self.noisy_blocks, self.clean_blocks):
            ids += noisy + clean
        return ids

    def response_ids(self) -> list[int]:
        return [token for block in self.clean_blocks for token in block]


@dataclass
class PackStats:
    responses: int = 0
    packed: int = 0
    blocks: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> responses skipped


def response_rng(seed: int, prompt_id: str) -> random.Random:
    """A stream per response, independent of which worker packs it or in which order."""
    return random.Random(zlib.crc32(f"{seed}:{prompt_id}".encode()))


def check_blocks(blocks: Sequence[dict]) -> list[int]:
    """Validate one response's block rows (sorted by block_index); return its prompt ids."""
    indices = [int(block["block_index"]) for block in blocks]
    if indices != list(range(len(blocks))):
        raise MalformedTrajectory(f"block indices {indices} are not 0..{len(blocks) - 1}")
    prompt = list(blocks[0]["prefix_ids"][: int(blocks[0]["prompt_len"])])
    if not prompt:
        raise MalformedTrajectory("empty prompt")
    expected_prefix = list(prompt)
    for block in blocks:
        if list(block["prefix_ids"]) != expected_prefix:
            raise MalformedTrajectory(f"block {block['block_index']}: prefix is not prompt + earlier blocks")
        fixed_point = list(block["fixed_point"])
        states = block["states"]
        if not fixed_point or not states or list(states[-1]) != fixed_point:
            raise MalformedTrajectory(f"block {block['block_index']}: last state is not the fixed point")
        if any(len(state) != len(fixed_point) for state in states):
            raise MalformedTrajectory(f"block {block['block_index']}: states differ in length")
        expected_prefix += fixed_point
    return prompt


def fitting_blocks(prompt_len: int, block_lens: Sequence[int], max_tokens: int | None) -> int:
    """How many leading blocks fit into ``max_tokens`` packed tokens (all of them when unbounded)."""
    if max_tokens is None:
        return len(block_lens)
    used, count = prompt_len, 0
    for length in block_lens:
        used += 2 * length
        if used > max_tokens:
            break
        count += 1
    return count


def pack_response(blocks: Sequence[dict], options: PackOptions) -> PackedSequence | None:
    """Pack the rows of one response (any order). None when not even one block fits ``max_tokens``."""
    blocks = sorted(blocks, key=lambda block: int(block["block_index"]))
    prompt = check_blocks(blocks)
    keep = fitting_blocks(len(prompt), [len(b["fixed_point"]) for b in blocks], options.max_tokens)
    if keep == 0:
        return None
    kept = blocks[:keep]
    prompt_id = str(kept[0]["prompt_id"])
    rng = response_rng(options.seed, prompt_id)
    phase = rng.randrange(options.window) if options.random_phase else 0
    targets = target_ratios(keep, options.window, options.strategy, rng, phase)
    noisy, clean, chosen, achieved = [], [], [], []
    for block, target in zip(kept, targets):
        fixed_point = list(block["fixed_point"])
        index = choose_state(block["states"], fixed_point, target)
        state = list(block["states"][index])
        noisy.append(state)
        clean.append(fixed_point)
        chosen.append(index)
        achieved.append(noise_ratio(state, fixed_point))
    return PackedSequence(
        prompt_id=prompt_id,
        prompt_ids=prompt,
        noisy_blocks=noisy,
        clean_blocks=clean,
        state_indices=chosen,
        target_ratios=targets,
        noise_ratios=achieved,
        block_size=int(kept[0]["block_size"]),
        window=options.window,
        strategy=options.strategy,
        ends_with_eos=bool(kept[-1]["ends_with_eos"]) and keep == len(blocks),
        truncated=keep < len(blocks),
        model_id=str(kept[0]["model_id"]),
        round=int(kept[0]["round"]),
    )


def group_by_prompt(rows: Iterable[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["prompt_id"]), []).append(row)
    return groups


def pack_rows(rows: Iterable[dict], options: PackOptions) -> tuple[list[PackedSequence], PackStats]:
    """Pack every response found in ``rows`` (all blocks of a response must be among them)."""
    packed, stats = [], PackStats()
    for prompt_id, blocks in sorted(group_by_prompt(rows).items()):
        stats.responses += 1
        try:
            sequence = pack_response(blocks, options)
        except MalformedTrajectory as exc:
            logger.warning("skipping response %s: %s", prompt_id, exc)
            stats.skipped["malformed"] += 1
            continue
        if sequence is None:
            stats.skipped["too_long"] += 1
            continue
        packed.append(sequence)
        stats.packed += 1
        stats.blocks += len(sequence.clean_blocks)
        stats.tokens += sequence.num_tokens
        stats.truncated += int(sequence.truncated)
    return packed, stats


def packed_to_table(sequences: Sequence[PackedSequence]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in PACKED_ARROW_SCHEMA.names}
    for sequence in sequences:
        for name in PACKED_ARROW_SCHEMA.names:
            columns[name].append(getattr(sequence, name))
    return pa.Table.from_pydict(columns, schema=PACKED_ARROW_SCHEMA)


def table_to_packed(table: pa.Table) -> list[PackedSequence]:
    names = [name for name in PACKED_ARROW_SCHEMA.names if name != "num_tokens"]
    return [PackedSequence(**{name: row[name] for name in names}) for row in table.select(names).to_pylist()]

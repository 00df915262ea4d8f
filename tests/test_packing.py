"""Packing trajectories into training sequences (docs/method-notes.md §4; §10 items 3-4)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from jf_ray.packing.pack import (
    MalformedTrajectory,
    PackOptions,
    pack_response,
    pack_rows,
    packed_to_table,
    table_to_packed,
)
from jf_ray.packing.schedules import choose_state, noise_ratio, ratio_grid, target_ratios
from jf_ray.packing.schema import PACKED_ARROW_SCHEMA


def fake_trajectory(prompt_id: str, prompt: list[int], response: list[int], n: int, rng: random.Random) -> list[dict]:
    """Rows shaped like schema jf_ray.trajectories v1: per block the random draft, states whose first
    divergence grows, and the fixed point last."""
    rows, prefix = [], list(prompt)
    for j, start in enumerate(range(0, len(response), n)):
        fixed = response[start : start + n]
        states = []
        divergence = 1
        while divergence < len(fixed):
            states.append(fixed[:divergence] + [rng.randrange(1000, 2000) for _ in fixed[divergence:]])
            divergence += rng.randint(1, 3)
        states.append(list(fixed))
        rows.append(
            {
                "prompt_id": prompt_id,
                "block_index": j,
                "prompt_len": len(prompt),
                "prefix_ids": list(prefix),
                "states": states,
                "fixed_point": list(fixed),
                "block_size": n,
                "model_id": "m",
                "round": 1,
                "ends_with_eos": True,
            }
        )
        prefix += fixed
    return rows


@pytest.fixture
def trajectories():
    rng = random.Random(0)
    rows = []
    for k in range(5):
        prompt = [rng.randrange(3, 100) for _ in range(rng.randint(2, 6))]
        response = [rng.randrange(3, 100) for _ in range(rng.randint(5, 40))]
        rows += fake_trajectory(f"p{k}", prompt, response, n=8, rng=rng)
    rng.shuffle(rows)  # packing must not depend on row order
    return rows


def test_packed_layout_matches_the_method(trajectories):
    packed, stats = pack_rows(trajectories, PackOptions(window=4, random_phase=False))
    assert stats.packed == stats.responses == 5 and not stats.skipped
    for seq in packed:
        blocks = sorted((r for r in trajectories if r["prompt_id"] == seq.prompt_id), key=lambda r: r["block_index"])
        prompt = blocks[0]["prefix_ids"][: blocks[0]["prompt_len"]]
        assert seq.prompt_ids == prompt
        assert seq.clean_blocks == [b["fixed_point"] for b in blocks]
        assert seq.response_ids() == blocks[-1]["prefix_ids"][len(prompt) :] + blocks[-1]["fixed_point"]
        flat = seq.flat_ids()
        assert len(flat) == seq.num_tokens == len(prompt) + 2 * len(seq.response_ids())
        # the flat layout interleaves noisy_j, clean_j after the prompt
        offset = len(prompt)
        for noisy, clean in zip(seq.noisy_blocks, seq.clean_blocks):
            assert flat[offset : offset + len(noisy)] == noisy
            assert flat[offset + len(noisy) : offset + 2 * len(clean)] == clean
            offset += 2 * len(clean)
        targets = target_ratios(len(blocks), 4, "progressive")
        assert seq.target_ratios == targets
        for block, target, index, noisy in zip(blocks, targets, seq.state_indices, seq.noisy_blocks):
            assert index == choose_state(block["states"], block["fixed_point"], target)
            assert noisy == block["states"][index]
            if target == 0:
                assert noisy == block["fixed_point"]
        assert seq.noise_ratios == [noise_ratio(n, c) for n, c in zip(seq.noisy_blocks, seq.clean_blocks)]


def test_random_strategy_is_reproducible_per_response(trajectories):
    options = PackOptions(window=4, strategy="random", seed=3)
    first, _ = pack_rows(trajectories, options)
    again, _ = pack_rows(list(reversed(trajectories)), options)
    assert [s.target_ratios for s in first] == [s.target_ratios for s in again]


def test_random_phase_lets_short_responses_see_the_whole_ramp(trajectories):
    """A response of fewer blocks than the window starts its ramp at a step drawn per response: across
    responses every ratio of the grid is targeted, not only the ramp's low end; still a ramp, reproducible."""
    window = 16  # longer than every response here (at most 5 blocks): from step 0 they would all stop at the low end
    plain, _ = pack_rows(trajectories, PackOptions(window=window, random_phase=False))
    assert max(t for s in plain for t in s.target_ratios) < 0.5
    options = PackOptions(window=window, seed=1)  # random_phase is the default
    shifted, _ = pack_rows(trajectories, options)
    again, _ = pack_rows(list(reversed(trajectories)), options)
    assert [s.target_ratios for s in shifted] == [s.target_ratios for s in again]
    grid = ratio_grid(window)
    for seq in shifted:
        phase = grid.index(seq.target_ratios[0])
        assert seq.target_ratios == [grid[(phase + j) % window] for j in range(len(seq.target_ratios))]
    seen = {
        t
        for seed in range(6)
        for s in pack_rows(trajectories, PackOptions(window, seed=seed))[0]
        for t in s.target_ratios
    }
    assert max(seen) == 1.0 and len(seen) >= 6


def test_max_tokens_keeps_leading_blocks_and_skips_what_cannot_fit(trajectories):
    full, _ = pack_rows(trajectories, PackOptions(window=4))
    limit = min(len(s.prompt_ids) for s in full) + 2 * 8  # prompt + one full block, for the shortest prompt
    packed, stats = pack_rows(trajectories, PackOptions(window=4, max_tokens=limit))
    assert all(s.num_tokens <= limit for s in packed)
    assert stats.packed + stats.skipped["too_long"] == 5
    for seq in packed:
        original = next(s for s in full if s.prompt_id == seq.prompt_id)
        assert seq.clean_blocks == original.clean_blocks[: len(seq.clean_blocks)]
        assert seq.truncated == (len(seq.clean_blocks) < len(original.clean_blocks))
        assert not (seq.truncated and seq.ends_with_eos)


def test_malformed_responses_are_detected(trajectories):
    rows = [r for r in trajectories if r["prompt_id"] == "p1"]
    assert len(rows) > 1
    with pytest.raises(MalformedTrajectory, match="block indices"):
        pack_response([r for r in rows if r["block_index"] != 0], PackOptions())
    wrong_prefix = [dict(r, prefix_ids=r["prefix_ids"] + [1]) if r["block_index"] == 1 else r for r in rows]
    with pytest.raises(MalformedTrajectory, match="prefix"):
        pack_response(wrong_prefix, PackOptions())
    mixed = trajectories + [dict(rows[0], block_index=len(rows))]  # a duplicated block lands in p1
    _, stats = pack_rows(mixed, PackOptions())
    assert stats.skipped["malformed"] == 1 and stats.packed == 4


def test_table_round_trip(trajectories):
    packed, _ = pack_rows(trajectories, PackOptions(window=4))
    table = packed_to_table(packed)
    assert table.schema.equals(PACKED_ARROW_SCHEMA)
    assert table.column("num_tokens").to_pylist() == [s.num_tokens for s in packed]
    back = table_to_packed(pa.Table.from_batches(table.to_batches()))
    assert [s.flat_ids() for s in back] == [s.flat_ids() for s in packed]
    for restored, original in zip(back, packed):
        assert restored.target_ratios == pytest.approx(original.target_ratios)
        assert restored.state_indices == original.state_indices


def test_ray_data_pack_job_matches_the_plain_functions(ray_session, tmp_path, trajectories):
    """`pack` over trajectory shards (one response split across shards, one malformed) writes a committed
    jf_ray.packed dataset equal to packing the rows in-process."""
    from jf_ray.packing.config import PackConfig
    from jf_ray.packing.ray_pack import pack
    from jf_ray.packing.schema import PACKED_SCHEMA
    from jf_ray.storage import DatasetWriter, read_dataset, read_manifest
    from jf_ray.trajectories.schema import TRAJECTORY_SCHEMA, rows_to_table

    broken = [dict(r, prompt_id="broken") for r in trajectories if r["prompt_id"] == "p2" and r["block_index"] != 0]
    rows = sorted(trajectories, key=lambda r: (r["prompt_id"], r["block_index"])) + broken
    source = f"file://{tmp_path}/trajectories"
    writer = DatasetWriter(source, TRAJECTORY_SCHEMA)
    half = len(rows) // 2  # splits a response across the two shards
    writer.write_shard("shard-0", rows_to_table(rows[:half]))
    writer.write_shard("shard-1", rows_to_table(rows[half:]))
    writer.commit()

    out = f"file://{tmp_path}/packed"
    config = PackConfig(trajectories=source, out=out, window=4, strategy="random", seed=5, rows_per_shard=2)
    summary = pack(config)
    expected, stats = pack_rows(rows, PackOptions(window=4, strategy="random", seed=5))
    assert summary["packed"] == stats.packed == 5
    assert summary["skipped"] == {"malformed": 1, "too_long": 0}
    assert summary["tokens"] == stats.tokens and summary["blocks"] == stats.blocks
    assert summary["shards"] == len(read_manifest(out, PACKED_SCHEMA)["shards"]) >= 2
    got = {s.prompt_id: s for s in table_to_packed(read_dataset(out, schema=PACKED_SCHEMA))}
    assert sorted(got) == sorted(s.prompt_id for s in expected)
    for seq in expected:
        assert got[seq.prompt_id].flat_ids() == seq.flat_ids()
        assert got[seq.prompt_id].state_indices == seq.state_indices

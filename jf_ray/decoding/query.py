"""Assembling one batched forward from per-row segments, with an explicit 4D attention mask.

A row's query is a list of segments laid side by side. Each segment is causal within itself, sees every
committed slot of its row, and sees the earlier segments of the same row it names in ``sees`` (multi-block:
a pseudo-active block conditions on the real-active draft before it; recycled candidates see only the cache).
Shorter rows are padded; padding queries see only themselves and are never committed.

The mask is additive (0 / dtype min) of shape [B, 1, q, slots + q], which eager and sdpa attention in
transformers take unchanged (a boolean mask is right for sdpa only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Segment:
    tokens: list[int]
    start_position: int
    sees: list[int] = field(default_factory=list)  # indices of earlier segments of the same row


@dataclass
class BatchQuery:
    input_ids: torch.Tensor  # [B, q]
    position_ids: torch.Tensor  # [B, q]
    attention_mask: torch.Tensor  # [B, 1, q, slots + q] additive
    offsets: list[list[int]]  # per row: query offset where each segment starts


def build_query(
    segments: list[list[Segment]], valid: torch.Tensor, dtype: torch.dtype, pad_token_id: int = 0
) -> BatchQuery:
    """Lay out ``segments[row]`` for every row of the cache whose validity matrix is ``valid`` [B, slots].

    Padding queries may see anything (their outputs are ignored and their K/V never committed), and no real
    query sees a padding one (padding comes last, under the causal rule), which keeps the common case of one
    segment per row to a few whole-batch tensor operations.
    """
    rows, slots = valid.shape
    device = valid.device
    lengths = [sum(len(s.tokens) for s in row) for row in segments]
    width = max(lengths)
    ids, positions, offsets = [], [], []
    for row, length in zip(segments, lengths):
        row_ids, row_positions, starts = [], [], []
        for seg in row:
            starts.append(len(row_ids))
            row_ids += seg.tokens
            row_positions += range(seg.start_position, seg.start_position + len(seg.tokens))
        pad = width - length
        ids.append(row_ids + [pad_token_id] * pad)
        positions.append(row_positions + [0] * pad)
        offsets.append(starts)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = torch.cat([valid[:, None, :].expand(rows, width, slots), causal.expand(rows, width, width)], dim=2)
    for b, row in enumerate(segments):
        if len(row) > 1:
            _segment_visibility(allowed[b, :, slots:], row, offsets[b], causal)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return BatchQuery(as_tensor(ids), as_tensor(positions), mask[:, None], offsets)


def _segment_visibility(allowed: torch.Tensor, row: list[Segment], starts: list[int], causal: torch.Tensor) -> None:
    """Within one row's query part [q, q]: causal inside each segment, full view of the segments it ``sees``."""
    end = starts[-1] + len(row[-1].tokens)
    allowed[:end, :end] = False
    for seg, start in zip(row, starts):
        stop = start + len(seg.tokens)
        allowed[start:stop, start:stop] = causal[: stop - start, : stop - start]
        for other in seg.sees:
            allowed[start:stop, starts[other] : starts[other] + len(row[other].tokens)] = True


def prefill_query(prompts: list[list[int]], dtype: torch.dtype, device, pad_token_id: int = 0) -> BatchQuery:
    """Right-padded prompts as one segment each, on an empty cache."""
    valid = torch.zeros((len(prompts), 0), dtype=torch.bool, device=device)
    return build_query([[Segment(p, 0)] for p in prompts], valid, dtype, pad_token_id)

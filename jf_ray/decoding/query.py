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
    """Lay out ``segments[row]`` for every row of the cache whose validity matrix is ``valid`` [B, slots]."""
    rows, slots = valid.shape
    lengths = [sum(len(s.tokens) for s in row) for row in segments]
    width = max(lengths)
    device = valid.device
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    allowed = torch.zeros((rows, width, slots + width), dtype=torch.bool, device=device)
    allowed[:, :, slots:] = torch.eye(width, dtype=torch.bool, device=device)  # every query sees itself
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    offsets: list[list[int]] = []
    for b, row in enumerate(segments):
        starts, cursor = [], 0
        for seg in row:
            starts.append(cursor)
            end = cursor + len(seg.tokens)
            ids[b, cursor:end] = torch.tensor(seg.tokens, dtype=torch.long)
            positions[b, cursor:end] = torch.arange(seg.start_position, seg.start_position + len(seg.tokens))
            allowed[b, cursor:end, :slots] = valid[b]
            allowed[b, cursor:end, slots + cursor : slots + end] = causal[: end - cursor, : end - cursor]
            for other in seg.sees:
                o_start, o_len = starts[other], len(row[other].tokens)
                allowed[b, cursor:end, slots + o_start : slots + o_start + o_len] = True
            cursor = end
        offsets.append(starts)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return BatchQuery(ids.to(device), positions.to(device), mask[:, None], offsets)


def prefill_query(prompts: list[list[int]], dtype: torch.dtype, device, pad_token_id: int = 0) -> BatchQuery:
    """Right-padded prompts as one segment each, on an empty cache."""
    valid = torch.zeros((len(prompts), 0), dtype=torch.bool, device=device)
    return build_query([[Segment(p, 0)] for p in prompts], valid, dtype, pad_token_id)

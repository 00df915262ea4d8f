"""Packed sequences -> model-ready micro-batches: ids, position ids, mask labels, loss targets.

One packed sequence is ``prompt ++ (noisy_j ++ clean_j)_j`` (schema "jf_ray.packed"). A micro-batch holds
several, either one per row padded to the longest (``max_row_tokens=None``) or first-fit packed several to a
row of at most ``max_row_tokens`` tokens. Position ids restart in every sequence; both copies of block ``j``
share the positions ``P + (sum of earlier block lengths) + t``.

Loss targets (docs/method-notes.md §6):

* AR: next-token labels on the clean stream ``prompt ++ c_0 ++ ... ++ c_{N-1}``, stored at the packed index
  of the predicting token. The bridge from the last prompt token to ``c_0[0]`` is always a target; the
  prompt's own next tokens only with ``ar_on_prompt``. Noisy positions never get AR labels.
* Consistency: (student, teacher) index pairs ``(noisy_j[t], clean_j[t])``: both logits predict the token
  after offset ``t``. ``from_divergence`` keeps ``t`` from the block's first divergence on (the official
  rule: positions before it hold exact tokens); ``all`` keeps every offset.
* Anchor sequences (plain text or prompt+answer) are rows of prompt-only sequences whose labels go to
  ``anchor_labels``, so they ride in the same forward with plain causal attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from jf_ray.packing.schedules import first_divergence
from jf_ray.training.config import ConsistencyPositions
from jf_ray.training.masks import CLEAN, NOISY, PAD, PROMPT

IGNORE = -100


@dataclass
class TrainSequence:
    """One sequence to place in a row: a packed JF sequence, or an anchor (``blocks`` empty)."""

    prompt_ids: list[int]
    noisy_blocks: list[list[int]] = field(default_factory=list)
    clean_blocks: list[list[int]] = field(default_factory=list)
    is_anchor: bool = False
    anchor_loss_from: int = 0  # anchor: first token that is a target (0 = all text, len(prompt) = answer)

    def __len__(self) -> int:
        return len(self.prompt_ids) + 2 * sum(len(block) for block in self.clean_blocks)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L) long
    segment: torch.Tensor  # (B, L) long: PAD / PROMPT / NOISY / CLEAN
    block: torch.Tensor  # (B, L) long, -1 outside blocks
    seq: torch.Tensor  # (B, L) long, sequence index in its row, -1 for pad
    ar_labels: torch.Tensor  # (B, L) long, IGNORE where no AR target
    anchor_labels: torch.Tensor  # (B, L) long, IGNORE where no anchor target
    student_index: torch.Tensor  # (K,) flat index into B*L of noisy positions
    teacher_index: torch.Tensor  # (K,) flat index of the matching clean positions
    pair_block: torch.Tensor  # (K,) id of the (sequence, block) each pair belongs to, 0..num_blocks-1
    num_sequences: int
    num_tokens: int  # non-pad tokens

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedBatch(**moved)


@dataclass
class _RowBuilder:
    """Python lists of one row under construction."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    block: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    ar_labels: list[int] = field(default_factory=list)
    anchor_labels: list[int] = field(default_factory=list)
    pairs: list[tuple[int, int, int]] = field(default_factory=list)  # (student, teacher, block id) in row
    num_sequences: int = 0

    def append(self, item: TrainSequence, ar_on_prompt: bool, positions: ConsistencyPositions, block_id: int) -> int:
        """Add one sequence; returns the next free global block id."""
        seq_index, start = self.num_sequences, len(self.ids)
        self.num_sequences += 1
        prompt_len = len(item.prompt_ids)
        self._extend(item.prompt_ids, range(prompt_len), PROMPT, -1, seq_index)
        stream = list(range(start, start + prompt_len))  # packed indices of the clean stream
        offset = prompt_len
        for j, (noisy, clean) in enumerate(zip(item.noisy_blocks, item.clean_blocks)):
            block_positions = range(offset, offset + len(clean))
            noisy_start = len(self.ids)
            self._extend(noisy, block_positions, NOISY, j, seq_index)
            clean_start = len(self.ids)
            self._extend(clean, block_positions, CLEAN, j, seq_index)
            stream += range(clean_start, clean_start + len(clean))
            first = first_divergence(noisy, clean) if positions == "from_divergence" else 0
            self.pairs += [(noisy_start + t, clean_start + t, block_id) for t in range(first, len(clean))]
            block_id += 1
            offset += len(clean)
        labels = self.anchor_labels if item.is_anchor else self.ar_labels
        if item.is_anchor:
            first_source = max(item.anchor_loss_from - 1, 0)
        else:
            first_source = 0 if ar_on_prompt else prompt_len - 1
        for i, (source, target) in enumerate(zip(stream[:-1], stream[1:])):
            if i >= first_source:
                labels[source] = self.ids[target]
        return block_id

    def _extend(self, ids: Sequence[int], positions: Sequence[int], segment: int, block: int, seq: int) -> None:
        self.ids += ids
        self.positions += positions
        self.segment += [segment] * len(ids)
        self.block += [block] * len(ids)
        self.seq += [seq] * len(ids)
        self.ar_labels += [IGNORE] * len(ids)
        self.anchor_labels += [IGNORE] * len(ids)


def assign_rows(lengths: Sequence[int], max_row_tokens: int | None) -> list[list[int]]:
    """Indices of the sequences placed in each row: one per row, or first-fit decreasing into rows of
    ``max_row_tokens`` (a sequence longer than that gets a row of its own)."""
    if max_row_tokens is None:
        return [[index] for index in range(len(lengths))]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_row_tokens - lengths[index])
    return rows


def collate(
    items: Sequence[TrainSequence],
    max_row_tokens: int | None = None,
    ar_on_prompt: bool = False,
    consistency_positions: ConsistencyPositions = "from_divergence",
    pad_token_id: int = 0,
) -> PackedBatch:
    """Build one micro-batch. Pad tokens get label PAD, no targets, and attend only to themselves."""
    if not items:
        raise ValueError("cannot collate an empty list of sequences")
    builders, block_id = [], 0
    for row in assign_rows([len(item) for item in items], max_row_tokens):
        builder = _RowBuilder()
        for index in row:
            block_id = builder.append(items[index], ar_on_prompt, consistency_positions, block_id)
        builders.append(builder)
    length = max(len(builder.ids) for builder in builders)
    fills = {
        "ids": pad_token_id,
        "positions": 0,
        "segment": PAD,
        "block": -1,
        "seq": -1,
        "ar_labels": IGNORE,
        "anchor_labels": IGNORE,
    }
    tensors = {
        name: torch.tensor([getattr(b, name) + [fill] * (length - len(b.ids)) for b in builders], dtype=torch.long)
        for name, fill in fills.items()
    }
    pairs = [(row * length + s, row * length + t, blk) for row, b in enumerate(builders) for s, t, blk in b.pairs]
    student, teacher, pair_block = _pair_columns(pairs)
    return PackedBatch(
        input_ids=tensors["ids"],
        position_ids=tensors["positions"],
        segment=tensors["segment"],
        block=tensors["block"],
        seq=tensors["seq"],
        ar_labels=tensors["ar_labels"],
        anchor_labels=tensors["anchor_labels"],
        student_index=student,
        teacher_index=teacher,
        pair_block=pair_block,
        num_sequences=len(items),
        num_tokens=sum(len(b.ids) for b in builders),
    )


def _pair_columns(pairs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not pairs:
        return tuple(torch.zeros(0, dtype=torch.long) for _ in range(3))  # type: ignore[return-value]
    return tuple(torch.tensor(column, dtype=torch.long) for column in zip(*pairs))  # type: ignore[return-value]

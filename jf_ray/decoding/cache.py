"""A batched KV cache whose rows hold different numbers of committed tokens.

Built on transformers' ``DynamicCache`` (the model appends every forward's K/V to it as usual), whose layers
keep spare slots (:class:`SpareSlotsLayer`). We keep a
boolean ``valid`` matrix [rows, slots] beside it: a slot is valid when it holds the K/V of a committed token of
that row. Rejected draft tokens, losing candidates and padding simply stay invalid (masked out of attention),
which is what makes per-row acceptance, candidates in the middle of a query and ragged batches cheap: no
data moves after a forward. Because rotary positions are baked into the keys, where a slot sits does not
matter, only which slots are visible. Dead slots are reclaimed by cropping the tail and, now and then,
compacting the rows.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Slots a layer's buffer grows by: at least this, and an eighth of what it holds, so that long contexts on a GPU
# keep at most an eighth more KV memory than they use while a copy of the cache comes once every n/8 slots.
SPARE_SLOTS = 64


class SpareSlotsLayer(DynamicLayer):
    """A ``DynamicLayer`` whose K/V are the front of a buffer with spare slots, so a forward's K/V are written
    in place instead of concatenated into a new copy of the whole cache. Concatenation copied every row's
    cache at every forward: at 64 rows of ~240 slots on the embedded model, 1.8 ms of a 10 ms step
    (docs/decoding.md). Anything that replaces ``keys``/``values`` with another tensor (the row and slot
    moves of :class:`RaggedKVCache`, transformers' own crops) is adopted into a new buffer at the next update.
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        needed = used + key_states.shape[-2]
        if not (_is_front_of(self.keys, self._key_buffer) and _is_front_of(self.values, self._value_buffer)):
            self._key_buffer = self._value_buffer = None  # keys/values were replaced: not ours any more
        if self._key_buffer is None or self._key_buffer.shape[-2] < needed or used == 0:
            capacity = needed + max(SPARE_SLOTS, needed // 8)
            self._key_buffer = _buffer_like(key_states, capacity, self.keys if used else None)
            self._value_buffer = _buffer_like(value_states, capacity, self.values if used else None)
        self._key_buffer[:, :, used:needed] = key_states
        self._value_buffer[:, :, used:needed] = value_states
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values


def _is_front_of(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether ``view`` is ``buffer[:, :, :n]`` for some n (same storage start, strides and other dims)."""
    return (
        buffer is not None
        and view.dim() == 4
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2]
    )


def _buffer_like(states: torch.Tensor, capacity: int, current: torch.Tensor | None) -> torch.Tensor:
    """An empty [rows, heads, capacity, dim] buffer for ``states``, holding ``current`` at its front."""
    rows, heads, _, dim = states.shape
    buffer = states.new_empty((rows, heads, capacity, dim))
    if current is not None:
        buffer[:, :, : current.shape[-2]] = current
    return buffer


class RaggedKVCache:
    def __init__(self, device: torch.device | str = "cpu", num_rows: int = 0):
        self.kv = DynamicCache()
        self.kv.layer_class_to_replicate = SpareSlotsLayer
        self.valid = torch.zeros((num_rows, 0), dtype=torch.bool, device=device)

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    def committed(self) -> torch.Tensor:
        """Committed tokens per row (int64 [rows])."""
        return self.valid.sum(dim=1)

    def _layers(self):
        return [layer for layer in self.kv.layers if getattr(layer, "keys", None) is not None]

    def extend_slots(self, num_new: int) -> None:
        """Account for the ``num_new`` slots a forward just appended (invalid until committed)."""
        pad = torch.zeros((self.num_rows, num_new), dtype=torch.bool, device=self.valid.device)
        self.valid = torch.cat([self.valid, pad], dim=1)

    def commit(self, row: int, first_slot: int, count: int) -> None:
        """Mark ``count`` consecutive slots from ``first_slot`` as holding committed tokens of ``row``."""
        self.valid[row, first_slot : first_slot + count] = True

    def crop_tail(self) -> None:
        """Drop trailing slots that are invalid in every row (e.g. the rejected end of every draft)."""
        used = self.valid.any(dim=0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 0
        if keep == self.num_slots:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, :keep]
            layer.values = layer.values[:, :, :keep]
        self.valid = self.valid[:, :keep]

    def hole_fraction(self) -> float:
        if self.valid.numel() == 0:
            return 0.0
        return 1.0 - float(self.valid.sum()) / self.valid.numel()

    def compact(self) -> None:
        """Move each row's valid slots to the front (order kept), shrinking to the longest row."""
        counts = self.committed()
        width = int(counts.max()) if counts.numel() else 0
        # A stable sort of "invalid" puts valid slots first in their original order.
        order = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices[:, :width]
        for layer in self._layers():
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.gather(layer.keys, 2, index)
            layer.values = torch.gather(layer.values, 2, index)
        self.valid = torch.arange(width, device=self.valid.device)[None, :] < counts[:, None]

    def maybe_compact(self, max_hole_fraction: float = 0.5, min_slots: int = 256) -> None:
        self.crop_tail()
        if self.num_slots >= min_slots and self.hole_fraction() > max_hole_fraction:
            self.compact()

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.crop_tail()

    def append_rows(self, other: RaggedKVCache) -> None:
        """Add the rows of ``other`` (e.g. freshly prefilled requests) below ours, padding slot counts."""
        if self.num_rows == 0:
            self.kv, self.valid = other.kv, other.valid
            return
        width = max(self.num_slots, other.num_slots)
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([_pad_slots(mine.keys, width), _pad_slots(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_slots(mine.values, width), _pad_slots(theirs.values, width)], dim=0)
        self.valid = torch.cat([_pad_slots(self.valid, width), _pad_slots(other.valid, width)], dim=0)


def _pad_slots(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the slot dimension (dim 2 of K/V, dim 1 of the valid mask) with zeros up to ``width``."""
    slot_dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[slot_dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[slot_dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=slot_dim)

"""Training data for one worker: its own rows of the packed data + anchor sequences -> a deterministic
micro-batch stream.

Worker ``r`` of ``W`` owns the contiguous rows ``r*P .. (r+1)*P - 1`` of the packed dataset (schema
"jf_ray.packed", rows in manifest order), ``P = N // W`` (the remainder is dropped, so DDP ranks always run
the same number of steps), and reads only the shards holding them
(:func:`jf_ray.storage.read_dataset_rows`). The rows stay in Arrow memory and become sequences one
micro-batch at a time. Each epoch visits a worker's rows in a permutation seeded by ``(seed, epoch, rank)``.
Micro-batch ``i`` is a pure function of ``i``: resuming at step ``s`` simply continues at micro-batch
``s * grad_accum``, with the same data an uninterrupted run would have seen.

Anchor sequences (``{"text"}``, ``{"prompt", "answer"}`` or ``{"input_ids"}`` per JSONL line) ride along:
micro-batch ``i`` gets ``floor((i+1) r b) - floor(i r b)`` of them for ratio ``r`` and micro-batch size ``b``,
drawn cyclically from a per-worker permutation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache

import pyarrow as pa

from jf_ray.errors import UserInputError
from jf_ray.jsonl import jsonl_records, require_text
from jf_ray.packing.schema import PACKED_SCHEMA
from jf_ray.training.batches import PackedBatch, TrainSequence, collate
from jf_ray.training.config import TrainConfig

SEQUENCE_COLUMNS = ["prompt_ids", "noisy_blocks", "clean_blocks"]


class PackedRows:
    """Packed sequences held as an Arrow table (a few bytes per token, not Python lists of ints)."""

    def __init__(self, table: pa.Table):
        self.table = table.select(SEQUENCE_COLUMNS)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> TrainSequence:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self.table.slice(index, 1).to_pylist()[0]
        return TrainSequence(row["prompt_ids"], row["noisy_blocks"], row["clean_blocks"])

    def __iter__(self) -> Iterator[TrainSequence]:
        return (self[index] for index in range(len(self)))


def worker_row_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the rows worker ``rank`` owns (see the module docstring)."""
    if num_rows < world_size:
        raise UserInputError(f"{num_rows} packed sequences cannot feed {world_size} workers")
    per_worker = num_rows // world_size
    return rank * per_worker, (rank + 1) * per_worker


def load_packed_sequences(uri: str, rank: int = 0, world_size: int = 1) -> PackedRows:
    """The packed rows worker ``rank`` of ``world_size`` trains on (all of them by default)."""
    from jf_ray.storage import read_dataset_rows, read_manifest

    start, stop = worker_row_range(read_manifest(uri, PACKED_SCHEMA)["num_rows"], rank, world_size)
    rows = PackedRows(read_dataset_rows(uri, start, stop, schema=PACKED_SCHEMA, columns=SEQUENCE_COLUMNS))
    if not len(rows):
        raise UserInputError(f"packed dataset {uri} has no sequences")
    return rows


def anchor_from_record(record: dict, tokenizer, max_tokens: int, ar_on_prompt: bool, where: str = "anchor record"):
    """One JSONL record -> an anchor sequence (AR loss on the text, or on the answer of a prompt pair)."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected an object, got {type(record).__name__}")
    if "input_ids" in record:
        ids, loss_from = anchor_token_ids(record["input_ids"], where), 0
    elif tokenizer is None:
        raise UserInputError(f"{where}: records with text need the model's tokenizer, and the model has none")
    elif "text" in record:
        text = require_text(record["text"], where, "text")
        ids, loss_from = tokenizer(text, add_special_tokens=False)["input_ids"], 0
    elif "prompt" in record and "answer" in record:
        from jf_ray.modeling import encode_prompt

        prompt = encode_prompt(tokenizer, require_text(record["prompt"], where, "prompt"))
        answer = tokenizer(require_text(record["answer"], where, "answer"), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, loss_from = prompt + answer + eos, 0 if ar_on_prompt else len(prompt)
    else:
        raise UserInputError(f"{where}: needs text, prompt+answer or input_ids; got keys {sorted(record)}")
    ids = ids[:max_tokens]
    return TrainSequence(ids, is_anchor=True, anchor_loss_from=min(loss_from, max(len(ids) - 1, 0)))


def anchor_token_ids(value, where: str) -> list[int]:
    """``input_ids`` of an anchor record: a list of non-negative integers (ids past the model's vocabulary are
    not known here; they fail in the worker's embedding)."""
    if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
        raise UserInputError(f'{where}: "input_ids" must be a list of non-negative integers')
    return value


def load_anchor_sequences(uri: str, tokenizer, max_tokens: int, ar_on_prompt: bool) -> list[TrainSequence]:
    from jf_ray.storage import read_bytes

    anchors = []
    for where, record in jsonl_records(read_bytes(uri), uri):
        anchor = anchor_from_record(record, tokenizer, max_tokens, ar_on_prompt, where)
        if len(anchor) >= 2:
            anchors.append(anchor)
    if not anchors:
        raise UserInputError(f"anchor file {uri} holds no usable sequence")
    return anchors


class MicroBatchStream:
    """Micro-batches of one worker, addressed by optimizer step (see the module docstring)."""

    def __init__(
        self,
        sequences: Sequence[TrainSequence],
        config: TrainConfig,
        rank: int,
        anchors: list[TrainSequence] | None = None,
        pad_token_id: int = 0,
    ):
        """``sequences``: this worker's own rows (:func:`load_packed_sequences` with its rank)."""
        if not len(sequences):
            raise UserInputError("a training worker got no packed sequences")
        self.sequences, self.anchors = sequences, anchors or []
        self.config, self.rank = config, rank
        self.pad_token_id = pad_token_id
        self.micro_per_epoch = math.ceil(len(sequences) / config.micro_batch_size)

    def total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        return max(1, math.ceil(self.config.epochs * self.micro_per_epoch / self.config.grad_accum))

    def __call__(self, step: int) -> list[PackedBatch]:
        first = step * self.config.grad_accum
        return [self.micro_batch(index) for index in range(first, first + self.config.grad_accum)]

    def micro_batch(self, index: int) -> PackedBatch:
        epoch, offset = divmod(index, self.micro_per_epoch)
        size = self.config.micro_batch_size
        order = self.epoch_order(epoch)[offset * size : (offset + 1) * size]
        items = [self.sequences[i] for i in order] + self._anchors_for(index)
        return collate(
            items,
            max_row_tokens=self.config.max_row_tokens,
            ar_on_prompt=self.config.loss.ar_on_prompt,
            consistency_positions=self.config.loss.positions,
            pad_token_id=self.pad_token_id,
        )

    @lru_cache(maxsize=2)  # noqa: B019 - one dataset per worker process, lives as long as it
    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits this worker's rows."""
        order = list(range(len(self.sequences)))
        if self.config.shuffle:
            random.Random(f"{self.config.seed}:epoch:{epoch}:rank:{self.rank}").shuffle(order)
        return order

    def _anchors_for(self, index: int) -> list[TrainSequence]:
        if not self.anchors or self.config.anchor_ratio <= 0:
            return []
        rate = self.config.anchor_ratio * self.config.micro_batch_size
        start, stop = math.floor(index * rate), math.floor((index + 1) * rate)
        return [self.anchors[self._anchor_slot(k)] for k in range(start, stop)]

    def _anchor_slot(self, k: int) -> int:
        cycle, offset = divmod(k, len(self.anchors))
        return self._anchor_order(cycle)[offset]

    @lru_cache(maxsize=2)  # noqa: B019 - one dataset per worker process, lives as long as it
    def _anchor_order(self, cycle: int) -> list[int]:
        order = list(range(len(self.anchors)))
        random.Random(f"{self.config.seed}:anchor:{self.rank}:{cycle}").shuffle(order)
        return order

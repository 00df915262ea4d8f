"""Training data for one worker: packed sequences + anchor sequences -> a deterministic micro-batch stream.

Every worker reads the packed dataset (validated against schema "jf_ray.packed") and derives its share from
a seeded permutation per epoch: the same ``(seed, epoch)`` gives every worker the same order, worker ``r``
takes items ``r, r + W, ...`` and every worker gets the same count (the remainder is dropped), so DDP ranks
always run the same number of steps. Micro-batch ``i`` is a pure function of ``i``; resuming at step ``s``
simply continues at micro-batch ``s * grad_accum``, with the same data an uninterrupted run would have seen.

Anchor sequences (``{"text"}``, ``{"prompt", "answer"}`` or ``{"input_ids"}`` per JSONL line) ride along:
micro-batch ``i`` gets ``floor((i+1) r b) - floor(i r b)`` of them for ratio ``r`` and micro-batch size ``b``,
drawn cyclically from a per-worker permutation.
"""

from __future__ import annotations

import json
import math
import random
from functools import lru_cache

from jf_ray.errors import UserInputError
from jf_ray.packing.schema import PACKED_SCHEMA, TRAIN_COLUMNS
from jf_ray.training.batches import PackedBatch, TrainSequence, collate
from jf_ray.training.config import TrainConfig


def load_packed_sequences(uri: str) -> list[TrainSequence]:
    from jf_ray.storage import read_dataset

    table = read_dataset(uri, required_columns=TRAIN_COLUMNS, schema=PACKED_SCHEMA, columns=TRAIN_COLUMNS)
    sequences = [
        TrainSequence(row["prompt_ids"], row["noisy_blocks"], row["clean_blocks"])
        for row in table.select(["prompt_ids", "noisy_blocks", "clean_blocks"]).to_pylist()
    ]
    if not sequences:
        raise UserInputError(f"packed dataset {uri} has no sequences")
    return sequences


def anchor_from_record(record: dict, tokenizer, max_tokens: int, ar_on_prompt: bool) -> TrainSequence:
    """One JSONL record -> an anchor sequence (AR loss on the text, or on the answer of a prompt pair)."""
    if "input_ids" in record:
        ids, loss_from = [int(t) for t in record["input_ids"]], 0
    elif tokenizer is None:
        raise UserInputError("anchor records with text need the model's tokenizer, and the model has none")
    elif "text" in record:
        ids, loss_from = tokenizer(record["text"], add_special_tokens=False)["input_ids"], 0
    elif "prompt" in record and "answer" in record:
        from jf_ray.modeling import encode_prompt

        prompt = encode_prompt(tokenizer, record["prompt"])
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, loss_from = prompt + answer + eos, 0 if ar_on_prompt else len(prompt)
    else:
        raise UserInputError(f"anchor record needs text, prompt+answer or input_ids; got keys {sorted(record)}")
    ids = ids[:max_tokens]
    return TrainSequence(ids, is_anchor=True, anchor_loss_from=min(loss_from, max(len(ids) - 1, 0)))


def load_anchor_sequences(uri: str, tokenizer, max_tokens: int, ar_on_prompt: bool) -> list[TrainSequence]:
    from jf_ray.storage import read_bytes

    anchors = []
    for number, line in enumerate(read_bytes(uri).decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{uri} line {number} is not JSON: {exc}") from None
        anchor = anchor_from_record(record, tokenizer, max_tokens, ar_on_prompt)
        if len(anchor) >= 2:
            anchors.append(anchor)
    if not anchors:
        raise UserInputError(f"anchor file {uri} holds no usable sequence")
    return anchors


class MicroBatchStream:
    """Micro-batches of one worker, addressed by optimizer step (see the module docstring)."""

    def __init__(
        self,
        sequences: list[TrainSequence],
        config: TrainConfig,
        rank: int,
        world_size: int,
        anchors: list[TrainSequence] | None = None,
        pad_token_id: int = 0,
    ):
        if len(sequences) < world_size:
            raise UserInputError(f"{len(sequences)} packed sequences cannot feed {world_size} workers")
        self.sequences, self.anchors = sequences, anchors or []
        self.config, self.rank, self.world_size = config, rank, world_size
        self.pad_token_id = pad_token_id
        self.per_worker = len(sequences) // world_size
        self.micro_per_epoch = math.ceil(self.per_worker / config.micro_batch_size)

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
        order = self._worker_order(epoch)[offset * size : (offset + 1) * size]
        items = [self.sequences[i] for i in order] + self._anchors_for(index)
        return collate(
            items,
            max_row_tokens=self.config.max_row_tokens,
            ar_on_prompt=self.config.loss.ar_on_prompt,
            consistency_positions=self.config.loss.positions,
            pad_token_id=self.pad_token_id,
        )

    @lru_cache(maxsize=2)  # noqa: B019 - one dataset per worker process, lives as long as it
    def _worker_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sequences)))
        if self.config.shuffle:
            random.Random(f"{self.config.seed}:epoch:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][: self.per_worker]

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

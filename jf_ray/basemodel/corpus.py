"""The pretraining corpus: the code and math workloads as chat turns plus raw stdlib code, as packed rows.

Chat turns (``prompt -> answer <|im_end|>``) teach the model to answer in the format the decoders use; the
loss covers the answer and its EOS only, because the prompt text (random names and numbers) is not
something the model can or needs to predict. Several turns share a row, but each sees only itself (position
ids restart at 0 and the training step masks attention per turn), exactly as at inference: a small model
otherwise copies numbers from the wrong problem of the row. Raw code rows are plain language modelling.
Only the ``train`` split of each workload is read.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from jf_ray.basemodel.presets import BasePreset
from jf_ray.basemodel.tokenizer import ENDOFTEXT
from jf_ray.modeling import encode_chat_examples
from jf_ray.workloads.code import generate_code
from jf_ray.workloads.math import generate_math
from jf_ray.workloads.stdlib import stdlib_corpus

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenRows:
    """Fixed-length training rows: ``input_ids`` [N, seq_len], ``labels`` (IGNORE_INDEX where no loss) and
    ``position_ids`` (0 where a sequence starts; a token attends only within its own sequence)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def tokenizer_texts(preset: BasePreset, seed: int) -> list[str]:
    """Text the tokenizer is trained on: train-split math problems (half), code tasks and stdlib source."""
    budget = preset.tokenizer_chars
    texts = stdlib_corpus("train", max_chars=budget // 4, seed=seed)
    for examples, share in (
        (generate_math(max(1, budget // 600), split="train", seed=seed), budget // 2),
        (generate_code(max(1, budget // 1600), split="train", seed=seed), budget // 4),
    ):
        chars = 0
        for example in examples:
            texts.append(f"{example.prompt}{example.answer}\n")
            chars += len(texts[-1])
            if chars >= share:
                break
    return texts


def build_rows(tokenizer, preset: BasePreset, seed: int) -> TokenRows:
    """All training rows of a build: packed chat turns and chunked raw code, in a seeded order."""
    chat = _chat_sequences(tokenizer, preset, seed)
    rows = _pack(chat, preset.seq_len, tokenizer.pad_token_id)
    rows += _raw_code_rows(tokenizer, preset, seed)
    random.Random(f"rows/{seed}").shuffle(rows)
    data = TokenRows(*(torch.tensor([row[i] for row in rows], dtype=torch.long) for i in range(3)))
    logger.info("corpus: %d rows of %d tokens, %d loss tokens", len(data), preset.seq_len, data.loss_tokens)
    return data


def _chat_sequences(tokenizer, preset: BasePreset, seed: int) -> list[tuple[list[int], list[int]]]:
    examples = generate_math(preset.math_examples, split="train", seed=seed) if preset.math_examples else []
    if preset.code_examples:
        examples += generate_code(preset.code_examples, split="train", seed=seed)
    sequences = []
    for ids, prompt_len in encode_chat_examples(tokenizer, [(e.prompt, e.answer) for e in examples]):
        if len(ids) <= preset.seq_len:
            sequences.append((ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))
    random.Random(f"chat/{seed}").shuffle(sequences)
    return sequences


def _pack(sequences, seq_len: int, pad_id: int, open_rows: int = 16) -> list[tuple[list[int], ...]]:
    """First-fit packing of whole sequences into rows (among the last ``open_rows`` rows).

    Next-fit would waste about half a chat turn per row (a quarter of the compute at 256 tokens); looking
    back over a few open rows fills them to about 90%. The tail of a row is padding without loss.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for seq_ids, seq_labels in sequences:
        for ids, labels, positions in rows[-open_rows:]:
            if len(ids) + len(seq_ids) <= seq_len:
                ids.extend(seq_ids)
                labels.extend(seq_labels)
                positions.extend(range(len(seq_ids)))
                break
        else:
            rows.append((list(seq_ids), list(seq_labels), list(range(len(seq_ids)))))
    return [_pad(ids, labels, positions, seq_len, pad_id) for ids, labels, positions in rows]


def _pad(ids: list[int], labels: list[int], positions: list[int], seq_len: int, pad_id: int):
    """Pad to ``seq_len``; padding continues the last sequence's positions and, being last, affects nothing."""
    missing = seq_len - len(ids)
    tail = range(positions[-1] + 1, positions[-1] + 1 + missing)
    return ids + [pad_id] * missing, labels + [IGNORE_INDEX] * missing, positions + list(tail)


def _raw_code_rows(tokenizer, preset: BasePreset, seed: int) -> list[tuple[list[int], ...]]:
    if not preset.raw_code_chars:
        return []
    texts = stdlib_corpus("train", max_chars=preset.raw_code_chars, seed=seed)
    separator = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    # The backend tokenizer directly: batched in Rust and free of the max-length warning of the wrapper.
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(separator)
    n = preset.seq_len
    return [(stream[i : i + n], stream[i : i + n], list(range(n))) for i in range(0, len(stream) - n + 1, n)]

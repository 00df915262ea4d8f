"""Trajectory recorder, schema, prompts and backends (no Ray): the data contract packing relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from jf_ray.decoding import DecodeConfig, generate
from jf_ray.errors import UserInputError
from jf_ray.packing.schedules import noise_ratio
from jf_ray.storage import DatasetWriter, read_dataset
from jf_ray.trajectories import (
    TRAJECTORY_COLUMNS,
    TRAJECTORY_SCHEMA,
    BackendSpec,
    Prompt,
    TrajectoryError,
    TransformersBackend,
    make_backend,
    read_prompts,
    record_trajectories,
    text_prompt_id,
    trajectory_rows,
)
from jf_ray.trajectories.recorder import whole_block_cap

PROMPT_TEXTS = [
    "def add(a, b):",
    "Write a loop that prints the numbers from one to ten.",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "import os\nprint(os.getcwd())",
]


def build_tiny_checkpoint(path: Path, seed: int = 0, num_attention_heads: int = 4) -> Path:
    """A random tiny Qwen2 + a byte-level BPE tokenizer with a chat template, saved as an HF checkpoint.

    Hidden size 64: 4 heads (head size 16) by default; vLLM's CPU attention needs 2 (head size 32)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(PROMPT_TEXTS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        initializer_range=0.3,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def greedy_ar(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Reference greedy AR without any cache: one full forward per token."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token in eos_ids:
                break
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def backend(checkpoint):
    return TransformersBackend.from_spec(BackendSpec(model=str(checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def prompts():
    return [Prompt(text_prompt_id(t), t) for t in PROMPT_TEXTS]


def _by_prompt(table: pa.Table) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["prompt_id"], []).append(row)
    return {k: sorted(v, key=lambda r: r["block_index"]) for k, v in rows.items()}


@pytest.mark.parametrize("block_size,batch_size", [(1, 2), (4, 5), (7, 1), (16, 3)])
def test_fixed_points_concatenate_to_greedy_ar(backend, prompts, block_size, batch_size):
    batch = record_trajectories(
        backend,
        prompts,
        block_size=block_size,
        max_new_tokens=23,
        batch_size=batch_size,
        seed=3,
        model_id="tiny",
        round_index=2,
    )
    assert batch.table.schema.equals(TRAJECTORY_SCHEMA.tagged_arrow())
    by_prompt = _by_prompt(batch.table)
    eos = backend.eos_token_ids()
    for prompt, ids in zip(prompts, backend.encode_prompts([p.text for p in prompts])):
        rows = by_prompt[prompt.id]
        response = [t for r in rows for t in r["fixed_point"]]
        # The cap is rounded up to a whole block, as in the official recorder.
        assert response == greedy_ar(backend.model, ids, whole_block_cap(23, block_size), eos)
        assert [r["block_index"] for r in rows] == list(range(len(rows)))
        for row in rows:
            assert row["prefix_ids"] == ids + response[: row["block_index"] * block_size]
            assert row["prompt_len"] == len(ids) and row["block_size"] == block_size
            assert row["states"][-1] == row["fixed_point"]
            assert all(len(s) == len(row["fixed_point"]) for s in row["states"])
            assert (row["model_id"], row["round"]) == ("tiny", 2)
    assert batch.stats.tokens == sum(len(r["fixed_point"]) for r in batch.table.to_pylist())


def test_noise_ratio_never_increases_and_state_zero_is_the_real_draft(backend, prompts):
    batch = record_trajectories(
        backend,
        prompts,
        block_size=8,
        max_new_tokens=40,
        batch_size=5,
        seed=0,
        model_id="tiny",
        round_index=1,
    )
    first_ratios = []
    for row in batch.table.to_pylist():
        ratios = [noise_ratio(s, row["fixed_point"]) for s in row["states"]]
        assert all(a >= b for a, b in zip(ratios, ratios[1:])), ratios
        assert ratios[-1] == 0.0
        # The head of every draft is already verified, so even the initial draft has ratio <= (n-1)/n.
        assert ratios[0] <= (len(row["fixed_point"]) - 1) / len(row["fixed_point"])
        first_ratios.append(ratios[0])
    # Unlike the official data (state 0 == fixed point), real random drafts are noisy.
    assert max(first_ratios) > 0.5


def test_eos_ends_the_response_inside_a_block(checkpoint, prompts):
    from jf_ray.modeling import load_model, load_tokenizer

    model, tokenizer = load_model(str(checkpoint), device="cpu"), load_tokenizer(str(checkpoint))
    plain = TransformersBackend(model, tokenizer)
    ids = plain.encode_prompts([prompts[0].text])[0]
    reference = greedy_ar(model, ids, 30, [])
    eos_id = reference[9]  # some token the model emits mid-way: declare it the EOS
    model.generation_config.eos_token_id = eos_id
    backend = TransformersBackend(model, tokenizer)
    assert eos_id in backend.eos_token_ids()
    batch = record_trajectories(
        backend,
        prompts[:1],
        block_size=4,
        max_new_tokens=30,
        batch_size=1,
        seed=0,
        model_id="m",
        round_index=1,
    )
    rows = batch.table.to_pylist()
    response = [t for r in rows for t in r["fixed_point"]]
    cut = reference.index(eos_id) + 1
    assert response == reference[:cut]
    assert [r["ends_with_eos"] for r in rows] == [False] * (len(rows) - 1) + [True]
    assert len(rows[-1]["fixed_point"]) == (cut - 1) % 4 + 1  # the last block is cut right after EOS


def test_token_cap_does_not_mark_eos(backend, prompts):
    batch = record_trajectories(
        backend,
        prompts[:2],
        block_size=5,
        max_new_tokens=12,
        batch_size=2,
        seed=0,
        model_id="m",
        round_index=1,
    )
    rows = _by_prompt(batch.table)
    for prompt_rows in rows.values():
        assert [len(r["fixed_point"]) for r in prompt_rows] == [5, 5, 5]  # 12 rounded up to whole blocks
        assert not any(r["ends_with_eos"] for r in prompt_rows)


def test_inconsistent_trajectory_is_rejected(backend, prompts):
    ids = backend.encode_prompts([prompts[0].text])
    config = DecodeConfig(decoder="jacobi", block_size=4, max_new_tokens=9, record_trajectory=True, seed=0)
    [result] = generate(backend.model, ids, config, backend.eos_token_ids(), batch_size=1)
    kwargs = dict(block_size=4, model_id="m", round_index=1, eos_ids=[], max_tokens=8)
    assert len(trajectory_rows("p", ids[0], result, **kwargs)) == 2  # 9 tokens cut to 8: two blocks
    result.trajectory[1].states[-1] = [t + 1 for t in result.trajectory[1].states[-1]]
    with pytest.raises(TrajectoryError, match="last state is not the fixed point"):
        trajectory_rows("p", ids[0], result, **kwargs)
    result.trajectory[1].states[-1] = list(result.trajectory[1].fixed_point)
    result.token_ids[3] += 1
    with pytest.raises(TrajectoryError, match="do not concatenate"):
        trajectory_rows("p", ids[0], result, **kwargs)
    result.token_ids.append(0)  # a token no block accounts for
    with pytest.raises(TrajectoryError, match="covers 9 of 10 response tokens"):
        trajectory_rows("p", ids[0], result, **kwargs)


def test_rows_roundtrip_through_a_dataset_with_packing_columns(backend, prompts, tmp_path):
    batch = record_trajectories(
        backend, prompts, block_size=4, max_new_tokens=9, batch_size=5, seed=0, model_id="m", round_index=1
    )
    writer = DatasetWriter(str(tmp_path / "traj"), TRAJECTORY_SCHEMA)
    writer.write_shard("shard-00000", batch.table)
    writer.commit()
    table = read_dataset(str(tmp_path / "traj"), required_columns=TRAJECTORY_COLUMNS, schema=TRAJECTORY_SCHEMA)
    assert table.to_pylist() == batch.table.to_pylist()


def test_read_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a", "id": 7}, {"prompt": "b"}, {"prompt": "b"}, {"prompt": "c", "id": "x"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    prompts = read_prompts(f"file://{path}")
    assert [p.id for p in prompts] == ["7", text_prompt_id("b"), "x"]
    assert text_prompt_id("b") == text_prompt_id("b") != text_prompt_id("c")
    path.write_text('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n')
    with pytest.raises(UserInputError, match="line 2: id '1' is used by two different prompts"):
        read_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserInputError, match='line 2: expected an object with a string "prompt"'):
        read_prompts(str(path))
    path.write_text("{oops\n")
    with pytest.raises(UserInputError, match="line 1: not valid JSON"):
        read_prompts(str(path))
    with pytest.raises(UserInputError, match="not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))


class _EchoBackend:
    """A backend loaded by dotted name, as a vLLM backend would be."""

    def __init__(self, spec):
        self.spec = spec

    def eos_token_ids(self):
        return []

    def encode_prompts(self, texts):
        return [[1] for _ in texts]

    def jacobi_trajectories(self, prompt_ids, block_size, max_new_tokens, batch_size, seed, progress=None):
        return []


def test_backend_by_dotted_name():
    backend = make_backend(BackendSpec(name="test_trajectories:_EchoBackend", model="m"))
    assert isinstance(backend, _EchoBackend) and backend.spec.model == "m"
    with pytest.raises(UserInputError, match="unknown backend 'sglang'"):
        make_backend(BackendSpec(name="sglang"))
    with pytest.raises(UserInputError, match="cannot import backend"):
        make_backend(BackendSpec(name="no_such_module_xyz:Backend"))
    with pytest.raises(TrajectoryError, match="0 results for 1 prompts"):
        record_trajectories(
            backend,
            [Prompt("a", "a")],
            block_size=2,
            max_new_tokens=2,
            batch_size=1,
            seed=0,
            model_id="m",
            round_index=1,
        )

"""The embedded base model: tokenizer, checkpoint format, content-hash cache, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from jf_ray.basemodel import BUILD_INFO, build_base, content_hash, read_build_info, resolve_preset
from jf_ray.basemodel.corpus import IGNORE_INDEX, build_rows
from jf_ray.basemodel.pretrain import sequence_mask
from jf_ray.basemodel.tokenizer import IM_END, train_tokenizer
from jf_ray.cli.main import main
from jf_ray.errors import UserInputError
from jf_ray.modeling import encode_chat_examples, encode_prompt, eos_token_ids

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Ava has 12 apples. Then Ava finds 7 more apples.\nAfter finding 7 more: 12 + 7 = 19.\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
] * 20


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x ** 2  # tab\n",
        "Zoë paid 1234567890 € — ✓ 🙂\r\n  trailing  ",
        "<b>unseen words</b> \x00 \\ \" '",
    ],
)
def test_tokenizer_round_trips_text(small_tokenizer, text):
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == text


def test_tokenizer_splits_numbers_into_digits(small_tokenizer):
    ids = small_tokenizer("x = 2026 + 19", add_special_tokens=False)["input_ids"]
    tokens = small_tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["2", "0", "2", "6", "1", "9"]


def test_chat_encoding_matches_inference_prompt(small_tokenizer):
    [(ids, prompt_len)] = encode_chat_examples(small_tokenizer, [("Ava has 12 apples.", "The answer is 12.")])
    assert ids[:prompt_len] == encode_prompt(small_tokenizer, "Ava has 12 apples.")
    assert small_tokenizer.decode(ids[prompt_len:]) == f"The answer is 12.{IM_END}"
    assert small_tokenizer.decode(ids[:prompt_len]) == (
        "<|im_start|>user\nAva has 12 apples.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_micro_checkpoint_loads_with_auto_classes(micro_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(micro_checkpoint)
    assert model.config.model_type == "qwen2"
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END and eos_token_ids(model, tokenizer) == [im_end]
    assert model.generation_config.eos_token_id == im_end
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != im_end
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = encode_prompt(tokenizer, "Ava has 3 apples.")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(prompt)
    info = read_build_info(micro_checkpoint)
    assert info["preset_name"] == "micro" and info["parameters"] == model.num_parameters()


def test_corpus_masks_prompts_and_uses_train_split_only(micro_checkpoint):
    from transformers import AutoTokenizer

    from jf_ray.workloads.math import generate_math

    tokenizer = AutoTokenizer.from_pretrained(micro_checkpoint)
    rows = build_rows(tokenizer, resolve_preset("micro", ["raw_code_chars=0", "code_examples=0"]), seed=0)
    text = tokenizer.decode(rows.input_ids.flatten())
    assert all(p.prompt not in text for p in generate_math(50, "heldout", seed=0))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Every chat turn's prompt (from <|im_start|>user on) carries no loss; its answer does.
    assert (rows.labels[rows.input_ids == im_start] == IGNORE_INDEX).all()
    assert (rows.labels != IGNORE_INDEX).sum() > 0
    # Each chat turn starts at position 0, so training sees every turn as inference will.
    starts = rows.position_ids == 0
    assert (rows.input_ids[starts] == im_start).all() and starts.sum() > len(rows)


def test_packed_rows_attend_only_within_their_sequence():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config).eval()
    first, second = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 5))
    positions = torch.tensor([list(range(7)) + list(range(5))])
    packed = model(
        input_ids=torch.cat([first, second], 1),
        position_ids=positions,
        attention_mask=sequence_mask(positions),
    ).logits
    torch.testing.assert_close(packed[:, :7], model(input_ids=first).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 7:], model(input_ids=second).logits, atol=1e-5, rtol=1e-4)


def test_build_reuses_cache_and_rebuilds_on_change(micro_checkpoint, tmp_path):
    weights = Path(micro_checkpoint) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_base(micro_checkpoint, preset="micro", seed=0) == Path(micro_checkpoint)
    assert weights.stat().st_mtime_ns == before
    target = tmp_path / "ckpt"
    build_base(target, preset="micro", seed=0, overrides=["steps=2"], num_threads=1)
    first = read_build_info(target)
    assert first["preset"]["steps"] == 2 and first["content_hash"] != read_build_info(micro_checkpoint)["content_hash"]
    build_base(target, preset="micro", seed=1, overrides=["steps=2"], num_threads=1)
    assert read_build_info(target)["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_content_hash_covers_preset_and_seed():
    micro = resolve_preset("micro")
    assert content_hash(micro, 0) == content_hash(resolve_preset("micro"), 0)
    assert content_hash(micro, 0) != content_hash(micro, 1)
    assert content_hash(micro, 0) != content_hash(resolve_preset("micro", ["lr=0.001"]), 0)


def test_build_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not a base-model build"):
        build_base(tmp_path, preset="micro", overrides=["steps=1"])


def test_bad_presets_are_user_errors():
    with pytest.raises(UserInputError, match="unknown preset"):
        resolve_preset("huge")
    with pytest.raises(UserInputError, match="unknown preset field"):
        resolve_preset("micro", ["layers=3"])
    with pytest.raises(UserInputError, match="num_heads"):
        resolve_preset("micro", ["hidden_size=33"])


def _fingerprint(path: Path) -> dict:
    files = ("model.safetensors", "tokenizer.json", "config.json")
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in files}


def test_micro_build_is_deterministic(micro_checkpoint, tmp_path):
    again = build_base(tmp_path / "again", preset="micro", seed=0, force=True, num_threads=1)
    assert _fingerprint(again) == _fingerprint(Path(micro_checkpoint))


@pytest.mark.slow
def test_tiny_build_is_deterministic(tmp_path):
    first = build_base(tmp_path / "a", preset="tiny", seed=0, num_threads=1)
    second = build_base(tmp_path / "b", preset="tiny", seed=0, num_threads=1)
    assert _fingerprint(first) == _fingerprint(second)
    info = read_build_info(first)
    assert info["final_loss"] < 3.0  # learnt something: a uniform guess over the vocabulary is ~6.9


def test_cli_base_build(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["base", "build", "--out", str(out), "--preset", "micro", "--threads", "1", "--set", "steps=2"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.index("}") + 1])["preset_name"] == "micro"
    assert (out / BUILD_INFO).is_file() and (out / "model.safetensors").is_file()
    assert main(["base", "build", "--out", str(out), "--preset", "micro", "--set", "nonsense=1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["base", "build", "--out", str(out), "--preset", "huge"])
    assert exc.value.code == 2

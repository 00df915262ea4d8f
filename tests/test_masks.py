"""Noise-aware attention masks over packed sequences (docs/method-notes.md §5; §10 items 4-5)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from jf_ray.training.batches import TrainSequence, assign_rows, collate
from jf_ray.training.loop import packed_forward
from jf_ray.training.masks import CLEAN, NOISY, PAD, PROMPT, allowed_keys, flex_block_mask

VOCAB = 64


def tiny_model(attn: str = "sdpa", seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn).eval()


def random_sequence(rng: random.Random, prompt_len: int, block_lens: list[int]) -> TrainSequence:
    prompt = [rng.randrange(VOCAB) for _ in range(prompt_len)]
    clean = [[rng.randrange(VOCAB) for _ in range(n)] for n in block_lens]
    noisy = [[t if rng.random() < 0.3 else rng.randrange(VOCAB) for t in block] for block in clean]
    return TrainSequence(prompt, noisy, clean)


def ascii_rows(kind: str, window: int = 16) -> list[str]:
    """The mask of one sequence with P = 2, n = 2, N = 3 as rows of 'X' / '.' (docs/method-notes.md §5)."""
    item = TrainSequence([1, 2], [[3, 4]] * 3, [[5, 6]] * 3)
    batch = collate([item])
    allowed = allowed_keys(batch.segment, batch.block, batch.seq, kind, window)[0]
    return ["".join("X" if v else "." for v in row.tolist()) for row in allowed]


NC_EXPECTED = [
    "X.............",
    "XX............",
    "XXX...........",
    "XXXX..........",
    "XX..X.........",
    "XX..XX........",
    "XXXX..X.......",
    "XXXX..XX......",
    "XX..XX..X.....",
    "XX..XX..XX....",
    "XXXX..XX..X...",
    "XXXX..XX..XX..",
    "XX..XX..XX..X.",
    "XX..XX..XX..XX",
]


def test_nc_mask_matches_the_verified_matrix():
    assert ascii_rows("nc") == NC_EXPECTED


def test_clean_context_and_windowed_variants_match_the_method():
    clean_context = ascii_rows("clean_context")
    assert clean_context[6] == "XX..XXX......."  # n1.0 sees c0, not n0
    assert clean_context[11] == "XX..XX..XXXX.."  # n2.1 sees c0, c1
    nc_ic = ascii_rows("nc_ic", window=2)
    assert nc_ic[6:8] == NC_EXPECTED[6:8]  # block 1 shares block 0's window: noisy context
    assert nc_ic[10] == "XX..XX..XXX..."  # block 2 starts a new window: clean blocks of the previous one
    assert len(nc_ic) == len(NC_EXPECTED)
    same_rows = [i for i in range(len(nc_ic)) if i not in (10, 11)]
    assert [nc_ic[i] for i in same_rows] == [NC_EXPECTED[i] for i in same_rows]


@pytest.mark.parametrize("kind", ["nc", "clean_context", "nc_ic"])
def test_mask_invariants_on_padded_and_multi_sequence_rows(kind):
    rng = random.Random(1)
    items = [random_sequence(rng, rng.randint(1, 5), [4] * rng.randint(1, 4) + [rng.randint(1, 4)]) for _ in range(6)]
    for max_row_tokens in (None, 64):
        batch = collate(items, max_row_tokens=max_row_tokens)
        allowed = allowed_keys(batch.segment, batch.block, batch.seq, kind, window=2)
        length = batch.segment.shape[1]
        q_seg, k_seg = batch.segment[:, :, None], batch.segment[:, None, :]
        later = torch.arange(length)[None, :] > torch.arange(length)[:, None]
        assert not (allowed & later).any(), "a query sees a later packed index"
        same_seq = batch.seq[:, :, None] == batch.seq[:, None, :]
        larger_pos = batch.position_ids[:, None, :] > batch.position_ids[:, :, None]
        assert not (allowed & same_seq & larger_pos).any(), "a query sees a larger position id"
        assert not (allowed & ~same_seq).any(), "a query sees another sequence of its row"
        assert allowed.diagonal(dim1=1, dim2=2).all(), "every token sees itself"
        assert not (allowed & (q_seg == CLEAN) & (k_seg == NOISY)).any(), "a clean query sees a noisy token"
        assert not (allowed & (q_seg == PROMPT) & (k_seg != PROMPT)).any()
        assert not (allowed & (k_seg == PAD) & (q_seg != PAD)).any(), "a real token sees padding"
        if kind == "nc":
            assert not (allowed & (q_seg == NOISY) & (k_seg == CLEAN)).any(), "an NC noisy query sees a clean block"


def test_shared_position_ids_for_noisy_and_clean_copies():
    batch = collate([TrainSequence([1, 2], [[3, 4], [5, 6], [7]], [[3, 4], [9, 9], [8]])])
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 6]


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_row_tokens", [None, 96])
def test_packed_forward_reproduces_plain_causal_forwards(attn, max_row_tokens):
    """Clean stream == plain forward over prompt + response; noisy stream == plain forward over prompt +
    noisy blocks (NC), whatever else shares the row."""
    model = tiny_model(attn)
    rng = random.Random(2)
    items = [random_sequence(rng, rng.randint(2, 6), [4, 4, 4, rng.randint(1, 4)]) for _ in range(3)]
    batch = collate(items, max_row_tokens=max_row_tokens)
    with torch.no_grad():
        logits = packed_forward(model, batch, kind="nc", attn=attn)
    for index, item in enumerate(items):
        row, slot = _locate(index, items, max_row_tokens)
        mine = batch.seq[row] == slot
        seg, got = batch.segment[row][mine], logits[row][mine]
        clean_stream = item.prompt_ids + [t for b in item.clean_blocks for t in b]
        noisy_stream = item.prompt_ids + [t for b in item.noisy_blocks for t in b]
        clean_ref, noisy_ref = plain_logits(model, clean_stream), plain_logits(model, noisy_stream)
        prompt_len = len(item.prompt_ids)
        torch.testing.assert_close(got[seg != NOISY], clean_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[seg == NOISY], noisy_ref[prompt_len:], atol=1e-5, rtol=1e-4)
    if max_row_tokens is not None:
        assert batch.input_ids.shape[0] < len(items), "rows should hold several sequences"


def _locate(index, items, max_row_tokens) -> tuple[int, int]:
    """(row, seq label) the ``index``-th item got (rows are filled first-fit decreasing)."""
    for row, members in enumerate(assign_rows([len(i) for i in items], max_row_tokens)):
        if index in members:
            return row, members.index(index)
    raise AssertionError("item not placed")


def test_clean_context_noisy_stream_conditions_on_clean_blocks():
    model = tiny_model("sdpa")
    item = random_sequence(random.Random(3), 3, [4, 4, 4])
    batch = collate([item])
    with torch.no_grad():
        logits = packed_forward(model, batch, kind="clean_context")[0]
    last_noisy = (batch.segment[0] == NOISY) & (batch.block[0] == 2)
    stream = item.prompt_ids + item.clean_blocks[0] + item.clean_blocks[1] + item.noisy_blocks[2]
    torch.testing.assert_close(logits[last_noisy], plain_logits(model, stream)[-4:], atol=1e-5, rtol=1e-4)


def test_flex_block_mask_is_the_same_rule_as_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    batch = collate([random_sequence(random.Random(4), 3, [4, 4, 2]), random_sequence(random.Random(5), 2, [4])])
    length = batch.segment.shape[1]
    for kind in ("nc", "clean_context", "nc_ic"):
        block_mask = flex_block_mask(batch.segment, batch.block, batch.seq, kind, window=2)
        dense = create_mask(block_mask.mask_mod, batch.segment.shape[0], None, length, length)[:, 0]
        assert torch.equal(dense, allowed_keys(batch.segment, batch.block, batch.seq, kind, window=2))

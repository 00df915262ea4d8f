"""Serving end to end: the service with its batching thread (no Ray), then the Serve app over real HTTP with
the ``openai`` client on a local Ray cluster (one app shared by the module).

The checkpoint is a tiny randomly initialised Qwen2 with a byte-level BPE tokenizer and a chat template,
built here: its greedy outputs are long and rarely hit EOS, which the overload and disconnect tests need.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
import urllib.request

import pytest
import torch

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROMPT = "def parse(value):\n    return"


def build_tiny_checkpoint(out_dir: str, context: int = 192) -> str:
    """Random tiny Qwen2 + byte-level BPE (special tokens, chat template) saved as an HF checkpoint.

    A large init std gives peaked, varied next-token distributions: greedy outputs are diverse text (so
    Jacobi decoding has real work to do), not one repeated token.
    """
    import json as json_module
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [inspect.getsource(m) for m in (json_module.decoder, json_module.encoder, textwrap)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=True, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("serve_ckpt")))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint loaded plainly, for greedy AR references with transformers' own ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return type("Reference", (), {"tokenizer": tokenizer, "greedy": staticmethod(greedy),
                                  "text": staticmethod(text)})


@pytest.fixture(scope="module")
def service(checkpoint):
    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.service import CompletionService

    svc = CompletionService(ServeConfig(model=checkpoint, max_batch_size=4, max_queued_requests=2))
    yield svc
    svc.shutdown()


def completion(service, **fields):
    from jf_ray.serving.protocol import CompletionRequest

    return service.prepare_completion(CompletionRequest(model=service.model_name, **fields))


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ service, no Ray
def test_service_greedy_decoders_equal_transformers_ar(service, reference):
    from jf_ray.serving.service import run_to_end

    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference.greedy(prompt_ids, 48)
    for decoder in ("ar", "jacobi", "mr", "lookup"):
        text, finish, usage = run(run_to_end(service, completion(service, prompt=PROMPT, max_tokens=48,
                                                                 decoder=decoder)))
        assert text == reference.text(expected), decoder
        assert usage.completion_tokens == len(expected)
        assert usage.tokens_per_forward == pytest.approx(usage.completion_tokens / usage.forwards, abs=1e-3)
        if decoder == "ar":
            assert usage.forwards == usage.completion_tokens


def test_scheduler_rejects_beyond_capacity(service):
    from jf_ray.decoding import DecodeConfig, DecodingEngine
    from jf_ray.serving.scheduler import BatchScheduler, QueueFullError

    engine = DecodingEngine(service.model, service.eos_token_ids, max_batch_size=2)
    scheduler = BatchScheduler(engine, max_batch_size=2, max_queued_requests=1)  # thread not started

    async def fill():
        for i in range(3):
            scheduler.submit(f"r{i}", [1, 2, 3], DecodeConfig(max_new_tokens=4))
        with pytest.raises(QueueFullError, match="overloaded"):
            scheduler.submit("r3", [1, 2, 3], DecodeConfig(max_new_tokens=4))
        scheduler.abort("r0")  # a freed slot admits the next one
        scheduler.submit("r4", [1, 2, 3], DecodeConfig(max_new_tokens=4))

    run(fill())
    assert scheduler.stats.rejected == 1 and scheduler.num_active == 3


def test_closing_a_stream_frees_its_batch_slot(service):
    async def read_one_chunk_then_leave():
        chunks = service.start(completion(service, prompt=PROMPT, max_tokens=150, decoder="ar"))
        first = await chunks.__anext__()
        assert service.scheduler.num_active == 1
        await chunks.aclose()  # what a client disconnect does to the response generator
        return first

    aborted = service.scheduler.stats.aborted
    assert run(read_one_chunk_then_leave()).finish_reason is None
    assert service.scheduler.num_active == 0 and service.scheduler.stats.aborted == aborted + 1
    deadline = time.monotonic() + 10
    while service.scheduler.engine.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not service.scheduler.engine.has_work  # the engine dropped it too, long before 150 tokens


def test_stop_string_ends_the_text_before_it(service):
    from jf_ray.serving.service import run_to_end

    full, _, _ = run(run_to_end(service, completion(service, prompt=PROMPT, max_tokens=40)))
    stop = full[12:15]
    text, finish, usage = run(run_to_end(service, completion(service, prompt=PROMPT, max_tokens=40, stop=[stop])))
    assert text == full[: full.index(stop)]
    assert finish == "stop" and usage.completion_tokens < 40

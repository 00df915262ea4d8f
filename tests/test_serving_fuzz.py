"""Hostile requests to the OpenAI endpoints, generated with hypothesis: wrong types, missing and unknown fields,
huge, negative and NaN numbers, deep nesting, unpaired surrogates, prompts past the context, ``max_tokens``
past the limit, thousands of stop strings. Each must be a 4xx naming the field, never a 5xx, and the server
keeps serving.

First the validation layer in-process (``parse_request`` + ``CompletionService.prepare_*``, what the routes
run before a request reaches the engine), for many cases; then the Serve app over real HTTP (one app for the
module) with a few hundred generated bodies, raw bodies JSON cannot describe (invalid UTF-8, deep nesting,
bodies past ``max_request_bytes``), and the API key on every route.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import build_tiny_checkpoint

from jf_ray.serving.protocol import UNSUPPORTED_FIELDS, APIError, ChatCompletionRequest, CompletionRequest

NAME = "fuzz-model-7f3a"  # unusual, so that a leak of the served name is found in any body
API_KEY = "fuzz-key"
BODY_LIMIT = 64 * 1024
OUTCOMES: Counter = Counter()
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

COMPLETION = {"model": NAME, "prompt": "def parse(value):", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
ENDPOINTS = {"/v1/completions": (CompletionRequest, COMPLETION), "/v1/chat/completions": (ChatCompletionRequest, CHAT)}
SHARED = [
    *("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n"),
    *("presence_penalty", "frequency_penalty", "user", "decoder", *UNSUPPORTED_FIELDS),
]
FIELDS = {
    "/v1/completions": ["prompt", "logprobs", "echo", "suffix", *SHARED],
    "/v1/chat/completions": ["messages", "max_completion_tokens", "logprobs", "top_logprobs", *SHARED],
}
PROMPT_FIELDS = {"prompt", "messages"}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, -1, 0, 1, 161, 4097]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), 1e-45, 5e-324, -0.0, 1e308]),
    st.text(max_size=20),
    st.sampled_from(["", " ", "5", "\ud800", "x\udfffy", "\x00", "ar", "mr", "text", NAME, "\u2028"]),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BIG = st.sampled_from(
    [
        "x " * 20_000,  # a prompt far past the context (192 tokens)
        "y " * 95,  # a prompt at the edge of it
        ["stop"] * 5000,  # thousands of stop strings
        ["s" * 5000],  # one huge stop string
        list(range(5000)),  # token ids past the context
        [{"role": "user", "content": "hi"}] * 2000,
        [{"role": "user", "content": [{"type": "text", "text": "a"}] * 500}],
        [{"role": "user", "content": "\ud800"}],
        [{"role": "robot", "content": "hi"}],
        [399, 400, 10**20],
        nested(200),
    ]
)
HOSTILE = st.one_of(JSON_VALUES, BIG)


@st.composite
def hostile_bodies(draw, path: str):
    """A valid body with one field changed, removed, or joined by an unknown one: ``(body, field)``."""
    body = dict(ENDPOINTS[path][1])
    action = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
    if action == "unknown":
        field = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS[path]))
        body[field] = draw(HOSTILE)
        return body, None
    field = draw(st.sampled_from(FIELDS[path] if action == "set" else sorted(body)))
    if action == "delete":
        del body[field]
    else:
        body[field] = draw(HOSTILE)
    return body, field


def check_error(status: int, error: dict, field: str | None, body: dict) -> None:
    """A 4xx whose ``param`` is the field that was changed (and whose message names it)."""
    assert 400 <= status < 500, error
    param = error["param"]
    if param is None:  # body-level problems only: JSON or shape
        return
    assert param in error["message"], error
    allowed = {field}
    if field in PROMPT_FIELDS:  # a longer prompt leaves less room for the completion
        allowed.add("max_tokens")
    if field == "logprobs" and "top_logprobs" in body:
        allowed.add("top_logprobs")
    assert param in allowed, (field, error)


# ---------------------------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("fuzz_ckpt")))


@pytest.fixture(scope="module")
def service(checkpoint):
    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.service import CompletionService

    config = ServeConfig(
        model=checkpoint, model_name=NAME, max_tokens_limit=160, default_max_tokens=8, engine_process=False
    )
    svc = CompletionService(config)
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """Cases per endpoint and what they got (``pytest -s`` shows them)."""
    yield
    print("\nserving fuzz outcomes:", json.dumps(dict(sorted(OUTCOMES.items())), indent=1))


def validate(service, path: str, body: dict) -> tuple[int, dict | None]:
    """What the route does before the engine: (200, None) or (status, OpenAI error)."""
    from jf_ray.serving.protocol import parse_request

    cls = ENDPOINTS[path][0]
    try:
        request = parse_request(cls, body)
        (service.prepare_chat if cls is ChatCompletionRequest else service.prepare_completion)(request)
    except APIError as exc:
        # what Starlette's JSONResponse does with it: strict JSON, UTF-8
        json.dumps(exc.body(), ensure_ascii=False, allow_nan=False).encode()
        return exc.status, exc.body()["error"]
    return 200, None


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_hostile_bodies_are_4xx_naming_the_field_in_process(service, path):
    @settings(FUZZ, max_examples=400)
    @given(case=hostile_bodies(path))
    def check(case):
        body, field = case
        status, error = validate(service, path, body)
        if status != 200:
            check_error(status, error, field, body)
        OUTCOMES[f"in-process {path} {status}"] += 1

    check()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_random_json_values_as_bodies_are_4xx(service, path):
    @settings(FUZZ, max_examples=200)
    @given(body=st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(FIELDS[path]), HOSTILE, max_size=6)))
    def check(body):
        status, error = validate(service, path, body)
        if status != 200:
            assert 400 <= status < 500, error
        OUTCOMES[f"in-process random {path} {status}"] += 1

    check()


def test_the_limits_name_their_field(service):
    cases = [
        ("/v1/completions", {"prompt": "x " * 400}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"max_tokens": 161}, "max_tokens", None),
        ("/v1/completions", {"stop": ["s"] * 17}, "stop", None),
        ("/v1/completions", {"stop": ["s" * 257]}, "stop", None),
        ("/v1/completions", {"seed": 2**64}, "seed", None),
        ("/v1/completions", {"temperature": float("nan")}, "temperature", None),
        ("/v1/completions", {"prompt": "\ud800"}, "prompt", None),
        ("/v1/chat/completions", {"max_completion_tokens": 190, "max_tokens": None}, "max_completion_tokens", None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
            "messages",
            None,
        ),
    ]
    for path, change, param, code in cases:
        body = {k: v for k, v in {**ENDPOINTS[path][1], **change}.items() if v is not None}
        status, error = validate(service, path, body)
        assert (status, error["param"], error["code"]) == (400, param, code), error


def test_a_tiny_temperature_samples_instead_of_failing_the_batch(service):
    """1e-45 is 0 in float32: logits / temperature were inf, the softmax NaN, and the whole step failed."""
    from test_serving import run_to_end

    from jf_ray.serving.protocol import parse_request

    for temperature in (1e-45, 5e-324, 1e-30):
        request = parse_request(CompletionRequest, {**COMPLETION, "temperature": temperature, "seed": 3})
        text, finish, usage, _ = run_to_end(service, service.prepare_completion(request))
        assert finish in ("stop", "length") and usage.completion_tokens >= 1
    assert service.scheduler.alive


# ---------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    from ray import serve
    from ray_nodes import free_port

    from jf_ray.serving.config import ServeConfig
    from jf_ray.serving.deployment import build_app

    config = ServeConfig(
        model=checkpoint,
        model_name=NAME,
        api_key=API_KEY,
        max_tokens_limit=160,
        default_max_tokens=8,
        max_request_bytes=BODY_LIMIT,
        port=free_port(),
        app_name="fuzz",
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    yield f"http://{config.host}:{config.port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        yield http


def post(client, path: str, body) -> tuple[int, dict | str]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN as JSON's NaN, as clients do
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def assert_still_serving(client) -> None:
    status, out = post(client, "/v1/completions", COMPLETION)
    assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length"), out
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["alive"]


@pytest.mark.slow
def test_hostile_bodies_over_http_are_4xx_and_the_server_keeps_serving(client):
    @settings(FUZZ, max_examples=300)
    @given(path=st.sampled_from(list(ENDPOINTS)), data=st.data())
    def check(path, data):
        body, field = data.draw(hostile_bodies(path))
        status, out = post(client, path, body)
        OUTCOMES[f"http {path} {status}"] += 1
        if status == 200:
            streamed = isinstance(out, str)
            assert out.rstrip().endswith("data: [DONE]") if streamed else out["choices"][0]["finish_reason"]
        else:
            check_error(status, out["error"], field, body)

    check()
    assert_still_serving(client)


@pytest.mark.slow
def test_bodies_json_cannot_describe_and_bodies_past_the_limit(client):
    completion = json.dumps(COMPLETION).encode()
    cases = {
        "invalid UTF-8": (completion[:-1] + b', "user": "\xff\xfe"}', 400),
        "deeply nested": (b'{"model": "x", "prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400),
        "a 5000-digit integer": (completion[:-1] + b', "seed": 1' + b"0" * 5000 + b"}", 400),
        "NaN": (completion[:-1] + b', "temperature": NaN}', 400),
        "not an object": (b"[1, 2]", 400),
        "empty": (b"", 400),
        "truncated": (completion[:-5], 400),
        "5 MB": (completion[:-1] + b', "user": "' + b"u" * 5_000_000 + b'"}', 413),
        "just past the limit": (completion[:-1] + b', "user": "' + b"u" * BODY_LIMIT + b'"}', 413),
    }
    for name, (body, expected) in cases.items():
        status, out = post(client, "/v1/completions", body)
        OUTCOMES[f"http raw {status}"] += 1
        assert status == expected and out["error"]["message"], (name, status, out)
        if expected == 413:
            assert "max_request_bytes" in out["error"]["message"] and out["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(100):
            yield b" " * 4096
        yield completion

    response = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert_still_serving(client)


@pytest.mark.slow
def test_the_api_key_guards_every_route_that_serves_or_reveals_the_model(server):
    import httpx

    routes = [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ]
    for key in (None, "wrong", API_KEY + "x", API_KEY.upper()):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in routes:
            body = json.dumps(ENDPOINTS.get(path, (None, COMPLETION))[1]).encode()
            response = httpx.request(method, server + path, content=body, headers=headers, timeout=30)
            assert response.status_code == 401 and NAME not in response.text, (key, path, response.text)
        # a body past the limit is refused for the key, before it is read
        response = httpx.post(server + "/v1/completions", content=b"x" * 200_000, headers=headers, timeout=30)
        assert response.status_code == 401
    # no route answers the served name without the key: health (for probes) keeps its counters only
    for path in ("/health", "/", "/docs", "/openapi.json", "/redoc", "/v1", "/v1/models/" + NAME, "/metrics"):
        response = httpx.get(server + path, timeout=30)
        assert response.status_code < 500 and NAME not in response.text, (path, response.text)
    assert httpx.get(server + "/health", timeout=30).json()["status"] == "ok"
    with_key = httpx.get(server + "/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    assert with_key["model"] == NAME

"""The Ray Serve application: a FastAPI ingress speaking the OpenAI HTTP API over :class:`CompletionService`.

``build_app(args)`` is a Serve application builder, so the same code serves ``jf-ray serve``, ``serve run
jf_ray.serving:app model=...`` and ``serve deploy cluster/serve_config.yaml``. This module is only wiring:
parsing bodies, auth, OpenAI/SSE formatting; validation and decoding live in ``service.py``.
"""

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from jf_ray.config import parse_override, set_dotted
from jf_ray.errors import UserInputError
from jf_ray.serving import protocol
from jf_ray.serving.config import ServeConfig
from jf_ray.serving.generation import PreparedRequest, TextChunk, collect_text
from jf_ray.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

api = FastAPI(title="jf-ray: Jacobi Forcing decoder, OpenAI-compatible")
REPLICA_HEADER = "x-jf-ray-replica"


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(UserInputError)
async def _user_input_error(_: Request, exc: UserInputError) -> JSONResponse:
    return JSONResponse(protocol.invalid_request(str(exc)).body(), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return JSONResponse(APIError(500, f"internal error: {exc}", "server_error").body(), status_code=500)


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body; a 413 past ``limit`` bytes (``max_request_bytes``), a 400 when it is no JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading it
        raise body_too_large(limit)
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body declares no length: count while reading
        raw += chunk
        if len(raw) > limit:
            raise body_too_large(limit)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8, an integer of > 4300 digits
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise protocol.invalid_request(f"request body is not valid JSON: {problem}") from None


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than this server's limit of {limit} bytes (max_request_bytes)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _text_chunk(rid: str, model: str, chat: bool, text: str, finish: str | None, usage=None, tokens=None) -> dict:
    if chat:
        delta = {"content": text} if text else {}
        return protocol.chat_chunk(rid, model, delta, finish, usage, protocol.chat_logprobs(tokens))
    return protocol.completion_chunk(rid, model, text, finish, usage, protocol.completion_logprobs(tokens))


@serve.deployment(name="JacobiDecoder")
@serve.ingress(api)
class JacobiDecoderDeployment:
    """One replica: a model, a continuous-batching engine thread and the OpenAI routes."""

    def __init__(self, config: dict) -> None:
        from jf_ray.modeling import set_torch_threads
        from jf_ray.serving.metrics import ServingMetrics
        from jf_ray.serving.service import CompletionService

        self.config = ServeConfig.from_dict(config)
        # Ray gives the replica num_cpus cores, its forwards one fewer: more threads than free cores stall them.
        set_torch_threads(self.config.forward_threads)
        replica = serve.get_replica_context().replica_id.unique_id
        self.headers = {REPLICA_HEADER: replica}  # which replica answered: for debugging and the scaling tests
        self.metrics = ServingMetrics(self.config.served_model_name, replica)
        self.service = CompletionService(self.config, self.metrics, self.metrics)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        if not self.service.scheduler.alive:
            raise RuntimeError("the decoding engine has stopped (its process or thread)")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.shutdown()

    def _key_ok(self, request: Request) -> bool:
        key = self.config.api_key
        sent = request.headers.get("authorization", "")
        return not key or hmac.compare_digest(sent.encode(), f"Bearer {key}".encode())

    def _authorize(self, request: Request) -> None:
        if not self._key_ok(request):
            raise APIError(
                401,
                "invalid or missing API key (Authorization: Bearer <key>)",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    @api.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        body = self.service.health()
        if not self._key_ok(request):  # health probes send no key; what is served is for key holders only
            del body["model"]
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return protocol.models_body(self.service.model_name)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = protocol.parse_request(CompletionRequest, await read_json(request, self.config.max_request_bytes))
        prepared = self.service.prepare_completion(body)
        return await self._respond(prepared, body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = protocol.parse_request(ChatCompletionRequest, await read_json(request, self.config.max_request_bytes))
        prepared = self.service.prepare_chat(body)
        return await self._respond(prepared, body, chat=True)

    async def _respond(self, prepared: PreparedRequest, body, chat: bool):
        try:
            chunks = self.service.start(prepared)
        except APIError:
            self.metrics.on_rejected()
            raise
        model = self.service.model_name
        if body.stream:
            events = self._sse_events(chunks, prepared.request_id, model, chat, body.include_usage_chunk)
            return StreamingResponse(events, media_type="text/event-stream", headers=self.headers)
        text, finish, usage, tokens = await collect_text(chunks)
        if chat:
            out = protocol.chat_body(prepared.request_id, model, text, finish, usage, protocol.chat_logprobs(tokens))
        else:
            logprobs = protocol.completion_logprobs(tokens)
            out = protocol.completion_body(prepared.request_id, model, text, finish, usage, logprobs)
        return JSONResponse(out, headers=self.headers)

    async def _sse_events(
        self, chunks: AsyncIterator[TextChunk], rid: str, model: str, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        # Events are joined into as few writes as the stream allows (the role with the first text, the finish
        # with the usage and [DONE]): each write is one message through Serve's proxy (docs/serving.md).
        head = sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None)) if chat else ""
        try:
            async for chunk in chunks:
                out = head
                if chunk.text or chunk.finish_reason or chunk.logprobs:
                    out += sse(_text_chunk(rid, model, chat, chunk.text, chunk.finish_reason, None, chunk.logprobs))
                if chunk.finish_reason and include_usage:
                    out += sse(_text_chunk(rid, model, chat, "", None, chunk.usage))
                if chunk.finish_reason:
                    head = out  # sent with [DONE]
                elif out:
                    head = ""
                    yield out
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            logger.exception("stream %s failed", rid)
            head += sse(APIError(500, str(exc), "server_error").body())
        yield head + sse("[DONE]")


def parse_app_args(args: dict[str, Any]) -> ServeConfig:
    """Builder args -> ServeConfig. ``serve run ... key=value`` gives strings (parsed like CLI overrides,
    dotted keys allowed); a Serve config file gives YAML values, nested mappings included."""
    data: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, str):
            key, value = parse_override(f"{key}={value}")
        set_dotted(data, key, value)
    return ServeConfig.from_dict(data)


def deployment_options(config: ServeConfig) -> dict:
    return {
        "name": "JacobiDecoder",
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "autoscaling_config": config.autoscaling.to_serve(),
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": 10,
    }


def build_app(args: dict[str, Any] | ServeConfig):
    """Serve application builder: ``serve run jf_ray.serving:app model=/path/to/ckpt decode.decoder=multiblock``."""
    config = args if isinstance(args, ServeConfig) else parse_app_args(args)
    logger.info("building app for %s (decoder %s)", config.model, config.decode.decoder)
    return JacobiDecoderDeployment.options(**deployment_options(config)).bind(config.model_dump())


__all__ = ["JacobiDecoderDeployment", "build_app", "parse_app_args", "deployment_options"]

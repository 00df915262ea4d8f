"""The model behind the HTTP API, without Ray: load the checkpoint, validate requests, run them batched.

The Serve deployment (``jf_ray.serving.deployment``) holds one :class:`CompletionService` per replica;
tests use it directly. Every problem with a request is an :class:`APIError` (4xx) raised
before the request reaches the engine, so a bad request never disturbs the batch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from jf_ray.decoding.types import DecodeConfig
from jf_ray.errors import UserInputError
from jf_ray.serving.config import ServeConfig
from jf_ray.serving.engine_process import EngineInfo, EngineProcess, load_engine, start_scheduler
from jf_ray.serving.generation import PreparedRequest, RequestObserver, TextChunk, stream_text
from jf_ray.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    invalid_request,
    new_id,
)
from jf_ray.serving.scheduler import QueueFullError, StepObserver

logger = logging.getLogger(__name__)

# Request fields that override the deployment's DecodeConfig when given.
_DECODE_OVERRIDES = ("decoder", "temperature", "top_p", "top_k", "seed")


class CompletionService:
    def __init__(
        self,
        config: ServeConfig,
        request_observer: RequestObserver | None = None,
        step_observer: StepObserver | None = None,
    ) -> None:
        from jf_ray.modeling import load_tokenizer

        self.config = config
        self.model_name = config.served_model_name
        self.tokenizer = load_tokenizer(config.model)
        if config.engine == "vllm":  # vLLM's engine behind the same API (jf_ray.vllm_engine, docs/vllm.md)
            from jf_ray.vllm_engine import VllmStreams

            self.scheduler = VllmStreams(config, self.tokenizer)
            self.engine_info = self.scheduler.info
        elif config.engine_process:
            self.scheduler = EngineProcess(config, step_observer)
            self.engine_info = self.scheduler.info
        else:
            engine = load_engine(config)
            self.engine_info = EngineInfo.of(engine)
            self.scheduler = start_scheduler(engine, config, step_observer)
        self.context_length = self.engine_info.context_length
        self.request_observer = request_observer
        logger.info(
            "serving %s as %r (context %d tokens, engine %s, decoder %s)",
            config.model,
            self.model_name,
            self.context_length,
            config.engine,
            config.decode.decoder,
        )

    # ---- validation ----
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def prepare_completion(self, request: CompletionRequest) -> PreparedRequest:
        self.check_model(request.model)
        if isinstance(request.prompt, str):
            prompt_ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        else:
            prompt_ids = list(request.prompt)
        return self._prepare(new_id("cmpl"), prompt_ids, request, "prompt")

    def prepare_chat(self, request: ChatCompletionRequest) -> PreparedRequest:
        self.check_model(request.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid_request("this model has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                request.template_messages(), add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # jinja raises for conversations the template forbids (role order)
            raise invalid_request(f"messages: the chat template rejects them: {exc}", "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self._prepare(new_id("chatcmpl"), list(ids), request, "messages")

    def _prepare(self, request_id: str, prompt_ids: list[int], request, prompt_field: str) -> PreparedRequest:
        if not prompt_ids:
            raise invalid_request(f"{prompt_field}: the prompt is empty after tokenization", prompt_field)
        max_tokens = self._max_tokens(len(prompt_ids), request.max_tokens, prompt_field, request.max_tokens_field)
        overrides = {k: getattr(request, k) for k in _DECODE_OVERRIDES if getattr(request, k) is not None}
        decode = self.config.decode.model_dump()
        decode.update(overrides, max_new_tokens=max_tokens, record_trajectory=False)
        decode["logprobs"] = request.top_logprobs_count
        try:
            config = DecodeConfig.model_validate(decode)
        except ValueError as exc:
            raise invalid_request(f"invalid decoding settings: {exc}") from None
        try:  # the engine's own checks (read-only, so safe outside its thread): a 400 before any header
            self.engine_info.validate(prompt_ids, config)
        except UserInputError as exc:
            raise invalid_request(f"{prompt_field}: {exc}", prompt_field) from None
        return PreparedRequest(request_id, prompt_ids, config, request.stop_strings)

    def _max_tokens(self, prompt_tokens: int, requested: int | None, prompt_field: str, cap_field: str) -> int:
        room = self.context_length - prompt_tokens
        if room <= 0:
            raise invalid_request(
                f"{prompt_field}: the prompt has {prompt_tokens} tokens; this model's maximum context length is "
                f"{self.context_length} tokens",
                prompt_field,
                "context_length_exceeded",
            )
        if requested is None:
            return min(self.config.default_max_tokens, room)
        if requested > self.config.max_tokens_limit:
            raise invalid_request(
                f"{cap_field}: {requested} is above this server's limit of {self.config.max_tokens_limit}",
                cap_field,
            )
        if requested > room:
            raise invalid_request(
                f"{cap_field}: this model's maximum context length is {self.context_length} tokens, but you "
                f"requested {prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} in the "
                "completion)",
                cap_field,
                "context_length_exceeded",
            )
        return requested

    # ---- running ----
    def start(self, request: PreparedRequest) -> AsyncIterator[TextChunk]:
        """Submit now (503 if the replica is full), then stream the chunks."""
        try:
            queue = self.scheduler.submit(request.request_id, request.prompt_ids, request.decode)
        except QueueFullError as exc:
            raise APIError(503, str(exc), "server_error", None, "overloaded") from None
        return stream_text(self.scheduler, self.tokenizer, request, queue, self.request_observer)

    def health(self) -> dict:
        return {
            "status": "ok" if self.scheduler.alive else "engine stopped",
            "model": self.model_name,
            **self.scheduler.snapshot(),
        }

    def shutdown(self) -> None:
        self.scheduler.stop()

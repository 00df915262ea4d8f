"""Settings of the Serve stage: which checkpoint, how to decode by default, batching, limits, scaling, HTTP.

One :class:`ServeConfig` is what ``jf-ray serve``, ``serve deploy`` (``args:`` of the application) and the
tests build; the deployment receives it whole, so every knob is visible in one place.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from jf_ray.config import DType, Location, ModelLocation, StageConfig
from jf_ray.decoding.types import DecodeConfig
from jf_ray.vllm_jacobi import VLLM_DECODERS, check_draft_lengths

# Settings of jf-ray's own engine that a vLLM engine has no use for: set with engine: vllm, they are refused.
_JF_ENGINE_ONLY = ("cost_curve", "engine_process", "stream_interval_ms", "stream_chunks_per_s")
_JF_DECODE_ONLY = ("num_blocks", "pool_size", "spawn_ratio", "recycle_context", "lookup_tokens", "lookup_max_ngram")

# Directory names that say what a directory is, not which model it holds (training checkpoints, exports).
_GENERIC_DIR = re.compile(r"(checkpoint|ckpt|step|epoch)[-_]?\d+|model|hf|final|latest|best|export", re.I)


def default_model_name(model: str) -> str:
    """What clients call ``model`` when no name is configured.

    A hub id (``Qwen/Qwen2.5-0.5B``) stays whole: the org is part of the name. A path or URI is named by its
    last component, with the parents' names joined in front while the component is generic:
    ``s3://b/runs/s7/checkpoint-000800`` -> ``s7/checkpoint-000800``.
    """
    is_path = "://" in model or model.startswith(("/", ".", "~"))
    if not is_path:
        return model
    parts = [p for p in model.split("://", 1)[-1].split("/") if p]
    if not parts:
        return model
    name = [parts.pop()]
    while parts and _GENERIC_DIR.fullmatch(name[0]):
        name.insert(0, parts.pop())
    return "/".join(name)


def _changed(config: StageConfig, name: str) -> bool:
    """Whether a field of ``config`` holds other than its default."""
    return getattr(config, name) != type(config).model_fields[name].get_default(call_default_factory=True)


class AutoscalingSettings(StageConfig):
    """Replica autoscaling, passed to Serve's ``autoscaling_config``."""

    min_replicas: int = Field(1, ge=0, description="fewest replicas kept running (0 allows scale to zero)")
    max_replicas: int = Field(1, ge=1, description="most replicas Serve may start")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="ongoing requests per replica Serve aims at; above it, it adds replicas"
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="load must stay high this long before upscaling")
    downscale_delay_s: float = Field(60.0, ge=0, description="load must stay low this long before downscaling")
    look_back_period_s: float = Field(
        30.0, gt=0, description="window over which Serve averages the ongoing requests it scales on"
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    def to_serve(self) -> dict:
        return self.model_dump()


class ServeConfig(StageConfig):
    """Everything one OpenAI-compatible Jacobi decoding service needs."""

    model: ModelLocation = Field(
        ..., description="checkpoint: local dir, file:// or s3:// URI (HF format), or a .gguf file (docs/models.md)"
    )
    model_name: str | None = Field(
        None,
        description="name clients pass as `model` (default: a hub id as given, org included; a checkpoint "
        "path's last component, with its parent's name before a generic one such as checkpoint-000800)",
    )
    engine: Literal["jf", "vllm"] = Field(
        "jf",
        description="what decodes: jf (jf-ray's own engine, every decoder) or vllm (vLLM's engine behind the same "
        "API: decoder ar = vLLM's AR, jacobi/rolling/auto = vLLM with jf_ray.vllm_jacobi.JacobiProposer drafting "
        "block_size tokens; docs/vllm.md)",
    )
    vllm_draft_lengths: list[tuple[int, int, int]] | None = Field(
        None,
        description="engine vllm: draft length by batch size, [(first_rows, last_rows, draft_length), ...] from 1 "
        "row on (0 = plain AR for those rows); default for decoder auto: about 64 tokens verified per step "
        "(jf_ray.vllm_jacobi.budget_draft_lengths), none for jacobi/rolling (always block_size)",
    )
    vllm_kv_cache_gib: int = Field(1, ge=1, description="engine vllm on CPU: the KV cache in whole GiB")
    vllm_enforce_eager: bool = Field(
        False, description="engine vllm: skip torch.compile (starts in seconds instead of minutes; tests)"
    )
    dtype: DType = Field("auto", description="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    decode: DecodeConfig = Field(
        default_factory=lambda: DecodeConfig(decoder="auto"),
        description="default decoding of this deployment (decoder, block size, ...); requests may override "
        "decoder, temperature, top_p, top_k and seed",
    )
    cost_curve: Location | None = Field(
        None,
        description="JSON of the forward cost curve the auto decoder plans with ({batch_sizes, widths, ms}, as in "
        "`jf-ray bench decoders` output); default: measured when the replica starts (docs/load-aware-decoding.md)",
    )
    max_batch_size: int = Field(8, ge=1, description="requests decoded together in one forward")
    max_queued_requests: int = Field(
        32,
        ge=0,
        description="requests waiting for a batch slot per replica; beyond it the server answers 503",
    )
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="a request's tokens reach its handler (and a streaming client) at most once per this many ms, "
        "the first and the last at once; 0 = after every engine step (docs/serving.md)",
    )
    stream_chunks_per_s: float | None = Field(
        200.0,
        gt=0,
        description="chunks per second a replica sends at most over all its streams: with many requests running, "
        "each one's interval grows to running / this. Every chunk costs CPU in the replica, Serve's proxy and the "
        "client that the model's forwards then lack (docs/serving.md); null = no cap",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that gives none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="largest request body in bytes (1 MiB: about 250k tokens of English text); a larger one is a "
        "413 before it is read whole or parsed. Raise it for long-context models",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica")
    engine_process: bool = Field(
        True,
        description="run the model and its engine in a child process of the replica, so that its forwards never "
        "wait for the interpreter lock that the HTTP side holds (docs/serving.md); false: a thread of the replica",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads of the replica's forwards; default num_cpus - 1 (at least 1): one core is "
        "left to the replica's event loop (detokenizing, SSE, Serve's streaming), since an OpenMP thread that loses "
        "its core to it stalls every forward (docs/serving.md)",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines)")
    autoscaling: AutoscalingSettings = Field(
        default_factory=AutoscalingSettings, description="replica autoscaling (min/max, target load)"
    )
    host: str = Field(
        "127.0.0.1",
        description="HTTP bind address of the Serve proxy (jf-ray serve; `serve deploy` takes "
        "http_options.host of its config file)",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy (as for host)")
    route_prefix: str = Field("/", description="URL prefix of the application")
    app_name: str = Field("jf-ray", description="name of the Serve application")
    api_key: str | None = Field(None, description="when set, requests must send `Authorization: Bearer <api_key>`")

    @model_validator(mode="after")
    def _limits(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) > max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @model_validator(mode="after")
    def _vllm_engine_settings(self) -> ServeConfig:
        if self.engine != "vllm":
            if self.vllm_draft_lengths is not None:
                raise ValueError("vllm_draft_lengths: only engine vllm drafts by batch size (set engine: vllm)")
            return self
        decoder = self.decode.decoder
        if decoder not in VLLM_DECODERS:
            raise ValueError(
                f"decode.decoder: {decoder!r} has no vLLM engine (engine: vllm runs {', '.join(VLLM_DECODERS)}); "
                "use engine: jf for it"
            )
        # Compared with the defaults, not with what was set: the deployment receives the config dumped whole.
        jf_only = [name for name in _JF_ENGINE_ONLY if _changed(self, name)]
        jf_only += [f"decode.{name}" for name in _JF_DECODE_ONLY if _changed(self.decode, name)]
        if jf_only:
            raise ValueError(f"{', '.join(jf_only)}: jf-ray's own engine only; engine vllm has no such setting")
        if self.vllm_draft_lengths is not None:
            if decoder == "ar":
                raise ValueError("vllm_draft_lengths: decoder ar drafts nothing; use jacobi, rolling or auto")
            try:
                check_draft_lengths(self.vllm_draft_lengths)
            except ValueError as exc:
                raise ValueError(f"vllm_draft_lengths: {exc}") from None
        return self

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return default_model_name(self.model)

    @property
    def forward_threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus) - 1)

    @property
    def max_ongoing_requests(self) -> int:
        """Serve may route this many requests to one replica at once.

        Larger than the replica's own capacity (batch + queue) so that overload reaches the replica, which
        answers 503 with an OpenAI error body, instead of piling up unbounded in Serve's router queue.
        """
        return 2 * (self.max_batch_size + self.max_queued_requests) + 1

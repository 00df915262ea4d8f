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

from jf_ray.decoding.types import DecodeConfig
from jf_ray.errors import UserInputError
from jf_ray.trajectories.backend_base import BackendSpec, GenerationBackend, TokenizerBackend

logger = logging.getLogger(__name__)


class TransformersBackend(TokenizerBackend):
    """Our batched Jacobi decoder over a transformers model (any device)."""

    def __init__(self, model, tokenizer, use_chat_template: bool = True):
        from jf_ray.modeling import eos_token_ids

        super().__init__(tokenizer, eos_token_ids(model, tokenizer), use_chat_template)
        self.model = model

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> TransformersBackend:
        from jf_ray.modeling import load_model, load_tokenizer

        model = load_model(
            spec.model, dtype=spec.dtype, device=spec.device, attn_implementation=spec.attn_implementation
        )
        return cls(model, load_tokenizer(spec.model), spec.use_chat_template)

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

"""vLLM generation backend (``collect.backend: vllm``): greedy Jacobi trajectories run through vLLM.

vLLM is used unmodified (docs/vllm.md). One Jacobi iteration of one sequence is one vLLM request over
``prefix + draft`` with ``max_tokens=1`` and ``prompt_logprobs=1``: the rank-1 token of each prompt position
is the greedy prediction there, the one generated token is the prediction after the last draft token. The
prefix's K/V comes from vLLM's prefix cache (``skip_reading_prefix_cache=False``); cached positions get no
logprobs, so predictions are read from the end of the list, and a request whose cache hit reached into the
draft (``num_cached_tokens`` past the head, e.g. two identical sequences) is run again without reading the
cache. The draft bookkeeping (initial drafts sampled from the context, the accepted prefix, the refreshed
tail, every recorded state) is our own :class:`~jf_ray.decoding.jacobi.JacobiPolicy`, the same code as the
transformers backend, so both backends write the same trajectories wherever their argmaxes agree. All
sequences of a batch are in flight together: each round submits one request per unfinished sequence.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from jf_ray.decoding.jacobi import JacobiPolicy
from jf_ray.decoding.request import RequestState, SegmentOutput
from jf_ray.decoding.types import DecodeConfig, DecodeResult
from jf_ray.trajectories.backend_base import BackendSpec, TokenizerBackend
from jf_ray.vllm_engine import check_vllm_model, open_engine

logger = logging.getLogger(__name__)


class VllmBackend(TokenizerBackend):
    """Jacobi trajectories on one vLLM engine (CPU or GPU); tokenizer and chat template as the HF backend."""

    def __init__(self, llm, tokenizer, eos_ids: list[int], use_chat_template: bool = True):
        super().__init__(tokenizer, eos_ids, use_chat_template)
        self.llm = llm
        self.resubmitted = 0  # requests run again because their cache hit reached into the draft
        self.cached_tokens = 0  # prefix tokens whose K/V came from vLLM's prefix cache (not recomputed)

    @classmethod
    def from_spec(cls, spec: BackendSpec) -> VllmBackend:
        from transformers import AutoConfig, GenerationConfig

        from jf_ray.modeling import eos_token_ids, load_tokenizer, local_model_path

        path = local_model_path(spec.model)
        options = spec.vllm_options()
        check_vllm_model(path, options)
        tokenizer = load_tokenizer(path)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation = None
        eos = eos_token_ids(_ConfigView(generation, AutoConfig.from_pretrained(path)), tokenizer)
        return cls(open_engine(path, options), tokenizer, eos, spec.use_chat_template)

    def jacobi_trajectories(self, prompt_ids, block_size, max_new_tokens, batch_size, seed, progress=None):
        config = DecodeConfig(
            decoder="jacobi", block_size=block_size, max_new_tokens=max_new_tokens, record_trajectory=True, seed=seed
        )
        eos = frozenset(self._eos)
        requests = [
            RequestState(str(i), list(p), config, eos, policy=JacobiPolicy(block_size, record=True))
            for i, p in enumerate(prompt_ids)
        ]
        waiting, running = deque(requests), []
        while waiting or running:
            admitted = [waiting.popleft() for _ in range(min(len(waiting), batch_size - len(running)))]
            self._prefill(admitted)
            running += admitted
            live = [r for r in running if not r.finished]
            if live:
                self._iterate(live)
            finished = [r for r in running if r.finished]
            for req in finished:
                req.close()
            running = [r for r in running if not r.finished]
            if finished and progress is not None:
                progress(len(finished))
        return [DecodeResult(list(r.generated), r.finish_reason, r.stats, r.policy.trajectory(r)) for r in requests]

    def _prefill(self, admitted: list[RequestState]) -> None:
        """The first token of each new sequence: vLLM's greedy token after the prompt."""
        if not admitted:
            return
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
        outputs = self._generate([r.prompt_ids for r in admitted], [params] * len(admitted))
        for req, out in zip(admitted, outputs):
            req.started_at = time.perf_counter()
            req.log_forward()
            req.stats.prefill_tokens = len(req.prompt_ids)
            req.extend([out.outputs[0].token_ids[0]])

    def _iterate(self, running: list[RequestState]) -> None:
        """One Jacobi iteration of every running sequence, as one batch of vLLM requests."""
        prefixes, drafts = [], []
        for req in running:
            req.segments = req.policy.plan(req)
            drafts.append(req.segments[0].tokens)  # [head, guesses...]
            prefixes.append(req.prompt_ids + req.generated[:-1])
        outputs = self._generate([p + d for p, d in zip(prefixes, drafts)], [_iteration_params(False)] * len(running))
        overran = [i for i, out in enumerate(outputs) if _cache_overran(out, len(prefixes[i]))]
        if overran:  # the hit covered the head's own row: score those again without reading the cache
            self.resubmitted += len(overran)
            again = self._generate([prefixes[i] + drafts[i] for i in overran], [_iteration_params(True)] * len(overran))
            for i, out in zip(overran, again):
                outputs[i] = out
        for req, draft, out in zip(running, drafts, outputs):
            self.cached_tokens += out.num_cached_tokens or 0
            req.offsets = [0]
            req.outputs = [SegmentOutput(_predictions(out, len(draft)), None, 0)]
            req.log_forward()
            req.policy.update(req)
            req.outputs = []

    def _generate(self, prompts: list[list[int]], params: list):
        from vllm import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


class _ConfigView:
    """What :func:`jf_ray.modeling.eos_token_ids` reads from a model, without loading the model."""

    def __init__(self, generation_config, config):
        self.generation_config = generation_config
        self.config = config


def _iteration_params(skip_cache: bool):
    """Every field in the constructor: vLLM derives ``skip_reading_prefix_cache`` there only."""
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=1,
        prompt_logprobs=1,
        detokenize=False,
        skip_reading_prefix_cache=skip_cache,
    )


def _cache_overran(out, prefix_len: int) -> bool:
    """The row predicting the first guess (the head's, at position ``prefix_len``) must have been computed."""
    return (out.num_cached_tokens or 0) > prefix_len


def _predictions(out, draft_len: int) -> list[int]:
    """Greedy prediction after each draft token: rank-1 of the last ``draft_len - 1`` prompt rows, then the
    generated token (the prediction after the last draft token)."""
    rows = out.prompt_logprobs[len(out.prompt_logprobs) - (draft_len - 1) :] if draft_len > 1 else []
    predicted = [next(token for token, logprob in row.items() if logprob.rank == 1) for row in rows]
    return predicted + [out.outputs[0].token_ids[0]]

"""Per-request decoding state: the tokens known so far, the stats, the RNG, and the stop rules.

``generated`` holds every token known to be part of the output. Its last element is the *head*: known
correct (or exactly sampled) but not yet fed to the model, so its K/V is not cached. Invariant after every
step: committed cache slots of the row == len(prompt) + len(generated) - 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from jf_ray.decoding.acceptance import (
    Verdict,
    filter_probs,
    greedy_verify,
    speculative_verify,
    speculative_verify_tree,
)
from jf_ray.decoding.query import Segment
from jf_ray.decoding.types import DecodeConfig, DecodeStats, FinishReason, TokenLogprob


@dataclass
class SegmentOutput:
    predictions: list[int]  # argmax at each offset of the segment
    row_logits: torch.Tensor  # [q, V]: the request's row of the forward's logits
    start: int  # where the segment starts in the row

    @property
    def logits(self) -> torch.Tensor:
        """[len, V]: only sampling needs the full distributions, greedy decoding reads ``predictions``."""
        return self.row_logits[self.start : self.start + len(self.predictions)]


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    config: DecodeConfig
    eos_token_ids: frozenset[int]
    generated: list[int] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    finish_reason: FinishReason | None = None
    policy: object = None  # the decoder's draft policy, made by jf_ray.decoding.engine.make_policy
    generator: torch.Generator = field(default_factory=torch.Generator)
    started_at: float = 0.0
    # Filled by the engine around each forward:
    segments: list[Segment] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    outputs: list[SegmentOutput] = field(default_factory=list)
    kv_commit: tuple[int, int] | None = None  # (query offset, count) to mark valid after this step
    emitted: int = 0  # tokens already reported to the caller
    verify_budget: int = 0  # recycled candidates this request may verify in the next forward (set by the engine)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when config.logprobs

    def __post_init__(self) -> None:
        seed = self.config.seed
        if seed is None:
            seed = 0 if self.config.greedy else int(torch.seed() % (2**63))
        self.generator.manual_seed(seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def head(self) -> int:
        return self.generated[-1]

    @property
    def next_position(self) -> int:
        """Position id of the head token (the first uncached one)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    @property
    def budget(self) -> int:
        """How many more tokens may still be generated."""
        return self.config.max_new_tokens - len(self.generated)

    def context_sample(self, count: int) -> list[int]:
        """``count`` ids drawn uniformly with replacement from the context (prompt + output): draft guesses."""
        if count <= 0:
            return []
        context = self.prompt_ids + self.generated
        picks = torch.randint(len(context), (count,), generator=self.generator).tolist()
        return [context[i] for i in picks]

    def verify(self, segment_index: int) -> Verdict:
        tokens, out = self.segments[segment_index].tokens, self.outputs[segment_index]
        if self.config.greedy:
            return greedy_verify(tokens, out.predictions)
        return speculative_verify(tokens, self._probs(segment_index), self.generator)

    def verify_tree(self, count: int) -> tuple[int, Verdict]:
        """Sampled verification of segments ``0 .. count-1``, drafts from the same head: (winner, its verdict)."""
        drafts = [self.segments[i].tokens for i in range(count)]
        return speculative_verify_tree(drafts, self._probs, self.generator)

    def _probs(self, segment_index: int) -> torch.Tensor:
        logits = self.outputs[segment_index].logits
        return filter_probs(logits, self.config.temperature, self.config.top_k, self.config.top_p)

    def first_token(self, last_logits: torch.Tensor) -> int:
        """The token after the prompt, from the prefill's last logits."""
        if self.config.greedy:
            return int(last_logits.argmax())
        probs = filter_probs(last_logits[None], self.config.temperature, self.config.top_k, self.config.top_p)
        return int(torch.multinomial(probs[0], 1, generator=self.generator))

    def start(self, last_logits: torch.Tensor) -> None:
        """Commit the first token, chosen from the prefill's last logits."""
        self.extend([self.first_token(last_logits)], last_logits[None])

    def accept(self, segment_index: int, verdict: Verdict) -> bool:
        """Commit the verified prefix of a segment plus the next head; apply EOS and the token cap.

        The K/V of the head and of the matched draft tokens (all in this segment) becomes committed; the new
        head stays uncached. Returns True when the request is finished.
        """
        tokens = self.segments[segment_index].tokens
        # Row j of the segment's logits predicted the j-th kept token, under a verified prefix: exactly AR's.
        # (Logits only where logprobs are asked for: a backend that scores drafts elsewhere, vLLM, has none.)
        logits = self.outputs[segment_index].logits if self.config.logprobs is not None else None
        kept = self.extend(tokens[1 : verdict.accepted] + [verdict.next_head], logits)
        # kept[:-1] sit at segment offsets 1..len(kept)-1, the old head at offset 0.
        self.kv_commit = (self.offsets[segment_index], len(kept))
        return self.finished

    def extend(self, new_tokens: list[int], logits: torch.Tensor | None = None) -> list[int]:
        """Append ``new_tokens`` (the last one becomes the head), cut at EOS and at the token cap.

        ``logits`` [>= len(new_tokens), V]: row j is the distribution token j was chosen from (for logprobs).
        """
        kept = []
        for token in new_tokens[: max(self.budget, 0)]:
            kept.append(token)
            if token in self.eos_token_ids:
                self.finish_reason = "stop"
                break
        self.generated.extend(kept)
        if self.config.logprobs is not None and logits is not None:
            self.logprobs.extend(token_logprobs(logits[: len(kept)], kept, self.config.logprobs))
        self.stats.accepted_hist[len(kept)] += 1
        if not self.finished and self.budget <= 0:
            self.finish_reason = "length"
        return kept

    def log_forward(self) -> None:
        self.stats.forwards += 1

    def close(self, reason: FinishReason | None = None) -> None:
        if reason is not None and self.finish_reason is None:
            self.finish_reason = reason
        self.stats.tokens = len(self.generated)
        self.stats.wall_s = time.perf_counter() - self.started_at


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Log-softmax of each row of ``logits`` [len(tokens), V] at its token, plus the ``top`` best entries."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows, token_ids = torch.arange(len(tokens), device=logp.device), torch.tensor(tokens, device=logp.device)
    chosen = logp[rows, token_ids].tolist()
    if top:
        values, ids = torch.topk(logp, top, dim=-1)
        best = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [[] for _ in tokens]
    return [TokenLogprob(t, lp, b) for t, lp, b in zip(tokens, chosen, best)]

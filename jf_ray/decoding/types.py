"""Data types shared by every decoder: what a request asks for and what a decode returns.

One interface sits behind the benchmark, the trajectory collector, the evaluator and the Serve deployment:
:class:`DecodeConfig` says how to decode, :class:`DecodeResult` carries the tokens *and* the stats
(forwards, tokens per forward, accepted-length histogram, wall time), so that metrics are return values
first and exports (Prometheus, OpenAI ``usage``, bench JSON) second.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from jf_ray.config import StageConfig
from jf_ray.decoding.registry import DECODER_NAMES, canonical


def _public_name(value: object) -> object:
    return canonical(value) if isinstance(value, str) else value


# A decoder's public name; aliases (``mr``) are accepted and replaced by it, unknown names name the choices.
DecoderName = Annotated[Literal[DECODER_NAMES], BeforeValidator(_public_name)]
FinishReason = Literal["stop", "length", "abort"]
# Seeds torch.Generator.manual_seed takes (a signed or unsigned 64-bit integer); beyond, it raises.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class DecodeConfig(StageConfig):
    """How to decode. Greedy when ``temperature == 0``; every greedy decoder reproduces greedy AR exactly."""

    decoder: DecoderName = Field(
        "jacobi",
        description=f"one of {', '.join(DECODER_NAMES)} (docs/load-aware-decoding.md for auto; mr = multiblock)",
    )
    block_size: int = Field(64, ge=1, description="Jacobi block size n (tokens refined in parallel)")
    max_new_tokens: int = Field(256, ge=1, description="cap on generated tokens per request")
    num_blocks: int = Field(2, ge=1, description="multiblock: K, blocks in flight (1 real-active + K-1 pseudo-active)")
    pool_size: int = Field(
        4, ge=0, description="multiblock, auto: n-gram pool capacity = most recycled candidates verified per step"
    )
    spawn_ratio: float = Field(0.85, gt=0.0, le=1.0, description="multiblock: spawn a block at ceil(r*n) accepted")
    recycle_context: bool = Field(
        True,
        description="multiblock, auto: also draw candidates from the prompt + output (copying), not only rejected "
        "drafts",
    )
    lookup_tokens: int | None = Field(
        None, ge=1, description="lookup: max tokens copied per candidate (default block_size - 1)"
    )
    lookup_max_ngram: int = Field(3, ge=1, description="lookup: longest suffix n-gram matched in context")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; > 0 samples (distribution-preserving)")
    top_k: int = Field(0, ge=0, description="sampling: keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sampling: nucleus mass (1 = off)")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="seed of draft initialisation and sampling (64-bit)"
    )
    record_trajectory: bool = Field(False, description="jacobi: keep every draft state of every block")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="record each generated token's log-probability and this many most likely alternatives "
        "(None = off); read from the logits of the forward that verified the token",
    )

    @model_validator(mode="after")
    def _trajectory_needs_jacobi(self) -> DecodeConfig:
        if self.record_trajectory and (self.decoder != "jacobi" or self.temperature > 0):
            raise ValueError("record_trajectory needs decoder='jacobi' with greedy decoding")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """Log-probability of one generated token under the model (raw logits: before temperature, top-k, top-p)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


@dataclass
class DecodeStats:
    """Counters of one decode (or a sum of many, see :meth:`merge`).

    ``forwards`` counts every model call that did work for the request, the prefill included, the same way
    for every decoder; greedy AR therefore has ``tpf == 1`` exactly.
    """

    tokens: int = 0
    forwards: int = 0
    wall_s: float = 0.0
    prefill_tokens: int = 0
    accepted_hist: Counter = field(default_factory=Counter)  # tokens gained by one forward -> count
    recycled_hits: int = 0  # forwards where a recycled/looked-up candidate beat the plain draft
    draft_hist: Counter = field(default_factory=Counter)  # main draft length (head included) -> decoding forwards
    candidates_hist: Counter = field(default_factory=Counter)  # recycled candidates verified -> decoding forwards
    blocks_hist: Counter = field(default_factory=Counter)  # blocks in flight (1 + pseudo-active) -> decoding forwards
    query_tokens: int = 0  # tokens this request put into decoding forwards (its share of their width)

    @property
    def tpf(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def merge(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats(
            tokens=self.tokens + other.tokens,
            forwards=self.forwards + other.forwards,
            wall_s=self.wall_s + other.wall_s,
            prefill_tokens=self.prefill_tokens + other.prefill_tokens,
            accepted_hist=self.accepted_hist + other.accepted_hist,
            recycled_hits=self.recycled_hits + other.recycled_hits,
            draft_hist=self.draft_hist + other.draft_hist,
            candidates_hist=self.candidates_hist + other.candidates_hist,
            blocks_hist=self.blocks_hist + other.blocks_hist,
            query_tokens=self.query_tokens + other.query_tokens,
        )

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "forwards": self.forwards,
            "tpf": round(self.tpf, 4),
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prefill_tokens": self.prefill_tokens,
            "accepted_hist": {str(k): v for k, v in sorted(self.accepted_hist.items())},
            "recycled_hits": self.recycled_hits,
            "draft_hist": {str(k): v for k, v in sorted(self.draft_hist.items())},
            "candidates_hist": {str(k): v for k, v in sorted(self.candidates_hist.items())},
            "blocks_hist": {str(k): v for k, v in sorted(self.blocks_hist.items())},
            "query_tokens": self.query_tokens,
        }


@dataclass
class BlockTrajectory:
    """Every draft state of one Jacobi block, from the true initial draft to the fixed point.

    ``states[0]`` is the real initial draft (verified head + context-sampled guesses), unlike the official
    data where state 0 aliases the fixed point. Each later state is ``accepted ++ head ++ refreshed tail``
    after one rejecting forward; ``states[-1] == fixed_point``. All states have ``len(fixed_point)`` tokens
    (the last block of a response can be shorter than n when EOS or the token cap ends it).
    """

    block_index: int
    prefix_len: int  # prompt + all earlier blocks, in tokens
    states: list[list[int]]
    fixed_point: list[int]


@dataclass
class DecodeResult:
    token_ids: list[int]  # generated tokens only (EOS included when it ended the request)
    finish_reason: FinishReason
    stats: DecodeStats
    trajectory: list[BlockTrajectory] | None = None  # only with record_trajectory

"""Build presets of the embedded base model: tokenizer, architecture, data mix and training budget.

``micro`` is a real checkpoint in seconds for other stages' tests; ``tiny`` builds in about a minute for
tests and CI; ``small`` is the main job's default and is sized to learn the math workload within its
budget. Any field can be overridden (``steps=200``); the overrides are part of the cache key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from jf_ray.config import StageConfig, parse_override
from jf_ray.errors import UserInputError


class BasePreset(StageConfig):
    """Everything that determines a base-model build besides the seed."""

    vocab_size: int = Field(..., ge=300, description="BPE vocabulary incl. 256 byte tokens and 3 special tokens")
    tokenizer_chars: int = Field(..., ge=1000, description="characters of training text the tokenizer learns from")
    hidden_size: int = Field(..., ge=8, description="model width")
    num_layers: int = Field(..., ge=1, description="transformer blocks")
    num_heads: int = Field(..., ge=1, description="attention heads")
    num_kv_heads: int = Field(..., ge=1, description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(..., ge=8, description="MLP hidden width")
    max_position_embeddings: int = Field(2048, ge=64, description="longest sequence the model is configured for")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    seq_len: int = Field(..., ge=32, description="training sequence length (packed rows)")
    batch_size: int = Field(..., ge=1, description="rows per optimiser step")
    steps: int = Field(..., ge=1, description="optimiser steps")
    lr: float = Field(..., gt=0, description="peak AdamW learning rate (linear warm-up, cosine decay to 10%)")
    warmup_steps: int = Field(..., ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="matmuls in bf16 autocast (fp32 weights) or fp32; auto: bf16 where the processor has native "
        "bf16 (about 25% faster there), fp32 elsewhere (emulated bf16 is 13x slower; jf_ray.precision)",
    )
    math_examples: int = Field(..., ge=0, description="math train problems, as chat turns")
    code_examples: int = Field(..., ge=0, description="code train tasks (signature+docstring -> body), as chat turns")
    raw_code_chars: int = Field(..., ge=0, description="characters of raw train-split stdlib source (plain LM rows)")

    def check(self) -> BasePreset:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise UserInputError(
                f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"which must divide by num_kv_heads {self.num_kv_heads}"
            )
        if self.seq_len > self.max_position_embeddings:
            raise UserInputError(f"seq_len {self.seq_len} exceeds max_position_embeddings")
        return self


PRESETS: dict[str, dict] = {
    "micro": dict(
        vocab_size=384,
        tokenizer_chars=50_000,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=1024,
        seq_len=384,
        batch_size=8,
        steps=20,
        lr=3e-3,
        warmup_steps=4,
        math_examples=100,
        code_examples=50,
        raw_code_chars=10_000,
    ),
    "tiny": dict(
        vocab_size=768,
        tokenizer_chars=400_000,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=192,
        seq_len=256,
        batch_size=8,
        steps=120,
        lr=3e-3,
        warmup_steps=12,
        math_examples=3000,
        code_examples=1000,
        raw_code_chars=100_000,
    ),
    # Tuned on the math workload: ~1M parameters. The hard part is copying each event's numbers from the
    # prompt; it appears late (about 10% held-out accuracy after 850 steps, 98% after 1000, 100% after 1500).
    # The extra 500 steps (+2 minutes) buy robustness, not only accuracy: the 1000-step model lost 5.5 points
    # in one Jacobi Forcing round that cost the 1500-step model 2.5. The executed code tasks need far more:
    # held-out pass@1 20-30% after 1100-1200 steps, 99% after 4000 with 36,000 tasks (math 100%; about 25
    # minutes on 2 cores, docs/results.md). Raw stdlib rows stay a small language-modelling share.
    "small": dict(
        vocab_size=2048,
        tokenizer_chars=3_000_000,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        seq_len=384,
        batch_size=12,
        steps=4000,
        lr=3e-3,
        warmup_steps=50,
        math_examples=30_000,
        code_examples=36_000,
        raw_code_chars=200_000,
    ),
}


def resolve_preset(name: str, overrides: Iterable[str] = ()) -> BasePreset:
    """The named preset with ``key=value`` overrides applied and validated."""
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    data = dict(PRESETS[name])
    for item in overrides:
        key, value = parse_override(item)
        if key == "bf16_autocast":
            raise UserInputError(f"{item!r}: bf16_autocast is now precision=auto|bf16|fp32 (auto picks by the CPU)")
        if key not in BasePreset.model_fields:
            raise UserInputError(f"unknown preset field {key!r} in override {item!r}")
        data[key] = value
    return BasePreset.from_dict(data).check()

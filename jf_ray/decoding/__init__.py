"""Decoders: greedy AR, Jacobi, multi-block with rejection recycling, prompt lookup; greedy or sampled.

Plain torch + transformers, no Ray. One engine runs all of them, batched (continuous batching: requests
join and leave between forwards); :func:`generate` is the simple facade over it.
"""

from jf_ray.decoding.engine import DecodingEngine, StepOutput, generate
from jf_ray.decoding.types import (
    DECODER_NAMES,
    BlockTrajectory,
    DecodeConfig,
    DecodeResult,
    DecodeStats,
)

__all__ = [
    "DECODER_NAMES",
    "BlockTrajectory",
    "DecodeConfig",
    "DecodeResult",
    "DecodeStats",
    "DecodingEngine",
    "StepOutput",
    "generate",
]

"""Decoders: greedy AR, Jacobi, rolling, multi-block with rejection recycling, prompt lookup, load-aware auto.

Plain torch + transformers, no Ray. One engine runs all of them, batched (continuous batching: requests
join and leave between forwards); :func:`generate` is the simple facade over it. The names live in the
torch-free :mod:`jf_ray.decoding.registry`; everything else here is imported on first use, so that the CLI
and configs can read the registry without loading torch.
"""

from __future__ import annotations

import importlib

from jf_ray.decoding.registry import DECODER_NAMES

_LAZY = {
    "DecodingEngine": "jf_ray.decoding.engine",
    "StepOutput": "jf_ray.decoding.engine",
    "generate": "jf_ray.decoding.engine",
    "BlockTrajectory": "jf_ray.decoding.types",
    "DecodeConfig": "jf_ray.decoding.types",
    "DecodeResult": "jf_ray.decoding.types",
    "DecodeStats": "jf_ray.decoding.types",
}

__all__ = ["DECODER_NAMES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

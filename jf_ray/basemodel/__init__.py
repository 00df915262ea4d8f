"""The embedded default base model: a byte-level BPE tokenizer and a small Qwen2 model trained from scratch
on the two workloads, written as a standard Hugging Face checkpoint (loads with the Auto classes).

>>> from jf_ray.basemodel import build_base
>>> path = build_base("/tmp/jf-micro", preset="micro", seed=0)   # doctest: +SKIP  (seconds; cached)
"""

from jf_ray.basemodel.build import BUILD_INFO, build_base, content_hash, read_build_info
from jf_ray.basemodel.presets import PRESETS, BasePreset, resolve_preset

__all__ = [
    "BUILD_INFO",
    "PRESETS",
    "BasePreset",
    "build_base",
    "content_hash",
    "read_build_info",
    "resolve_preset",
]

"""The decoders jf-ray knows: one home for their names, aliases, help text and how each policy is built.

Torch-free on purpose (the package's ``__init__`` loads the engine lazily): the CLI, the job config, the
Serve protocol, the benchmark and the engine all read this table, so a decoder is added in one place. A
policy is named by ``"module:function"`` and imported only when the engine first builds one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Decoder:
    name: str
    help: str
    policy: str  # "module:function" that builds the draft policy from a DecodeConfig
    aliases: tuple[str, ...] = ()


DECODERS: tuple[Decoder, ...] = (
    Decoder("ar", "greedy (or sampled) autoregressive decoding, one token per forward", "jf_ray.decoding.jacobi:ar"),
    Decoder("jacobi", "Jacobi decoding of fixed blocks of n tokens", "jf_ray.decoding.jacobi:jacobi"),
    Decoder(
        "rolling", "Jacobi with n draft tokens always in flight (no block restarts)", "jf_ray.decoding.jacobi:rolling"
    ),
    Decoder(
        "multiblock",
        "multi-block Jacobi with rejection recycling (K blocks in flight, n-gram candidate pool)",
        "jf_ray.decoding.multiblock:multiblock",
        aliases=("mr",),
    ),
    Decoder(
        "lookup", "prompt-lookup speculative decoding (drafts copied from the context)", "jf_ray.decoding.lookup:lookup"
    ),
    Decoder(
        "auto",
        "load-aware: sizes every request's draft (window length, recycled candidates) before each forward from "
        "the measured forward cost curve (long drafts and candidates alone, AR at saturation)",
        "jf_ray.decoding.auto:auto",
    ),
)
# Decoders outside jf-ray's engine that only the benchmark runs, as references.
REFERENCES: dict[str, str] = {"generate": "transformers' greedy model.generate (static batches), benchmark only"}

DECODER_NAMES: tuple[str, ...] = tuple(d.name for d in DECODERS)
ALIASES: dict[str, str] = {alias: d.name for d in DECODERS for alias in d.aliases}
ACCEPTED_NAMES: tuple[str, ...] = DECODER_NAMES + tuple(ALIASES)
BENCH_NAMES: tuple[str, ...] = DECODER_NAMES + tuple(REFERENCES)


def canonical(name: str, allowed: tuple[str, ...] = DECODER_NAMES) -> str:
    """The public name of ``name`` (an alias maps to its decoder); ValueError naming the choices otherwise."""
    public = ALIASES.get(name, name)
    if public not in allowed:
        raise ValueError(f"unknown decoder {name!r}; choose one of {', '.join(allowed)} (alias: mr = multiblock)")
    return public


def describe(names: tuple[str, ...] = DECODER_NAMES) -> str:
    """One line per decoder (``name (alias): help``), for CLI help and error messages."""
    known = {d.name: d for d in DECODERS}
    lines = []
    for name in names:
        if name in known:
            aliases = f" (alias {', '.join(known[name].aliases)})" if known[name].aliases else ""
            lines.append(f"{name}{aliases}: {known[name].help}")
        else:
            lines.append(f"{name}: {REFERENCES[name]}")
    return "; ".join(lines)


def policy_builder(name: str) -> Callable:
    """The function that builds ``name``'s draft policy from a DecodeConfig (imports its module)."""
    spec = next(d for d in DECODERS if d.name == canonical(name))
    module, function = spec.policy.split(":")
    return getattr(importlib.import_module(module), function)

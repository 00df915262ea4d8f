"""The floating-point precision jf-ray computes in, chosen by what the processor does natively.

bf16 autocast pays on a CPU only where the processor has bf16 instructions (AVX512-BF16 or AMX on x86, the
BF16 extension on Arm): there the embedded base trains about 25% faster. Elsewhere torch emulates the bf16
matmuls: on an AVX2-only EPYC one 128 -> 384 linear layer (4,608 rows, forward + backward) took 625 ms
against 20.5 ms in fp32, and the base trained 13x slower (docs/precision.md). So ``auto`` means:

- the embedded base's pretraining (``pretrain``): bf16 autocast on a CPU with native bf16, fp32 on any
  other CPU;
- the Jacobi Forcing rounds (``train``): bf16 autocast on a GPU; fp32 on every CPU, because their small
  micro-batches did not gain from bf16 even where it is native (round 1 of the quickstart: 186 s in bf16
  against 180 s in fp32 on a 2-core EPYC with AVX512-BF16; docs/precision.md);
- decoding (serving, collection, evaluation, benchmarks, vLLM): bf16 on a GPU, fp32 on every CPU, native
  bf16 or not, because greedy decoding is exact only in fp32 there: bf16 rounding differs with the shape of
  the forward, and Jacobi drafts change the shape (docs/decoding.md).

An explicit ``bf16`` or ``fp32`` always wins; asking for bf16 (or fp16) on a CPU that emulates it logs a
warning once. The processor is read from ``/proc/cpuinfo`` where there is one; elsewhere a short timed probe
(fp32 against bf16 matmuls) decides, cached per machine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Purpose = Literal["pretrain", "train", "decode"]
NATIVE_BF16_ENV = "JF_NATIVE_BF16"
# The SIMD features a figure is read against; every report records which of them the processor has.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16")
_NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16"}  # "bf16": the Arm BF16 extension (Linux's name for it)
# A bf16 matmul at least this much slower than fp32 is emulated (natively it is as fast or faster; emulated,
# 10-30x slower on the AVX2 machine above).
_PROBE_EMULATED_RATIO = 2.0


@dataclass(frozen=True)
class CpuInfo:
    """The processor a run computes on: its model name, the features of :data:`FEATURES` it has, its threads."""

    model: str
    features: tuple[str, ...]
    threads: int
    native_bf16: bool
    source: str  # "cpuinfo" (flags read), "probe" (timed) or "JF_NATIVE_BF16" (set by the user)

    def record(self) -> dict:
        return {
            "cpu_model": self.model,
            "cpu_features": {name: name in self.features for name in FEATURES},
            "native_bf16": self.native_bf16,
            "native_bf16_source": self.source,
            "cpu_threads": self.threads,
        }


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``bf16`` or ``fp32`` (``fp16`` only when asked for), and why."""

    name: str
    reason: str

    def record(self) -> dict:
        return {"precision": self.name, "reason": self.reason}


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``, Arm
    ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info_from(model: str, flags: set[str], threads: int) -> CpuInfo:
    """A :class:`CpuInfo` from flags already read (tests inject them here)."""
    return CpuInfo(
        model=model or platform.processor() or platform.machine(),
        features=tuple(name for name in FEATURES if name in flags),
        threads=threads,
        native_bf16=bool(flags & _NATIVE_BF16),
        source="cpuinfo",
    )


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's processor, read once per process. ``JF_NATIVE_BF16=0|1`` overrides the bf16 verdict
    (a processor misread, or a test suite that must compute the same on every CPU); Ray workers inherit it."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", set()
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        found = cpu_info_from(model, flags, threads)
        return dataclasses.replace(found, native_bf16=forced == "1", source=NATIVE_BF16_ENV)
    if flags:
        return cpu_info_from(model, flags, threads)
    name = model or platform.processor() or platform.machine()
    return CpuInfo(name, (), threads, native_bf16=_probed_native_bf16(name), source="probe")


def native_fp16(cpu: CpuInfo) -> bool:
    return any(name in cpu.features for name in ("avx512_fp16", "amx_fp16"))


def resolve_precision(
    requested: str, device: str = "cpu", purpose: Purpose = "pretrain", cpu: CpuInfo | None = None
) -> Precision:
    """The precision to compute in for ``requested`` (``auto``, ``bf16``, ``fp32`` or ``fp16``) on ``device``.

    ``cpu`` is this machine's by default; tests inject one."""
    if requested not in ("auto", "bf16", "fp32", "fp16"):
        from jf_ray.errors import UserInputError

        raise UserInputError(f"unknown precision {requested!r}; choose one of auto, bf16, fp32, fp16")
    on_gpu = not device.startswith("cpu")
    if on_gpu:
        if requested == "auto":
            return Precision("bf16", f"auto on {device}: bf16")
        return Precision(requested, f"{requested} as asked")
    cpu = cpu or cpu_info()
    if requested == "auto":
        if purpose == "decode":
            return Precision("fp32", "auto decoding on CPU: fp32, the precision in which greedy decoding is exact")
        if purpose == "train":
            return Precision("fp32", "auto training on CPU: fp32, bf16 autocast does not pay at its micro-batches")
        if cpu.native_bf16:
            return Precision("bf16", f"auto on CPU: bf16, native on {cpu.model} ({_bf16_features(cpu)})")
        told = f" ({NATIVE_BF16_ENV}=0)" if cpu.source == NATIVE_BF16_ENV else ""
        return Precision("fp32", f"auto on CPU: fp32, {cpu.model} has no native bf16{told} (torch would emulate it)")
    emulated = (requested == "bf16" and not cpu.native_bf16) or (requested == "fp16" and not native_fp16(cpu))
    if emulated:
        _warn_emulated(requested, cpu.model)
        return Precision(requested, f"{requested} as asked, emulated on {cpu.model} (slow)")
    return Precision(requested, f"{requested} as asked")


def _bf16_features(cpu: CpuInfo) -> str:
    return ", ".join(name for name in cpu.features if name in _NATIVE_BF16) or "timed probe"


@functools.cache
def _warn_emulated(requested: str, model: str) -> None:
    logger.warning(
        "%s was asked for on %s, which has no native %s instructions: torch emulates them, typically 10-30x "
        "slower than fp32 (docs/precision.md); use auto or fp32 unless you are measuring this",
        requested,
        model,
        requested,
    )


def precision_of(dtype) -> str:
    """``fp32``/``bf16``/``fp16`` for a torch dtype (or its name)."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def machine_record(cpu: CpuInfo | None = None) -> dict:
    """What a figure is read against: processor, features, threads, and the versions that compute it."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        **(cpu or cpu_info()).record(),
        "torch": version("torch"),
        "transformers": version("transformers"),
    }


def _probed_native_bf16(model: str) -> bool:
    """Whether bf16 matmuls run at least about as fast as fp32 here: timed once, cached per machine."""
    key = hashlib.sha256(f"{model}|{platform.machine()}|{platform.node()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("JF_CACHE_DIR", Path.home() / ".cache" / "jf_ray")) / f"bf16-probe-{key}.json"
    try:
        return bool(json.loads(cache.read_text())["native_bf16"])
    except (OSError, ValueError, KeyError):
        pass
    fp32_s, bf16_s = _time_matmul(False), _time_matmul(True)
    native = bf16_s <= _PROBE_EMULATED_RATIO * fp32_s
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"native_bf16": native, "fp32_s": fp32_s, "bf16_s": bf16_s}))
        os.replace(tmp, cache)
    except OSError:
        logger.debug("could not cache the bf16 probe at %s", cache)
    logger.info("bf16 probe: fp32 %.1f ms, bf16 %.1f ms per matmul: native bf16 %s", fp32_s, bf16_s, native)
    return native


def _time_matmul(bf16: bool) -> float:
    """Best of three 512 x 512 x 512 matmuls (fp32, or under bf16 autocast), in milliseconds."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, (time.perf_counter() - start) * 1000)
    return best

"""``jf-ray bench decoders``: decoders side by side on the same prompts, in one process, with JSON out.

Every decoder is timed the same way, by :func:`jf_ray.decoding.generate`: from the first prefill to the last
token of the last prompt, batched ``batch_size`` at a time (tokenisation excluded, prefill included). Greedy
AR always runs first: it is the reference for ``exact_match_vs_ar`` and ``speedup_vs_ar``. With repeats,
runs are interleaved and the speed-up is :func:`jf_ray.bench.common.speedup` of each repeat's tokens/s
paired with the AR run just before it (``speedup_vs_ar_range``: the lowest and highest paired ratio), see
docs/benchmarking.md. ``repetition`` is the share of generated tokens that complete a 4-gram already present
earlier in prompt + output, so that TPF gained by copying loops can be told apart from real parallel decoding.
``generate`` is a reference outside our engine: transformers' own greedy ``model.generate`` with its KV cache,
to show that the AR baseline is not slow. ``vllm`` (docs/vllm.md) is the other outside reference, passed in
``references`` rather than named as a decoder: vLLM's own greedy AR (offline ``LLM.generate``, at most
``batch_size`` sequences in flight) of the same checkpoint; every decoder then also gets
``exact_match_vs_vllm`` and ``speedup_vs_vllm``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import psutil
import torch

from jf_ray.bench.common import speedup
from jf_ray.decoding import DecodeConfig, DecodeResult, DecodeStats, generate
from jf_ray.decoding.auto import measure_cost_curve
from jf_ray.decoding.planner import CostCurve
from jf_ray.modeling import attention_backends

logger = logging.getLogger(__name__)

GENERATE = "generate"  # a reference of jf_ray.decoding.registry.REFERENCES: transformers' greedy generate
VLLM = "vllm"  # a reference, not a decoder: vLLM's greedy AR, see vllm_runner


@dataclass
class DecoderRun:
    results: list[DecodeResult]
    wall_s: float
    forward_s: float | None  # time inside the model's forwards; None where it cannot be separated
    peak_rss_mb: float
    repeat_wall_s: list[float] = field(default_factory=list)  # every timed repeat, in the order run
    cost_curve: CostCurve | None = None  # the forward cost curve the ``auto`` decoder planned with


def repetition(prompt: list[int], output: list[int], n: int = 4) -> tuple[int, int]:
    """(generated tokens that complete an n-gram seen earlier in prompt + output, generated tokens)."""
    sequence, seen, repeated = prompt + output, set(), 0
    for end in range(n, len(sequence) + 1):
        gram = tuple(sequence[end - n : end])
        if end > len(prompt) and gram in seen:
            repeated += 1
        seen.add(gram)
    return repeated, len(output)


class PeakRSS:
    """Samples this process's resident memory in a thread while a decoder runs."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        """This process and its children (vLLM's engine runs in child processes)."""
        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a child that just ended
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def run_decoder(
    model,
    prompts: list[list[int]],
    config: DecodeConfig,
    eos_ids: list[int],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    cost_curve: CostCurve | None = None,
) -> DecoderRun:
    """Our engine on ``prompts`` (:func:`jf_ray.decoding.generate`), timed, with its time inside the model."""
    forward_s = [0.0]

    def read_forward_time(engine) -> None:
        forward_s[0] = engine.forward_s

    with PeakRSS() as rss:
        start = time.perf_counter()
        results = generate(model, prompts, config, eos_ids, batch_size, progress, cost_curve, read_forward_time)
        wall = time.perf_counter() - start
    curve = cost_curve if config.decoder == "auto" else None
    return DecoderRun(results, wall, forward_s[0], rss.peak / 2**20, cost_curve=curve)


def run_generate(
    model,
    prompts: list[list[int]],
    config: DecodeConfig,
    eos_ids: list[int],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> DecoderRun:
    """Greedy AR by ``model.generate`` in static, left-padded batches (a finished row waits for its batch)."""
    from transformers import GenerationConfig

    if not config.greedy:
        raise ValueError("the generate reference decodes greedily only")
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    settings = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=list(eos_ids) or None,
    )
    device = next(model.parameters()).device
    results = []
    with PeakRSS() as rss:
        start = time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            with torch.inference_mode(), attention_backends(device):
                out = model.generate(ids, attention_mask=mask, generation_config=settings)
            results += [_until_eos(row, eos_ids) for row in out[:, width:].tolist()]
            if progress:
                progress(len(batch))
        wall = time.perf_counter() - start
    return DecoderRun(results, wall, None, rss.peak / 2**20)


def vllm_runner(llm) -> Callable[..., DecoderRun]:
    """A runner (same call as :func:`run_decoder`) timing vLLM's greedy AR on the open engine ``llm``; the
    engine was opened with ``max_num_seqs=batch_size`` (:func:`jf_ray.vllm_engine.open_engine`)."""

    def run_vllm(model, prompts, config, eos_ids, batch_size, progress=None) -> DecoderRun:
        from jf_ray.vllm_engine import greedy_ar

        if not config.greedy:
            raise ValueError("the vLLM reference decodes greedily only")
        with PeakRSS() as rss:
            start = time.perf_counter()
            outputs = greedy_ar(llm, prompts, config.max_new_tokens, eos_ids)
            wall = time.perf_counter() - start
        if progress:
            progress(len(prompts))
        return DecoderRun([_until_eos(row, eos_ids) for row in outputs], wall, None, rss.peak / 2**20)

    return run_vllm


def _until_eos(row: list[int], eos_ids: list[int]) -> DecodeResult:
    """Generated ids up to and including the first EOS (generate pads rows that finished early)."""
    stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
    tokens = row if stop is None else row[: stop + 1]
    stats = DecodeStats(tokens=len(tokens), forwards=len(tokens))
    stats.accepted_hist[1] = len(tokens)
    return DecodeResult(tokens, "length" if stop is None else "stop", stats)


def summarize(run: DecoderRun, prompts: list[list[int]], reference: DecoderRun | None) -> dict:
    stats = DecodeStats()
    for r in run.results:
        stats = stats.merge(r.stats)
    repeated = total = 0
    for prompt, r in zip(prompts, run.results):
        rep, n = repetition(prompt, r.token_ids)
        repeated, total = repeated + rep, total + n
    tokens_per_s = stats.tokens / run.wall_s if run.wall_s else 0.0
    decoding = sum(stats.draft_hist.values())  # decoding forwards (the prefill has no draft)
    overhead = None  # unknown where the forwards were not timed apart (the generate reference)
    if run.forward_s is not None:
        overhead = round(1.0 - run.forward_s / run.wall_s, 4) if run.wall_s else 0.0
    summary = {
        "tokens": stats.tokens,
        "forwards": stats.forwards,
        "tpf": round(stats.tpf, 4),
        "tokens_per_s": round(tokens_per_s, 2),
        "wall_s": round(run.wall_s, 4),
        "exact_match_vs_ar": None,
        "speedup_vs_ar": None,
        "repetition": round(repeated / total, 4) if total else 0.0,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "overhead_frac": overhead,
        "accepted_hist": {str(k): v for k, v in sorted(stats.accepted_hist.items())},
        "recycled_hits": stats.recycled_hits,
        "draft_hist": {str(k): v for k, v in sorted(stats.draft_hist.items())},  # main draft length -> forwards
        "candidates_hist": {str(k): v for k, v in sorted(stats.candidates_hist.items())},  # recycled candidates
        "blocks_hist": {str(k): v for k, v in sorted(stats.blocks_hist.items())},  # blocks in flight
        "query_tokens_per_forward": round(stats.query_tokens / decoding, 3) if decoding else None,
    }
    if run.cost_curve is not None:
        summary["cost_curve"] = run.cost_curve.to_dict()
    if reference is not None:
        summary.update(versus(run, reference, "ar"))
    return summary


def versus(run: DecoderRun, reference: DecoderRun, name: str) -> dict:
    """``exact_match_vs_<name>``, ``speedup_vs_<name>`` and its range (:func:`jf_ray.bench.common.speedup`)."""
    same = sum(a.token_ids == b.token_ids for a, b in zip(run.results, reference.results))
    gain = speedup(repeat_tokens_per_s(run), repeat_tokens_per_s(reference))
    return {
        f"exact_match_vs_{name}": round(same / len(run.results), 4) if run.results else None,
        f"speedup_vs_{name}": gain.median if gain else None,
        f"speedup_vs_{name}_range": [gain.low, gain.high] if gain else None,
    }


def repeat_tokens_per_s(run: DecoderRun) -> list[float]:
    """Tokens/s of every timed repeat, in the order run (every repeat gives the same outputs: greedy)."""
    tokens = sum(r.stats.tokens for r in run.results)
    return [tokens / wall if wall > 0 else math.nan for wall in run.repeat_wall_s or [run.wall_s]]


def run_decoders(
    model,
    prompts: list[list[int]],
    decoders: list[str],
    base_config: DecodeConfig,
    eos_ids: list[int],
    batch_size: int = 1,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
    repeats: int = 1,
    warmup: bool = True,
    references: dict[str, Callable[..., DecoderRun]] | None = None,
) -> dict[str, DecoderRun]:
    """Run AR (the reference), then each decoder, back to back under the same conditions.

    With ``repeats > 1`` the whole sequence runs that many times, interleaved (ar, jacobi, ..., ar, jacobi,
    ...), and each decoder keeps its run of median wall time, with every repeat's wall time beside it: a
    background burst on a small machine then hits every decoder alike instead of one of them. Outputs are the
    same in every repeat (greedy). ``warmup=False`` skips the untimed first runs where only outputs matter.
    ``references`` ({name: runner}, e.g. ``{"vllm": vllm_runner(llm)}``) run right after AR, in every repeat.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    references = references or {}
    order = ["ar", *references] + [d for d in decoders if d != "ar"]
    # ``auto`` plans with the forward cost curve of this machine, measured once here, outside the timed runs.
    curve = None
    if "auto" in order:
        curve = measure_cost_curve(model, batch_size, max(64, base_config.block_size))
    runner = {name: references.get(name) or _runner(name, curve) for name in order}
    # First-call costs (allocations, kernel selection; on a GPU many times a forward) are not timed: each
    # decoder first runs briefly on one batch, so every query width and batch shape has been met once.
    if warmup:
        short = base_config.model_copy(update={"max_new_tokens": min(32, base_config.max_new_tokens)})
        for name in order:
            runner[name](model, prompts[:batch_size], _config(short, name), eos_ids, batch_size)
    timed: dict[str, list[DecoderRun]] = {name: [] for name in order}
    for repeat in range(repeats):
        for name in order:
            progress = progress_factory(name, len(prompts)) if progress_factory and repeat == 0 else None
            timed[name].append(runner[name](model, prompts, _config(base_config, name), eos_ids, batch_size, progress))
            logger.info(
                "%s (repeat %d/%d): %d tokens in %.2fs",
                name,
                repeat + 1,
                repeats,
                sum(len(r.token_ids) for r in timed[name][-1].results),
                timed[name][-1].wall_s,
            )
    chosen = {}
    for name, runs in timed.items():
        chosen[name] = sorted(runs, key=lambda run: run.wall_s)[(len(runs) - 1) // 2]
        chosen[name].repeat_wall_s = [run.wall_s for run in runs]
    return chosen


def _runner(name: str, cost_curve: CostCurve | None) -> Callable[..., DecoderRun]:
    return run_generate if name == GENERATE else partial(run_decoder, cost_curve=cost_curve)


def _config(base_config: DecodeConfig, name: str) -> DecodeConfig:
    # a reference (generate, vllm) decodes greedily whatever the decoder field says
    return base_config if name in (GENERATE, VLLM) else base_config.model_copy(update={"decoder": name})


def bench_decoders(
    model,
    prompts: list[list[int]],
    decoders: list[str],
    base_config: DecodeConfig,
    eos_ids: list[int],
    batch_size: int = 1,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
    repeats: int = 1,
    references: dict[str, Callable[..., DecoderRun]] | None = None,
) -> dict[str, dict]:
    """{decoder: bench fields} for the requested decoders and the ``references`` (AR always runs)."""
    runs = run_decoders(
        model, prompts, decoders, base_config, eos_ids, batch_size, progress_factory, repeats, references=references
    )
    return summarize_runs(runs, prompts, [*decoders, *(references or {})], list(references or {}))


def summarize_runs(runs: dict[str, DecoderRun], prompts, names: list[str], references: list[str]) -> dict:
    """Each named run against AR, and against each outside reference (``speedup_vs_vllm``...)."""
    summaries = {}
    for name in names:
        summaries[name] = summarize(runs[name], prompts, runs["ar"])
        for reference in references:
            if reference != name:
                summaries[name].update(versus(runs[name], runs[reference], reference))
    return summaries

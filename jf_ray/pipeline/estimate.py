"""The job's first ETA: stage durations from this machine's measured training step, not another machine's.

Before anything runs, the job times a few training steps of the base preset's model here (random weights,
about two seconds): at the preset's resolved precision for the base stage, whose duration is then steps x
measured step, and in fp32 for the machine's speed, which scales the other stages' durations. Those were
timed on the reference machine below; the graph rescales them again by the pace of the stages that finish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jf_ray.pipeline.config import PipelineConfig
from jf_ray.pipeline.outputs import stage_name

logger = logging.getLogger(__name__)

# The `small` preset's fp32 training step (12 x 384 tokens, 2 threads), as `time_train_steps` measures it, on the
# machine kind the per-stage seconds of `stage_seconds` were timed on: 0.46-0.49 s on a 2-core AMD EPYC with
# AVX512-BF16, torch 2.13, idle. There the quickstart's stages took: collection 99-107 s per round of 1,792
# prompts, round 1's training 163-186 s, evaluation 13-16 s, benchmark 49-60 s (docs/results.md).
REFERENCE_FP32_STEP_S = 0.47


@dataclass(frozen=True)
class MachinePace:
    base_step_s: float | None  # the base preset's step at its precision; None when no base is built
    speed: float  # reference fp32 step / this machine's fp32 step: above 1 is faster than the reference


def measure_pace(cfg: PipelineConfig, build_base: bool) -> MachinePace:
    """Time the base preset's training step here: at its resolved precision and in fp32."""
    from jf_ray.basemodel.build import resolved_for_this_machine
    from jf_ray.basemodel.presets import resolve_preset
    from jf_ray.basemodel.pretrain import time_train_steps

    fp32_reference = resolve_preset("small", ["precision=fp32"])
    fp32_step = time_train_steps(fp32_reference)
    base_step, note = None, ""
    if build_base:
        preset = resolved_for_this_machine(resolve_preset(cfg.base.preset, cfg.base.override_args()))
        same = preset.precision == "fp32" and _step_shape(preset) == _step_shape(fp32_reference)
        base_step = fp32_step if same else time_train_steps(preset)
        note = f", base step {base_step * 1000:.0f} ms in {preset.precision}"
    pace = MachinePace(base_step, REFERENCE_FP32_STEP_S / fp32_step)
    logger.info(
        "measured here: fp32 training step %.0f ms (%.2fx the reference machine)%s",
        fp32_step * 1000,
        pace.speed,
        note,
    )
    return pace


def _step_shape(preset) -> tuple:
    """What a training step's cost depends on (not the number of steps or the corpus)."""
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    return tuple(getattr(preset, name) for name in (*fields, "seq_len", "batch_size"))


def stage_seconds(cfg: PipelineConfig, pace: MachinePace) -> dict[str, float]:
    """Estimated seconds of every stage kind on this machine (the graph's stage weights)."""
    from jf_ray.basemodel.presets import resolve_preset

    base = 5.0
    if pace.base_step_s is not None:
        preset = resolve_preset(cfg.base.preset, cfg.base.override_args())
        base = 30.0 / pace.speed + preset.steps * pace.base_step_s  # data and tokenizer, then the steps
    prompts = sum(cfg.workloads.train_prompts.get(task, 0) for task in cfg.workloads.tasks) or 512
    quality = sum(cfg.workloads.quality_prompts.get(task, 0) for task in cfg.workloads.tasks)
    bench_runs = len(cfg.evaluation.decoders) * cfg.evaluation.repeats * (len(cfg.rounds) + 1)
    bench_prompts = sum(cfg.workloads.benchmark_prompts(task) for task in cfg.workloads.tasks)
    # Seconds on the reference machine, scaled to this one.
    reference = {
        "collect": 0.075 * prompts,  # per prompt, up to 256 tokens each
        "eval": 5.0 + 0.04 * quality,  # batched greedy AR
        "bench": 0.35 * bench_runs * bench_prompts,  # one decoder run of one prompt at batch 1
    }
    for k, rnd in enumerate(cfg.rounds, start=1):
        reference[stage_name("train", k)] = rnd.steps * (0.3 + 0.003 * rnd.block_size)  # 2 workers, micro-batch 2
    return {"base": base, **{name: seconds / pace.speed for name, seconds in reference.items()}}

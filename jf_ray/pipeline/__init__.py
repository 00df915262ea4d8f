"""The progressive Jacobi Forcing job graph: base -> rounds of collect/pack/train/evaluate -> bench -> report.

Ray must be up: the entry point (``jobs/progressive.py``) joins or starts it once, and everything below
assumes it (docs/cluster.md).

>>> from jf_ray.raycluster import init_ray                             # doctest: +SKIP
>>> from jf_ray.pipeline import PipelineConfig, run_pipeline          # doctest: +SKIP
>>> cfg = PipelineConfig.load("jobs/configs/smoke.yaml")              # doctest: +SKIP
>>> init_ray(cfg.ray_address)                                         # doctest: +SKIP
>>> run_pipeline(cfg).outputs.report.markdown_uri                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jf_ray.pipeline.config import PipelineConfig
from jf_ray.pipeline.estimate import measure_pace
from jf_ray.pipeline.graph import invalidate_from, marker_uri, run_graph
from jf_ray.pipeline.outputs import RunOutputs
from jf_ray.pipeline.stages import build_stages, check_cluster_fits
from jf_ray.precision import cpu_info, resolve_precision
from jf_ray.storage import exists

logger = logging.getLogger(__name__)


@dataclass
class PipelineRun:
    outputs: RunOutputs  # every stage's typed outputs, run now or read back from its marker
    executed: list[str]
    skipped: list[str]


def run_pipeline(cfg: PipelineConfig, rerun: str | None = None) -> PipelineRun:
    """Run (or resume) the whole graph on the Ray cluster this process has joined; ``rerun`` re-executes that
    stage and everything after it."""
    if rerun:
        logger.info("invalidated stages: %s", ", ".join(invalidate_from(cfg.run_dir, build_stages(cfg), rerun)))
    check_cluster_fits(cfg)
    log_machine()
    build_base = cfg.base.model is None and not exists(marker_uri(cfg.run_dir, "base"))
    result = run_graph(cfg.run_dir, build_stages(cfg, measure_pace(cfg, build_base)))
    return PipelineRun(RunOutputs(result.outputs), result.executed, result.skipped)


def log_machine() -> None:
    """The processor and what ``auto`` precision means on it, once at the start (every report records it)."""
    cpu = cpu_info()
    logger.info(
        "machine: %s, %d threads, %s; base: %s; training: %s; decoding: %s",
        cpu.model,
        cpu.threads,
        " ".join(cpu.features) or "no SIMD features read",
        resolve_precision("auto", "cpu", "pretrain").reason,
        resolve_precision("auto", "cpu", "train").reason,
        resolve_precision("auto", "cpu", "decode").reason,
    )


__all__ = ["PipelineConfig", "PipelineRun", "RunOutputs", "run_pipeline"]

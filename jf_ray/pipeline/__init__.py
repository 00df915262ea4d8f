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
from jf_ray.pipeline.graph import invalidate_from, run_graph
from jf_ray.pipeline.outputs import RunOutputs
from jf_ray.pipeline.stages import build_stages, check_cluster_fits

logger = logging.getLogger(__name__)


@dataclass
class PipelineRun:
    outputs: RunOutputs  # every stage's typed outputs, run now or read back from its marker
    executed: list[str]
    skipped: list[str]


def run_pipeline(cfg: PipelineConfig, rerun: str | None = None) -> PipelineRun:
    """Run (or resume) the whole graph on the Ray cluster this process has joined; ``rerun`` re-executes that
    stage and everything after it."""
    stages = build_stages(cfg)
    if rerun:
        logger.info("invalidated stages: %s", ", ".join(invalidate_from(cfg.run_dir, stages, rerun)))
    check_cluster_fits(cfg)
    result = run_graph(cfg.run_dir, stages)
    return PipelineRun(RunOutputs(result.outputs), result.executed, result.skipped)


__all__ = ["PipelineConfig", "PipelineRun", "RunOutputs", "run_pipeline"]

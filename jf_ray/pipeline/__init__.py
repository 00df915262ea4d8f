"""The progressive Jacobi Forcing job graph: base -> rounds of collect/pack/train/evaluate -> bench -> report.

>>> from jf_ray.pipeline import PipelineConfig, run_pipeline          # doctest: +SKIP
>>> run_pipeline(PipelineConfig.load("jobs/configs/smoke.yaml"))       # doctest: +SKIP
"""

from __future__ import annotations

import logging

from jf_ray.pipeline.config import PipelineConfig
from jf_ray.pipeline.graph import GraphRun, invalidate_from, run_graph
from jf_ray.pipeline.stages import build_stages, check_cluster_fits

logger = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, rerun: str | None = None) -> GraphRun:
    """Run (or resume) the whole graph; ``rerun`` re-executes that stage and everything after it."""
    from jf_ray.raycluster import init_ray

    stages = build_stages(cfg)
    if rerun:
        logger.info("invalidated stages: %s", ", ".join(invalidate_from(cfg.run_dir, stages, rerun)))
    init_ray(cfg.ray_address)
    check_cluster_fits(cfg)
    return run_graph(cfg.run_dir, stages)


__all__ = ["GraphRun", "PipelineConfig", "run_pipeline"]

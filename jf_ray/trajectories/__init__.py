"""Jacobi trajectory collection: recorder and backends (plain torch), Parquet schema, Ray actor pool.

``collect(CollectConfig)`` is the facade; it imports Ray only when it runs. The recorder and backends can
be used without Ray (``record_trajectories(TransformersBackend(model, tokenizer), prompts, ...)``).
"""

from jf_ray.prompts import Prompt, read_prompts, text_prompt_id
from jf_ray.trajectories.backends import BackendSpec, GenerationBackend, TransformersBackend, make_backend
from jf_ray.trajectories.collect import collect, verify_exactly_once
from jf_ray.trajectories.config import CollectConfig
from jf_ray.trajectories.recorder import TrajectoryError, record_trajectories, trajectory_rows
from jf_ray.trajectories.schema import TRAJECTORY_COLUMNS, TRAJECTORY_SCHEMA

__all__ = [
    "TRAJECTORY_COLUMNS",
    "TRAJECTORY_SCHEMA",
    "BackendSpec",
    "CollectConfig",
    "GenerationBackend",
    "Prompt",
    "TrajectoryError",
    "TransformersBackend",
    "collect",
    "make_backend",
    "read_prompts",
    "record_trajectories",
    "text_prompt_id",
    "trajectory_rows",
    "verify_exactly_once",
]

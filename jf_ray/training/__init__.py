"""Jacobi Forcing post-training: noise-aware masks, losses, collate, the plain torch loop (no Ray), and the
Ray Train layer in :mod:`ray_train` (facade :func:`train`, imported lazily so this package stays Ray-free).
"""

from jf_ray.training.config import LossConfig, MaskConfig, TrainConfig

__all__ = ["LossConfig", "MaskConfig", "TrainConfig", "train"]


def train(config: TrainConfig) -> dict:
    """Run Jacobi Forcing training on Ray Train (see :func:`jf_ray.training.ray_train.train`)."""
    from jf_ray.training.ray_train import train as run

    return run(config)

"""Packing: Jacobi trajectories -> training sequences ``prompt ++ (noisy_j ++ clean_j)_j`` (schema jf_ray.packed).

Plain functions in :mod:`schedules` and :mod:`pack`; the Ray Data job over trajectory shards in
:mod:`ray_pack` (facade :func:`pack`, imported lazily so this package stays Ray-free).
"""

from jf_ray.packing.pack import PackedSequence, PackOptions, PackStats, pack_response, pack_rows
from jf_ray.packing.schedules import STRATEGIES, choose_state, noise_ratio, target_ratios

__all__ = [
    "STRATEGIES",
    "PackOptions",
    "PackStats",
    "PackedSequence",
    "choose_state",
    "noise_ratio",
    "pack",
    "pack_response",
    "pack_rows",
    "target_ratios",
]


def pack(config):
    """Run the packing job (see :func:`jf_ray.packing.ray_pack.pack`)."""
    from jf_ray.packing.ray_pack import pack as run

    return run(config)

"""jf-ray: Jacobi Forcing on Ray.

The algorithm lives in plain torch modules (``decoding``, ``trajectories``, ``packing``, ``training``);
Ray code (collection actors, Train loops, Serve deployments, the driver job) is a thin layer over them.
"""

__version__ = "0.1.0"

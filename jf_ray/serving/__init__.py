"""Serving: the Jacobi decoder as an autoscaling, OpenAI-compatible Ray Serve application.

``jf_ray.serving:app`` (an application builder, alias of ``build_app``) is what ``serve run`` and
``serve deploy`` import::

    serve run jf_ray.serving:app model=/path/to/checkpoint decode.decoder=multiblock

Modules: ``protocol`` (OpenAI bodies, errors), ``config`` (ServeConfig), ``scheduler`` (continuous batching
thread), ``detokenizer`` (text deltas, stop strings), ``generation`` (one request's life), ``service``
(model + validation, no Ray), ``metrics`` (Ray metrics), ``deployment`` (FastAPI ingress + Serve
deployment + builder); the HTTP load generator is :mod:`jf_ray.bench.serve`. The builder's module is not
named ``app``: a submodule ``app`` would become the package attribute ``app`` and shadow the builder once
imported.
Ray and FastAPI are imported only when ``app``/``build_app`` is used.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "build_app"):
        from jf_ray.serving.deployment import build_app

        return build_app
    raise AttributeError(f"module 'jf_ray.serving' has no attribute {name!r}")

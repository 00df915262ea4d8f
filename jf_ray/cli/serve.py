"""``jf-ray serve``: run the OpenAI-compatible Jacobi decoding service in the foreground.

Starts (or joins, with ``--address``) a Ray cluster, deploys the Serve app and waits; SIGINT or SIGTERM
deletes the app (and shuts Serve and Ray down when this command started them), so nothing keeps running.
"""

from __future__ import annotations

import argparse

from jf_ray.cli.common import (
    FieldFlag,
    add_address_option,
    add_config_options,
    config_from_args,
    decoder_name,
    join_or_start_ray,
    positive_int,
)
from jf_ray.decoding.registry import describe

FLAGS = (
    FieldFlag("--model", "checkpoint: local dir, file:// or s3:// URI", required=True),
    FieldFlag("--decoder", f"default decoder ({describe()})", decoder_name, key="decode.decoder"),
    FieldFlag("--block-size", "Jacobi block size n", positive_int, key="decode.block_size"),
    FieldFlag(
        "--engine",
        "jf (default: jf-ray's engine) or vllm (vLLM's, drafting with JacobiProposer; docs/vllm.md)",
        choices=("jf", "vllm"),
    ),
    FieldFlag("--host", "bind address (default 127.0.0.1)"),
    FieldFlag("--port", "HTTP port (default 8000)", positive_int),
    FieldFlag("--model-name", "name clients pass as `model`"),
    FieldFlag("--max-batch-size", "requests per forward", positive_int),
    FieldFlag("--max-replicas", "autoscaling upper bound", positive_int, key="autoscaling.max_replicas"),
    FieldFlag("--api-key", "require `Authorization: Bearer KEY`"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint as an OpenAI-compatible API (Ray Serve, continuous batching)",
        description="Deploys jf_ray.serving:app on Ray Serve and runs until interrupted. Settings: a ServeConfig "
        "(e.g. the `args:` of serve_config.yaml).",
    )
    add_config_options(parser, "ServeConfig", FLAGS)
    add_address_option(parser)
    parser.add_argument("--ray-cpus", type=positive_int, default=None, help="CPUs of a locally started cluster")
    parser.set_defaults(func=run)


def load_config(args: argparse.Namespace):
    from jf_ray.serving.config import ServeConfig

    return config_from_args(ServeConfig, args, FLAGS)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from jf_ray.modeling import local_model_path

    config = load_config(args)
    if "://" not in config.model or config.model.startswith("file://"):
        local_model_path(config.model)  # a missing local checkpoint is exit 2 now, not a dying replica later
        if config.engine == "vllm":  # as is a checkpoint that vLLM cannot run
            from jf_ray.vllm_engine import check_vllm_model, serving_options

            check_vllm_model(local_model_path(config.model), serving_options(config))
    started_cluster = join_or_start_ray(args, num_cpus=args.ray_cpus)  # before ray is imported
    from ray import serve

    from jf_ray.serving.deployment import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        engine = f"engine {config.engine}, decoder {config.decode.decoder}"
        print(f"serving {config.served_model_name!r} ({engine}) at {base}/v1", flush=True)
        print(
            f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{config.served_model_name}", "prompt": "def ", "max_tokens": 32}}\'',
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("shutting down", flush=True)
    finally:
        _teardown(config.app_name, started_cluster)
    return 0


def _teardown(app_name: str, started_cluster: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(app_name)
    finally:
        if started_cluster:
            serve.shutdown()
            ray.shutdown()

"""Starting or joining a Ray cluster the same way from the CLI, the driver job and the tests."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Only for a cluster we start ourselves on this machine: keep Ray on 127.0.0.1, send no usage stats,
# no token auth between local processes, and keep the AWS SDKs off the instance-metadata address.
LOCAL_CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def set_local_cluster_env() -> None:
    """Apply LOCAL_CLUSTER_ENV. Ray reads these when it is *imported*: call before the first ``import ray``."""
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)


def prepare_local_ray(explicit_address: str | None = None) -> None:
    """At an entry point, before anything imports ray: local-cluster settings unless a cluster is named."""
    if not (explicit_address or os.environ.get("RAY_ADDRESS")):
        set_local_cluster_env()


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join ``address`` (or ``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local cluster."""
    prepare_local_ray(address)  # read when ray is imported: entry points call this earlier still
    address = address or os.environ.get("RAY_ADDRESS")
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if not address:
        # "local" always starts a fresh cluster; ray.init() would silently join any `ray start` cluster here.
        address = "local"
        set_local_cluster_env()
        kwargs.setdefault("include_dashboard", False)
        kwargs["num_cpus"] = num_cpus
    kwargs.setdefault("log_to_driver", True)
    ctx = ray.init(address=address, **kwargs)
    logger.info("ray: %s", "started a local cluster" if address == "local" else "joined " + address)
    return ctx

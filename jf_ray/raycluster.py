"""Starting or joining a Ray cluster the same way from the CLI, the driver job and the tests.

A process joins the cluster named by an address (``--address``, the job config's ``ray_address``, or
``RAY_ADDRESS``, which ``ray job submit`` sets for the driver) or, with none, starts a private local one. The
local-only environment (loopback binding, no token auth, no EC2 metadata) is set only in the second case:
on a real cluster the instance profile and the cluster's own auth must keep working. See docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import socket

from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

# Only for a cluster we start ourselves on this machine: keep Ray on 127.0.0.1, send no usage stats,
# no token auth between local processes, and keep the AWS SDKs off the instance-metadata address.
LOCAL_CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
}
CONNECT_TIMEOUT_S = 5.0


class RayAddressError(UserInputError):
    """The Ray cluster named by an address cannot be joined (unreachable, wrong kind of address, auth)."""


class ClusterTooSmall(UserInputError):
    """A resource request no node of the cluster (or of its autoscaler's node types) can ever hold."""


def set_local_cluster_env() -> None:
    """Apply LOCAL_CLUSTER_ENV. Ray reads these when it is *imported*: call before the first ``import ray``."""
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)


def resolve_address(explicit_address: str | None = None) -> str | None:
    """The cluster to join: the explicit address, else ``RAY_ADDRESS``; None (or "local") = start our own."""
    address = explicit_address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def prepare_local_ray(explicit_address: str | None = None) -> None:
    """At an entry point, before anything imports ray: local-cluster settings unless a cluster is named."""
    if resolve_address(explicit_address) is None:
        set_local_cluster_env()


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join ``address`` (or ``RAY_ADDRESS``) or start a local cluster; a no-op once Ray is initialized.

    An address that cannot be joined raises :class:`RayAddressError` (exit 2 at the CLI) naming it and why,
    instead of Ray's retry loop of several minutes."""
    address = resolve_address(address)
    if address is None:
        set_local_cluster_env()  # before ray is imported, where this call is the first to import it
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address is None:
        # "local" always starts a fresh cluster; ray.init() would silently join any `ray start` cluster here.
        kwargs.setdefault("include_dashboard", False)
        kwargs["num_cpus"] = num_cpus
    else:
        check_reachable(address)
    kwargs.setdefault("log_to_driver", True)
    try:
        ctx = ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address is None:
            raise
        auth = os.environ.get("RAY_AUTH_MODE", "default")
        hint = f"it answers but refused this client (RAY_AUTH_MODE={auth}); a cluster with token auth needs "
        hint += "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
        raise RayAddressError(f"cannot join the Ray cluster at {address}: {exc}; {hint}") from exc
    logger.info("ray: %s", "started a local cluster" if address is None else "joined " + address)
    return ctx


def check_reachable(address: str) -> None:
    """Fail fast on an address ``ray.init`` cannot use or whose GCS (or Ray Client server) does not answer."""
    if address == "auto":
        return  # ray.init resolves it from this machine's running cluster and says so when there is none
    if address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"{address} is a dashboard (job submission) address; to join a cluster give its GCS address "
            "(host:6379) or a Ray Client address (ray://host:10001), or submit with `ray job submit`"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayAddressError(f"cannot join the Ray cluster at {address}: {exc.strerror or exc}") from exc


def node_capacities() -> list[dict[str, float]]:
    """Total resources of every alive node, plus every node type the cluster's autoscaler may still add."""
    import ray

    capacities = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    try:
        config = ray._private.state.state.get_cluster_config()  # autoscaler node types; None without one
    except Exception:  # noqa: BLE001 - a private API: without it, only the running nodes count
        config = None
    for group in config.node_group_configs if config else []:
        if group.max_count != 0:
            capacities.append({key: float(value) for key, value in group.resources.items()})
    return capacities


def require_fit(request: dict[str, float], what: str) -> None:
    """Raise :class:`ClusterTooSmall` when no node (running or addable) can hold ``request`` at once."""
    request = {key: float(value) for key, value in request.items() if value}
    capacities = node_capacities()
    if any(all(cap.get(key, 0.0) >= value for key, value in request.items()) for cap in capacities):
        return
    nodes = "; ".join(_describe(cap) for cap in capacities) or "none"
    raise ClusterTooSmall(f"{what} requests {request} per worker, but no node can hold it (nodes: {nodes})")


def largest_cpus(needs_gpu: bool = False) -> float:
    """CPUs of the biggest node (among those with a GPU when ``needs_gpu``); 0 when there is none."""
    return max((cap.get("CPU", 0.0) for cap in node_capacities() if cap.get("GPU", 0.0) or not needs_gpu), default=0)


def _describe(capacity: dict[str, float]) -> str:
    shown = sorted((k, v) for k, v in capacity.items() if not (k.startswith("node:") or k.endswith("memory")))
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in shown) + "}"


def show_info_logs_in_worker() -> None:
    """Inside a Ray task or actor: let this package's INFO lines through (Ray leaves a worker's root logger at
    WARNING); the worker's stderr is forwarded to the driver's log, which is where a long build shows progress."""
    package = logging.getLogger("jf_ray")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.propagate = False
    package.setLevel(logging.INFO)

"""A multi-node Ray cluster on this one machine, started the way a real one is: ``ray start`` per node.

Each node has its own temp dir and ports. Worker nodes run in their own mount namespace (``unshare --mount``,
as root) with empty tmpfs mounts over the given hidden directories (the checkout, the driver's run and
scratch directories, the head's temp dir), so a stage that hands a driver-local path to a worker fails.
Processes are found and stopped by their node's temp dir, never by name: other Ray clusters share the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 300 * 1024**2


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are picked, because a port released
    at once may be handed out again, and Ray refuses a node whose components were given the same port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def start_moto_server(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a process of its own; returns it and its endpoint URL once it accepts connections.

    Not in the test process: moto's server imports Flask, whose module-level proxies raise on any attribute
    lookup outside a request, and vLLM's in-process engine start scans every loaded module's globals."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)


@dataclass
class Node:
    name: str
    temp_dir: str
    num_cpus: int

    def processes(self, extra_marker: str | None = None) -> list[psutil.Process]:
        """Every process of this node: its command line names the node's temp dir (session paths included)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or []) + " "
            if self.temp_dir + "/" in cmdline or self.temp_dir + " " in cmdline:
                found.append(proc)
            elif extra_marker and extra_marker in cmdline:
                found.append(proc)
        return found

    def raylet(self) -> psutil.Process:
        return next(p for p in self.processes() if "raylet" in Path((p.info["cmdline"] or [""])[0]).name)


class LocalRayCluster:
    """Head (``head_cpus`` CPUs, dashboard for job submission) plus worker nodes added with :meth:`add_worker`."""

    def __init__(self, root: str, env: dict[str, str], hidden_dirs: list[str], head_cpus: int = 0):
        self.root, self.hidden_dirs = root, outermost([d for d in hidden_dirs if Path(d).is_dir()])
        # A multi-node cluster needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1; Ray then binds this machine's own address.
        dropped = ("RAY_ADDRESS", "PYTHONPATH", "AWS_EC2_METADATA_DISABLED")
        self.env = {k: v for k, v in os.environ.items() if k not in dropped}
        self.env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"} | env
        # `python` in a job's entrypoint is the node's own: this interpreter's environment, as in an image
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env['PATH']}"
        self.ip = node_ip_address()
        self.port, self.dashboard_port, client_port = free_ports(3)
        self.nodes: list[Node] = []
        head_args = ["--head", f"--port={self.port}", f"--ray-client-server-port={client_port}", *self._dashboard()]
        self.head = self._start(Node("h", f"{root}h", head_cpus), head_args)

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _dashboard(self) -> list[str]:
        return ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]

    def add_worker(self, num_cpus: int = 1) -> Node:
        """A worker node with ``num_cpus`` CPUs and a custom resource named after it (to find it in Ray's state)."""
        name = f"w{len(self.nodes) - 1}"
        node = Node(name, f"{self.root}{name}", num_cpus)
        return self._start(node, [f"--address={self.gcs_address}"], hide=True)

    def _start(self, node: Node, role_args: list[str], hide: bool = False) -> Node:
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        Path(node.temp_dir, "cache").mkdir(parents=True)
        # Worker ports below the kernel's ephemeral range, where the other components' free ports come from:
        # Ray refuses a node whose worker range holds one of its own component ports.
        low = 20000 + 1000 * len(self.nodes) + 100 * (os.getpid() % 10)
        args = [RAY, "start", *role_args, f"--num-cpus={node.num_cpus}", f"--temp-dir={node.temp_dir}"]
        args += [f"--resources={json.dumps({node.name: 1})}", f"--object-store-memory={OBJECT_STORE_BYTES}"]
        args += ["--disable-usage-stats", f"--min-worker-port={low}", f"--max-worker-port={low + 99}"]
        flags = ("node-manager", "object-manager", "metrics-export", "dashboard-agent-listen", "dashboard-agent-grpc")
        flags += ("runtime-env-agent",)
        args += [f"--{flag}-port={port}" for flag, port in zip(flags, free_ports(len(flags)))]
        env = self.env | {"JF_CACHE_DIR": f"{node.temp_dir}/cache"}
        command = args
        if hide:  # own mount namespace: the hidden directories are empty there
            mounts = "; ".join(f"mount -t tmpfs -o size=4m tmpfs {shlex.quote(d)}" for d in self.hidden_dirs)
            command = ["unshare", "--mount", "sh", "-ec", f"{mounts}; exec {shlex.join(args)}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=node.temp_dir)
        if done.returncode:
            raise RuntimeError(f"ray start of node {node.name} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        self.nodes.append(node)
        return node

    def kill_raylet(self, node: Node) -> None:
        """SIGKILL the node's raylet (its workers and actors die with it), as a lost machine would."""
        node.raylet().send_signal(signal.SIGKILL)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            procs = node.processes(extra_marker=f"--address={self.gcs_address} ")
            for proc in procs:
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=10)
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def node_ip_address() -> str:
    """The address Ray binds on this machine when multi-node clusters are enabled (what it advertises)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        return sock.getsockname()[0]


def outermost(dirs: list[str]) -> list[str]:
    """``dirs`` without those inside another one: once a tmpfs covers the outer directory, the inner one is
    gone (an editable install of the checkout lives inside the checkout)."""
    paths = [Path(d).resolve() for d in dirs]
    return [str(p) for p in dict.fromkeys(paths) if not any(o != p and o in p.parents for o in paths)]


def checkout_entries(repo: Path) -> list[str]:
    """Every top-level entry of the checkout except the one holding this Python's environment (``.venv`` in
    CI): hiding the whole checkout would hide the interpreter the nodes run on."""
    prefix = Path(sys.prefix).resolve()
    return [str(entry) for entry in sorted(repo.iterdir()) if entry != prefix and entry not in prefix.parents]


def installed_jf_ray() -> list[str]:
    """The directory of the jf_ray that this Python imports without PYTHONPATH (an installed copy), if any."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; s = u.find_spec('jf_ray'); print(s.origin if s and s.origin else '')"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True)
    origin = done.stdout.strip()
    return [str(Path(origin).parent)] if origin else []


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

"""Run untrusted (model-written) Python in a separate, limited process and get the outcome back as data.

Every program runs in a fresh child process (:mod:`jf_ray.sandbox.child`), never in the caller's process:

* a wall-clock timeout (the whole process group is killed), CPU-time, address-space, file-size and core
  limits (``setrlimit``, lowered by the child before the program runs; raising them back is refused);
* a temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
* an audit hook (``sys.addaudithook``) that refuses sockets, new processes (fork, exec, spawn, subprocess),
  ctypes, and writes, renames and deletes outside the working directory;
* where ``unshare`` works (Linux, root or user namespaces), also kernel-level isolation: an empty network
  namespace, a PID namespace (everything the program starts dies with it), every mount read-only except the
  working directory, and all capabilities dropped (``setpriv``).

We run as root, so file permissions and ``RLIMIT_NPROC`` protect nothing; the hook and the namespaces do.
The sandbox contains accidents and runaway code; it does not hide its result channel from a program written
to forge a pass. See docs/evaluation.md ("Sandbox").
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("child.py")
# Runs inside the new namespaces: a private bind of the working directory, every mount read-only, the
# working directory writable again (entered anew: the inherited cwd is the read-only mount below), then the
# child without capabilities.
_NAMESPACE_SCRIPT = """
mount --bind "$1" "$1" || exit 97
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do mount -o remount,bind,ro "$m" 2>/dev/null; done
mount -o remount,bind,rw "$1" || exit 97
cd "$1" || exit 97
shift
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs "$@"
"""
Status = Literal["passed", "failed", "timeout", "crashed"]


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock of the whole child process, start-up included
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write (in its working directory)

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class ExecutionResult:
    status: Status  # passed: ran to the end; failed: raised; timeout: killed at the deadline; crashed: no report
    error: str = ""
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """``namespaces`` where unshare/setpriv work here, else ``audit-hook`` (the hook and limits only)."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return "audit-hook"
    with tempfile.TemporaryDirectory(prefix="jf-sandbox-probe-") as workdir:
        probe = subprocess.run(_command(workdir, "namespaces", [sys.executable, "-c", "pass"]), capture_output=True)
    if probe.returncode != 0:
        logger.warning(
            "sandbox: no namespaces here (%s); relying on the audit hook and limits",
            probe.stderr.decode(errors="replace").strip()[-200:],
        )
        return "audit-hook"
    return "namespaces"


def _command(workdir: str, mode: str, child: list[str]) -> list[str]:
    if mode != "namespaces":
        return child
    unshare = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child"]
    return [*unshare, "sh", "-c", _NAMESPACE_SCRIPT, "sh", workdir, *child]


def execute(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``program`` (Python source) in a fresh sandboxed process; it passes if it runs to the end."""
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="jf-sandbox-")
    try:
        job = {"program": program, "workdir": workdir, "memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s}
        job["file_mb"] = limits.file_mb
        command = _command(workdir, isolation(), [sys.executable, "-I", "-B", str(CHILD)])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecutionResult("timeout", f"no result within {limits.timeout_s:g} s", _since(start))
        _kill_group(proc)  # anything it left behind
        return _outcome(proc.returncode, out, err, _since(start))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def execute_many(
    programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
) -> list[ExecutionResult]:
    """:func:`execute` over ``programs`` with up to ``workers`` processes at a time (default: the CPU count)."""
    workers = workers or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: execute(program, limits), programs))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def _outcome(returncode: int, out: bytes, err: bytes, wall_s: float) -> ExecutionResult:
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict) and report.get("status") in ("passed", "failed"):
        return ExecutionResult(report["status"], str(report.get("error", "")), wall_s)
    if returncode < 0:
        reason = f"killed by {signal.Signals(-returncode).name}"
    else:
        reason = f"exit code {returncode} without a result"
    tail = err.decode(errors="replace").strip()[-300:]
    return ExecutionResult("crashed", f"{reason}{': ' + tail if tail else ''}", wall_s)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 4)

"""The sandbox's child process: reads one job from stdin, runs the program under limits, reports as JSON.

Run as ``python -I -B child.py`` (isolated: no site-packages, no environment, nothing of ours imported). It
lowers its own resource limits, then installs an audit hook that refuses sockets, new processes, native code
(ctypes), limit changes and writes outside the working directory, and only then compiles and runs the
program. The program's own output goes to /dev/null; the outcome is one JSON line on the saved stdout.
Standard library only: this file must not import jf_ray (see docs/evaluation.md, "Sandbox").
"""

import json
import os
import resource
import sys
import traceback

BLOCKED_MODULES = frozenset(
    {
        "socket",
        "_socket",
        "ssl",
        "_ssl",
        "ctypes",
        "_ctypes",
        "subprocess",
        "_posixsubprocess",
        "multiprocessing",
        "_multiprocessing",
        "pty",
        "resource",
    }
)
REFUSED_PREFIXES = (
    "socket.",
    "subprocess.",
    "ctypes.",
    "pty.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "resource.setrlimit",
    "resource.prlimit",
)
PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.symlink",
        "os.link",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
        "shutil.copyfile",
        "shutil.copymode",
        "shutil.copystat",
        "shutil.move",
        "os.chflags",
        "os.mkfifo",
        "os.mknod",
    }
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(memory_mb: int, cpu_s: int, file_mb: int) -> None:
    for limit, value in (
        (resource.RLIMIT_AS, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, file_mb * 2**20),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


def make_hook(workdir: str):
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        real = os.path.realpath(os.fspath(path))
        return real == root or real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event.startswith(REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in BLOCKED_MODULES:
            raise PermissionError(f"sandbox: import of {args[0]} is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if writes and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        if event in PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the working directory")

    return hook


def run(job: dict) -> dict:
    try:
        code = compile(job["program"], "<program>", "exec")
        exec(code, {"__name__": "__main__"})
    except BaseException as exc:  # noqa: B036 - SystemExit and KeyboardInterrupt are failures of the program too
        frames = traceback.extract_tb(exc.__traceback__)
        line = next((f.lineno for f in reversed(frames) if f.filename == "<program>"), None)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "line": line}
    return {"status": "passed", "error": "", "line": None}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    set_limits(job["memory_mb"], job["cpu_s"], job["file_mb"])
    for name in BLOCKED_MODULES:
        sys.modules.pop(name, None)  # already imported modules would skip the import event
    sys.addaudithook(make_hook(job["workdir"]))
    outcome = run(job)
    os.write(result_fd, (json.dumps(outcome) + "\n").encode())
    os._exit(0)  # no atexit or finalizers of the program's objects after the report


if __name__ == "__main__":
    main()

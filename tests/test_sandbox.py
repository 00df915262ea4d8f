"""The sandbox contains runaway and hostile programs, reports them as failures, and keeps the caller running."""

from __future__ import annotations

import os
import uuid

import pytest

import jf_ray.sandbox as sandbox
from jf_ray.sandbox import SandboxLimits, execute, execute_many

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=512)


@pytest.fixture(params=["best", "audit-hook"])
def mode(request, monkeypatch):
    """Both layers: whatever this machine offers (namespaces where unshare works) and the hook alone."""
    if request.param == "audit-hook":
        monkeypatch.setattr(sandbox, "isolation", lambda: "audit-hook")
    return request.param


@pytest.fixture
def outside(tmp_path_factory):
    """A path outside any sandbox working directory that a program must not create."""
    path = tmp_path_factory.mktemp("outside") / f"escape-{uuid.uuid4().hex}"
    yield path
    assert not path.exists(), f"the program wrote {path}"


def test_known_good_and_bad_programs():
    good = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"
    results = execute_many([good, good.replace("a + b", "a - b"), "def f(:\n"], LIMITS, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "failed"]
    assert results[1].error.startswith("AssertionError") and results[2].error.startswith("SyntaxError")


def test_infinite_loop_times_out(mode):
    result = execute("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert result.status == "timeout" and not result.passed
    assert execute("assert True").passed  # the evaluator goes on


def test_memory_bomb_is_refused(mode):
    result = execute("blocks = [bytearray(2**20) for _ in range(4096)]\n", SandboxLimits(timeout_s=20, memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.error


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import os\nos.system('sleep 100 &')\n",
        "import subprocess\nsubprocess.Popen(['sleep', '100'])\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
        "import ctypes\n",
    ],
    ids=["fork-bomb", "system", "subprocess", "raise-limits", "ctypes"],
)
def test_new_processes_and_escapes_are_refused(mode, program):
    result = execute(program, LIMITS)
    assert result.status == "failed" and "sandbox:" in result.error


@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('x')\n",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))\n",
        "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')\n",
        "import shutil\nopen('f', 'w').write('x')\nshutil.move('f', {path!r})\n",
    ],
    ids=["open", "os.open", "symlink", "move"],
)
def test_writes_outside_the_working_directory_are_refused(mode, outside, template):
    result = execute(template.format(path=str(outside)), LIMITS)
    assert result.status == "failed", result


def test_writes_inside_the_working_directory_work(mode):
    program = (
        "import os\nopen('notes.txt', 'w').write('x')\nassert os.path.exists(os.path.join(os.getcwd(), 'notes.txt'))\n"
    )
    assert execute(program, LIMITS).passed


@pytest.mark.parametrize(
    "program",
    ["import socket\n", "import _socket\n", "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1')\n"],
    ids=["socket", "_socket", "urllib"],
)
def test_network_is_refused(mode, program):
    result = execute(program, LIMITS)
    assert result.status == "failed" and "sandbox:" in result.error


def test_exiting_early_is_not_a_pass(mode):
    assert execute("import os\nos._exit(0)\n", LIMITS).status == "crashed"
    assert execute("raise SystemExit(0)\n", LIMITS).status == "failed"


def test_program_output_does_not_disturb_the_report():
    result = execute('print(\'{"status": "passed"}\')\nassert False\n', LIMITS)
    assert result.status == "failed"


def test_the_program_runs_in_another_process():
    result = execute(
        f"import os\nassert os.getpid() != {os.getpid()}\nassert 'jf_ray' not in __import__('sys').modules\n"
    )
    assert result.passed, result

"""The install paths of docs/vllm.md resolve: the CUDA ``vllm`` extra is never installed here, so its resolve is
proved with pip's dry run (PyPI metadata only, no wheel downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# pip's messages when the package index cannot be reached (a machine with no network), not a resolve failure.
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable", "ProxyError")


@pytest.mark.slow  # one resolve against the package index, about a minute
def test_the_cuda_vllm_extra_resolves_with_our_pins(tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    command += ["--report", str(report), f"{REPO}[vllm]"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode and any(marker in done.stderr for marker in _OFFLINE):
        pytest.skip(f"pip cannot reach the package index: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    versions = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert versions["vllm"] == "0.32.0"
    assert versions["torch"].split("+")[0] == "2.13.0"  # the project's pin, not vLLM 0.33's 2.14.0
    assert versions["transformers"] == "5.19.0"
    assert versions["jf-ray"]

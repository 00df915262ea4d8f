"""The driver job graph end to end on the smoke config: report rows, resume, a killed stage, ray job submit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_nodes import free_ports

from jf_ray.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
DECODERS = ["ar", "jacobi", "rolling", "multiblock", "lookup", "generate"]
BENCH_FIELDS = ["tokens", "forwards", "tpf", "tokens_per_s", "wall_s", "exact_match_vs_ar"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """The tiny base model, built once for every run of this module."""
    from jf_ray.basemodel import build_base

    return str(build_base(tmp_path_factory.mktemp("base") / "tiny", preset="tiny", seed=0))


def smoke_config(run_dir: Path, base: str, *overrides: str) -> PipelineConfig:
    return PipelineConfig.load(SMOKE, [f"run_dir={run_dir}", f"base.model={base}", *overrides])


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory, ray_session):
    run_dir = tmp_path_factory.mktemp("smoke")
    result = run_pipeline(smoke_config(run_dir, tiny_base))
    return run_dir, result


def test_smoke_report_holds_every_row(finished_run):
    run_dir, result = finished_run
    assert result.skipped == []
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert [r["block_size"] for r in report["rounds"]] == [None, 8, 16]
    for rnd in report["rounds"]:
        assert set(rnd["eval"]) == {"math", "code"}
        for task, metric in (("math", "accuracy"), ("code", "pass_at_1")):
            for decoder in DECODERS:
                row = rnd["eval"][task][decoder]
                assert all(field in row for field in BENCH_FIELDS)
                assert row[metric] is not None
                assert row["exact_match_vs_ar"] == 1.0  # greedy decoders reproduce AR of the same model
                assert row["tpf"] >= 1.0
    assert report["rounds"][1]["model"] != report["rounds"][0]["model"]
    assert len(report["training"]) == 2 and all(c["steps"] for c in report["training"])
    markdown = (run_dir / "report.md").read_text()
    assert "| round 2 (n=16) | multiblock |" in markdown
    assert "Benchmark: greedy, n=16, pool_size 2, batch 2" in markdown
    quality = [rnd["math"] for rnd in report["round_eval"]]
    assert [q["n"] for q in quality] == [3, 3, 3] and all(0.0 <= q["accuracy"] <= 1.0 for q in quality)
    assert "| base | math | 3 |" in markdown
    assert "| round (n) | decoder | pass@1 | TPF | tokens/s | speed-up vs AR |" in markdown
    for plot in ("tpf.png", "speedup_vs_ar.png", "training.png"):
        assert (run_dir / plot).read_bytes()[:4] == b"\x89PNG"


def test_resuming_a_finished_run_does_no_work(finished_run, tiny_base):
    run_dir, first = finished_run
    markers = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").iterdir()}
    again = run_pipeline(smoke_config(run_dir, tiny_base))
    assert again.executed == []
    assert sorted(again.skipped) == sorted(first.executed)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").iterdir()} == markers


def test_a_stage_killed_midway_is_redone_on_resume(tiny_base, tmp_path, ray_session):
    """Kill the whole job (process group) while round 1 collects; resuming redoes it, every prompt once."""
    run_dir = tmp_path / "killed"
    overrides = [
        f"run_dir={run_dir}",
        f"base.model={tiny_base}",
        "workloads.train_prompts.math=24",
        "collect.shard_size=2",
        "collect.workers=1",
    ]
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "progressive.py"), "--config", str(SMOKE), *overrides],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trajectories = run_dir / "round1" / "trajectories"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(trajectories.glob("**/*.parquet")):
            assert job.poll() is None, "the job ended before collection started"
            time.sleep(0.2)
        assert list(trajectories.glob("**/*.parquet")), "collection never wrote a shard"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (run_dir / "stages" / "round1.collect.json").exists(), "killed too late: the stage had finished"
    result = run_pipeline(PipelineConfig.load(SMOKE, overrides))
    assert "round1.collect" in result.executed and "round0.eval" in result.skipped
    from jf_ray.storage import read_dataset

    table = read_dataset(str(trajectories), required_columns=["prompt_id", "block_index"])
    pairs = list(zip(table["prompt_id"].to_pylist(), table["block_index"].to_pylist()))
    assert len(pairs) == len(set(pairs))  # no block recorded twice
    assert {pid for pid, _ in pairs} == {f"math-{i:05d}" for i in range(24)} | {f"code-{i:05d}" for i in range(4)}
    assert json.loads((run_dir / "report.json").read_text())["rounds"][2]["eval"]["math"]["multiblock"]["tpf"] >= 1.0


def test_ray_job_submit_runs_the_smoke_job(tiny_base, tmp_path, ray_session):
    """`ray start --head` on 127.0.0.1, then `ray job submit -- python jobs/progressive.py ...`."""
    from jf_ray.raycluster import LOCAL_CLUSTER_ENV

    env = {**os.environ, **LOCAL_CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    run_dir = tmp_path / "submitted"
    # A short temp dir: Ray's Unix socket paths must fit in ~107 characters, pytest's tmp_path may not.
    head = _start_head(ray_bin, env, Path(tempfile.mkdtemp(prefix="jfray-", dir="/tmp")))
    try:
        command = [
            ray_bin,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{head.dashboard_port}",
            "--",
            sys.executable,
            str(REPO / "jobs" / "progressive.py"),
            "--config",
            str(SMOKE),
            f"run_dir={run_dir}",
            f"base.model={tiny_base}",
            "rounds.1.steps=2",
        ]
        for _ in range(30):  # the dashboard answers before its job agent is up: "No available agent"
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
    finally:
        _stop(head)
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["rounds"]) == 3


def _start_head(ray_bin: str, env: dict, temp: Path, attempts: int = 3) -> subprocess.Popen:
    """`ray start --head --block` in its own process group (so the test stops exactly this cluster, unlike
    `ray stop`, which stops every Ray on the machine); retried because GCS start-up can time out under load."""
    for _ in range(attempts):
        # Every port explicit: the defaults (e.g. the agent's 52365) clash with the test session's own cluster.
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
        names += ("metrics-export-port",)
        port, dashboard, *others = free_ports(2 + len(names))
        ports = [f"--{name}={number}" for name, number in zip(names, others)]
        head = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                "--num-cpus=2",
                "--include-dashboard=true",
                f"--temp-dir={temp}",
                *ports,
            ],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        head.dashboard_port = dashboard
        if _answers(f"http://127.0.0.1:{dashboard}/api/version", head):
            return head
        _stop(head)
    raise AssertionError(f"ray start --head failed {attempts} times")


def _answers(url: str, process: subprocess.Popen, timeout_s: float = 180) -> bool:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def _stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue

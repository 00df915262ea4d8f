"""Joining Ray clusters: --address / RAY_ADDRESS / `ray job submit`, token auth, unreachable addresses, requests
sized to the cluster, and the smoke job on a multi-node cluster with S3 (docs/cluster.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import LocalRayCluster, free_port, wait_for

from jf_ray.raycluster import LOCAL_CLUSTER_ENV, ClusterTooSmall, prepare_local_ray, require_fit

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "cluster.md"


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-m", "jf_ray.cli.main", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def test_unreachable_address_exits_2_before_work(tmp_path):
    """--address, RAY_ADDRESS and the job all fail within seconds, naming the address and the cause."""
    dead = f"127.0.0.1:{closed_port()}"
    out = tmp_path / "traj"
    started = time.monotonic()
    flag = run_cli(["collect", "--address", dead, "--model", "m", "--prompts", "p.jsonl", "--out", str(out)])
    env = run_cli(["pack", "--trajectories", str(tmp_path), "--out", str(out)], env={"RAY_ADDRESS": dead})
    dashboard = run_cli(["train", "--address", "http://127.0.0.1:8265", "--model", "m", "--data", "d", "--out", "o"])
    job = subprocess.run(
        [sys.executable, "jobs/progressive.py", "--config", "jobs/configs/smoke.yaml", f"run_dir={tmp_path / 'run'}"],
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": dead},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert time.monotonic() - started < 120
    for done in (flag, env, job):
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"cannot join the Ray cluster at {dead}" in done.stderr and "refused" in done.stderr.lower()
    assert dashboard.returncode == 2 and "dashboard (job submission) address" in dashboard.stderr
    assert not out.exists() and not (tmp_path / "run").exists()  # nothing was started or written


def test_local_only_env_is_set_only_for_a_local_cluster(monkeypatch):
    for key in [*LOCAL_CLUSTER_ENV, "RAY_ADDRESS"]:
        monkeypatch.delenv(key, raising=False)
    prepare_local_ray("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    prepare_local_ray(None)
    assert not any(key in os.environ for key in LOCAL_CLUSTER_ENV)
    monkeypatch.delenv("RAY_ADDRESS")
    prepare_local_ray(None)
    assert all(os.environ[key] == value for key, value in LOCAL_CLUSTER_ENV.items())


def test_requests_are_sized_to_the_cluster_or_fail_naming_them(ray_session):
    from jf_ray.pipeline import PipelineConfig
    from jf_ray.pipeline.stages import _eval_resources, check_cluster_fits

    with pytest.raises(ClusterTooSmall, match=r"a test worker requests \{'CPU': 3.0\}.*nodes: \{CPU: 2"):
        require_fit({"CPU": 3}, "a test worker")
    too_big = PipelineConfig.load(REPO / "jobs/configs/smoke.yaml", ["train.cpus_per_worker=3"])
    with pytest.raises(ClusterTooSmall, match=r"train.cpus_per_worker.*\{'CPU': 3.0\}"):
        check_cluster_fits(too_big)
    gpu = PipelineConfig.load(REPO / "jobs/configs/smoke.yaml", ["collect.num_gpus_per_worker=1"])
    with pytest.raises(ClusterTooSmall, match=r"collection actor.*'GPU': 1.0"):
        check_cluster_fits(gpu)
    # evaluation wants two train workers' CPUs (6 here) and gets what the biggest node has
    assert _eval_resources(PipelineConfig.load(REPO / "jobs/configs/smoke.yaml", ["train.cpus_per_worker=3"])) == {
        "num_gpus": 0,
        "num_cpus": 2,
    }


@pytest.mark.slow
def test_token_auth_cluster_is_joined_with_its_token(micro_checkpoint, tmp_path):
    """A head with RAY_AUTH_MODE=token: `jf-ray collect --address` runs on it with the token, exits 2 without."""
    token = os.urandom(16).hex()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cluster = LocalRayCluster(f"/tmp/rc_{os.getpid() % 100000}t", auth, [], head_cpus=1)
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "x = 1 +"}\n')
        args = [
            "collect",
            "--address",
            cluster.gcs_address,
            "--model",
            str(micro_checkpoint),
            "--prompts",
            str(prompts),
        ]
        args += ["--block-size", "4", "--max-new-tokens", "8", "--workers", "1", "--no-progress"]
        # a client environment as on a cluster node: none of the local-only settings
        client = {k: v for k, v in cluster.env.items() if k not in LOCAL_CLUSTER_ENV} | {"PYTHONPATH": str(REPO)}
        client["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        tokenfile = tmp_path / "token"
        tokenfile.write_text(token)
        joined = subprocess.run(
            [sys.executable, "-m", "jf_ray.cli.main", *args, "--out", str(tmp_path / "ok")],
            env=client | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tokenfile)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        refused = subprocess.run(
            [sys.executable, "-m", "jf_ray.cli.main", *args, "--out", str(tmp_path / "refused")],
            env=client | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.stop()
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "collected 2 prompts" in joined.stdout and f"joined {cluster.gcs_address}" in joined.stderr
    assert refused.returncode == 2 and f"cannot join the Ray cluster at {cluster.gcs_address}" in refused.stderr
    assert "RAY_AUTH_MODE=token" in refused.stderr and not (tmp_path / "refused").exists()


def docs_commands(tag: str) -> list[str]:
    """The shell lines of the fenced block that follows ``<!-- tested: TAG -->`` in docs/cluster.md."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- tested: {tag} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert match, f"docs/cluster.md has no block tagged {tag}"
    lines = match.group(1).replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def submit_from_docs(tag: str, env: dict, timeout: float = 1500) -> subprocess.CompletedProcess:
    script = "set -e\n" + "\n".join(docs_commands(tag))
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for _ in range(30):  # the dashboard answers before its job agent is up: "No available agent"
        done = subprocess.run(
            ["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


def actor_nodes(cluster, class_part: str, alive: bool = False) -> list[str]:
    """Names of the nodes (h, w0, ...) on which actors whose class name contains ``class_part`` ran (or run)."""
    from ray.util.state import list_actors, list_nodes

    names = {
        n.node_id: next(node.name for node in cluster.nodes if node.name in n.resources_total)
        for n in list_nodes(address=cluster.dashboard_url, limit=1000)
    }
    actors = list_actors(address=cluster.dashboard_url, limit=10000, detail=True, raise_on_missing_output=False)
    return [
        names[a.node_id]
        for a in actors
        if class_part in a.class_name and a.node_id in names and (a.state == "ALIVE" or not alive)
    ]


@pytest.mark.slow
def test_smoke_job_on_a_multinode_cluster_with_s3(multinode_cluster, moto_s3_endpoint):
    """The docs' `ray job submit` of the smoke job: collection on both workers, training workers on two nodes,
    the report in S3; the worker nodes see none of the driver's files."""
    import boto3

    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1", **keys)
    s3.create_bucket(Bucket="jf-multinode")
    env = {k: v for k, v in multinode_cluster.env.items()} | {
        "RAY_ADDRESS": multinode_cluster.dashboard_url,
        "RUN_DIR": "s3://jf-multinode/smoke",
    }
    started = time.monotonic()
    done = submit_from_docs("multinode-smoke", env)
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout.lower()
    print(f"multi-node smoke job: {wall_s:.0f}s wall (ray job submit, busy shared machine)")
    assert sorted(set(actor_nodes(multinode_cluster, "CollectActor"))) == ["w0", "w1"]
    train_nodes = actor_nodes(multinode_cluster, "TrainWorker")
    assert len(set(train_nodes)) == 2 and "h" not in train_nodes
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="jf-multinode", Prefix="smoke/report")["Contents"]]
    assert "smoke/report.json" in keys and "smoke/report.md" in keys


def s3_keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.slow
def test_faults_on_the_multinode_cluster(multinode_cluster, moto_s3_endpoint, monkeypatch):
    """One run, three faults: a worker node's raylet killed mid-collection (every prompt exactly once), a node
    with a training worker killed mid-training (the resubmitted job resumes from the latest checkpoint in S3),
    the driver stopped mid-run (the resubmitted job skips the finished stages). Each lost node is replaced by
    a fresh one, as an autoscaler would. Prints the recovery times (docs/cluster.md)."""
    import boto3
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jf_ray.storage import read_dataset

    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1", **keys)
    s3.create_bucket(Bucket="jf-faults")
    cluster, client = multinode_cluster, JobSubmissionClient(multinode_cluster.dashboard_url)
    entrypoint = "python jobs/progressive.py --config jobs/configs/smoke.yaml run_dir=s3://jf-faults/smoke "
    # max_failures=0: the job itself must fail on the node loss, to test that a resubmission resumes from S3
    # (Ray Train's own restarts within a job: tests/test_train_faults.py)
    entrypoint += "train.workers=2 rounds.0.steps=24 train.checkpoint_every=2 train.max_failures=0"

    def submit() -> str:
        return wait_for(lambda: _try_submit(client, entrypoint), 300, 5, "the job agent")

    def done(stage: str) -> bool:
        return bool(s3_keys(s3, "jf-faults", f"smoke/stages/{stage}.json"))

    def finished(job: str) -> JobStatus:
        status = client.get_job_status(job)
        return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None

    first = submit()
    wait_for(lambda: s3_keys(s3, "jf-faults", "smoke/round1/trajectories/") or finished(first), 900, 0.5, "a shard")
    assert not done("round1.collect"), "killed too late: collection had finished"
    killed = time.monotonic()
    cluster.kill_raylet(cluster.nodes[1])
    cluster.add_worker(num_cpus=1)
    wait_for(lambda: done("round1.collect") or finished(first), 900, 1, "collection after the node loss")
    recovery = {"node lost mid-collection": time.monotonic() - killed}
    assert done("round1.collect"), client.get_job_logs(first)[-3000:]

    # A checkpoint counts once Ray Train has registered it (its snapshot names it), not when its files appear.
    wait_for(lambda: registered_checkpoint(s3) or finished(first), 900, 0.5, "a registered checkpoint")
    assert not done("round1.train"), "killed too late: training had finished"
    train_node = next(n for n in cluster.nodes[2:] if n.name in actor_nodes(cluster, "TrainWorker", alive=True))
    killed = time.monotonic()
    cluster.kill_raylet(train_node)
    cluster.add_worker(num_cpus=1)
    assert wait_for(lambda: finished(first), 900, 1, "the job to fail") == JobStatus.FAILED
    second = submit()
    wait_for(lambda: "steps from step" in client.get_job_logs(second), 900, 1, "training to resume")
    recovery["node lost mid-training (resubmitted)"] = time.monotonic() - killed
    resumed = re.search(r"steps from step (\d+)", client.get_job_logs(second))
    assert int(resumed.group(1)) >= 2  # from the latest checkpoint in S3, not from step 0

    wait_for(lambda: done("round2.collect") or finished(second), 900, 1, "round 2")
    client.stop_job(second)
    stopped = time.monotonic()
    wait_for(lambda: finished(second), 300, 1, "the driver to stop")
    third = submit()
    assert wait_for(lambda: finished(third), 1500, 2, "the last job") == JobStatus.SUCCEEDED
    recovery["driver stopped (resubmitted, to the end)"] = time.monotonic() - stopped
    print("recovery (busy shared machine):", {k: f"{v:.0f}s" for k, v in recovery.items()})
    logs = client.get_job_logs(third)
    assert re.search(r"done: \d+ stages run, (\d+) skipped", logs).group(1) != "0"
    assert "stage round1.collect done" not in logs and "stage round1.train done" not in logs
    for key, value in {
        "JF_S3_ENDPOINT": moto_s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }.items():
        monkeypatch.setenv(key, value)
    table = read_dataset("s3://jf-faults/smoke/round1/trajectories", required_columns=["prompt_id", "block_index"])
    pairs = list(zip(table["prompt_id"].to_pylist(), table["block_index"].to_pylist()))
    assert len(pairs) == len(set(pairs)) and len({pid for pid, _ in pairs}) == 12  # every prompt, exactly once
    assert s3_keys(s3, "jf-faults", "smoke/report.md")


def registered_checkpoint(s3) -> bool:
    """Whether Ray Train's checkpoint list in S3 (what a resubmitted run restores from) names a checkpoint."""
    try:
        body = s3.get_object(Bucket="jf-faults", Key="smoke/round1/train/checkpoint_manager_snapshot.json")["Body"]
    except s3.exceptions.NoSuchKey:
        return False
    return bool(json.loads(body.read()).get("latest_checkpoint_result"))


def _try_submit(client, entrypoint: str) -> str | None:
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    except RuntimeError as exc:  # the dashboard answers before its job agent is up
        if "No available agent" in str(exc):
            return None
        raise

"""Storage preflight: a missing bucket, missing or wrong S3 credentials, an unwritable local directory: exit 2
before any work starts, naming the location and the cause."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jf_ray.errors import UserInputError
from jf_ray.storage import check_writable, check_writable_file, list_files

REPO = Path(__file__).resolve().parents[1]


def test_a_writable_bucket_passes_and_keeps_no_probe(s3_bucket):
    check_writable(f"{s3_bucket}/runs/a", "run_dir")
    assert list_files(f"{s3_bucket}/runs/a") == []


def test_a_missing_bucket_is_named(s3_bucket):
    with pytest.raises(
        UserInputError, match=r"run_dir s3://jf-no-such-bucket/runs: bucket 'jf-no-such-bucket' does not"
    ):
        check_writable("s3://jf-no-such-bucket/runs", "run_dir")


def test_missing_credentials_are_named(s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(UserInputError, match=f"--out {s3_bucket}/x: no S3 credentials found"):
        check_writable(f"{s3_bucket}/x", "--out")


@pytest.fixture(scope="module")
def s3_with_auth():
    """A moto server of its own that checks signatures against its IAM users (the shared one accepts any
    key): the first requests (bucket, user, key, policy) are let through, every later one is checked."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        bootstrap = dict(
            endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        boto3.client("s3", **bootstrap).create_bucket(Bucket="jf-auth")
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="jf")
        key = iam.create_access_key(UserName="jf")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="jf", PolicyName="s3", PolicyDocument=json.dumps(policy))
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("key_id", "secret", "cause"),
    [
        ("good", "good", None),
        ("good", "wrong", "secret key does not match"),
        ("AKIAUNKNOWN000000000", "wrong", "does not know the access key ID"),
    ],
)
def test_wrong_credentials_are_named(s3_with_auth, monkeypatch, key_id, secret, cause):
    endpoint, good_id, good_secret = s3_with_auth
    monkeypatch.setenv("JF_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", good_id if key_id == "good" else key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", good_secret if secret == "good" else secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    if cause is None:
        check_writable("s3://jf-auth/run", "run_dir")
        return
    with pytest.raises(UserInputError, match=f"run_dir s3://jf-auth/run: .*{cause}"):
        check_writable("s3://jf-auth/run", "run_dir")


def test_unwritable_local_directories_are_named(tmp_path):
    """We run as root, whom permissions do not stop: a path under a file and /proc stop everyone."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserInputError, match=f"run_dir {a_file}/run: {a_file} is a file, not a directory"):
        check_writable(f"{a_file}/run", "run_dir")
    with pytest.raises(UserInputError, match="--out /proc/jf-run: cannot create files in /proc"):
        check_writable("/proc/jf-run", "--out")
    with pytest.raises(UserInputError, match=f"--json file://{a_file}/r.json: {a_file} is a file"):
        check_writable_file(f"file://{a_file}/r.json", "--json")
    check_writable(f"file://{tmp_path}/new/dir", "run_dir")
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind, not even the directory


def run_entry(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_points_exit_2_before_any_work(s3_bucket, moto_s3_endpoint, tmp_path):
    """The job and a writing subcommand stop at the preflight: nothing is built, collected or started."""
    env = {k: os.environ[k] for k in ("JF_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    job = run_entry(
        ["jobs/progressive.py", "--config", "jobs/configs/smoke.yaml", "run_dir=s3://jf-missing-bucket/run"], env
    )
    assert job.returncode == 2, job.stderr
    assert "run_dir s3://jf-missing-bucket/run: bucket 'jf-missing-bucket' does not exist" in job.stderr
    assert "stage" not in job.stderr.lower(), "the job started a stage"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = run_entry(["-m", "jf_ray.cli.main", "base", "build", "--preset", "micro", "--out", f"{a_file}/base"], env)
    assert base.returncode == 2 and f"{a_file} is a file, not a directory" in base.stderr, base.stderr
    assert "building" not in base.stderr

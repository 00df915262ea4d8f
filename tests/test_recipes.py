"""The cluster recipes in cluster/, validated offline with Ray's own code (docs/cluster.md): the launcher YAML
through the autoscaler's config validation, KubeRay's serveConfigV2 through Serve's deploy schema, the
runtimeEnvYAML through RuntimeEnv; every file, import path and image they name exists and matches the
installed Ray."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = {"RayJob": CLUSTER / "k8s" / "rayjob.yaml", "RayService": CLUSTER / "k8s" / "rayservice.yaml"}
OFFICIAL_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
IMAGE_IN_APP = "/app/"  # where cluster/Dockerfile puts the checkout's files


def project_image() -> str:
    """The tag cluster/Dockerfile documents for its build; its Ray part must be the installed Ray."""
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(OFFICIAL_IMAGE)}$", text, re.M), "Dockerfile must build FROM " + OFFICIAL_IMAGE
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text).group(1)
    assert f"-ray{ray.__version__}-py311-gpu" in tag
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        assert all((REPO / part).exists() for part in source.split()), source
    return tag


def test_launcher_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "gpu_cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["docker"]["image"] in (OFFICIAL_IMAGE, project_image())
    assert "ray-ml" not in (CLUSTER / "gpu_cluster.yaml").read_text()
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    for node_type in raw["available_node_types"].values():
        assert "ImageId" not in node_type["node_config"]  # the launcher's default AMI; the image does the rest
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert all(t["node_config"].get("IamInstanceProfile") for t in workers)  # S3 by instance profile
    assert all((REPO / source).exists() for source in raw["file_mounts"].values())


def submit_commands(path: Path) -> list[str]:
    """`ray job submit` commands written in a file's comments, continuation lines joined."""
    comments = "\n".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    return [m.replace("\\\n", " ") for m in re.findall(r"^ray job submit(?:[^\n]*\\\n)*[^\n]*", comments, re.M)]


@pytest.mark.parametrize("path", [CLUSTER / "gpu_cluster.yaml", REPO / "jobs/configs/qwen_coder_7b_gpu.yaml"])
def test_submit_commands_ship_the_checkout_and_name_real_files(path):
    commands = submit_commands(path)
    assert commands, f"{path.name} shows no ray job submit command"
    for command in commands:
        words = shlex.split(command)
        assert "--working-dir" in words and words[words.index("--working-dir") + 1] == "."
        entry = words[words.index("--") + 1 :]
        assert entry[:2] == ["python", "jobs/progressive.py"] and (REPO / entry[1]).exists()
        assert (REPO / entry[entry.index("--config") + 1]).exists()


def load_manifest(kind: str) -> dict:
    manifest = yaml.safe_load(MANIFESTS[kind].read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    return manifest


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    image = project_image()
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].rsplit("/", 1)[-1] == image
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"].get("nvidia.com/gpu"), "GPU groups request nvidia.com/gpu"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_runs_the_progressive_job_from_the_image():
    from ray.runtime_env import RuntimeEnv

    spec = load_manifest("RayJob")["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", IMAGE_IN_APP + "jobs/progressive.py"]
    for word in words:
        if word.startswith(IMAGE_IN_APP):
            assert (REPO / word.removeprefix(IMAGE_IN_APP)).exists(), word
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_app_with_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from jf_ray.serving.deployment import parse_app_args

    spec = load_manifest("RayService")["spec"]
    check_cluster_spec(spec["rayClusterConfig"])
    serve_config = ServeDeploySchema(**yaml.safe_load(spec["serveConfigV2"]))
    for app in serve_config.applications:
        module, _, attribute = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        parse_app_args(app.args)  # the app's own config model accepts its arguments


def test_serve_deploy_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    from jf_ray.serving.deployment import parse_app_args

    config = ServeDeploySchema(**yaml.safe_load((CLUSTER / "serve_config.yaml").read_text()))
    for app in config.applications:
        parse_app_args(app.args)

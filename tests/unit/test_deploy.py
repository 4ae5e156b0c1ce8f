"""The deploy files (deploy/): the Ray cluster launcher config validates against the schema Ray
ships, the KubeRay manifest holds well-formed Kubernetes objects of the right kinds, and the
`optserve serve` commands they run are ones the CLI accepts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from optserve.server.cli import build_parser
from optserve.server.edge.tokens import TokenTable

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# The Kubernetes release whose published schemas the manifest's core objects must satisfy.
KUBERNETES = "1.30"


def validate_kubernetes(obj: dict) -> None:
    """Validate against Kubernetes' own OpenAPI schemas (kubernetes-validate ships them), strict:
    an unknown or misspelt field fails too."""
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def validate_pod_template(template: dict) -> None:
    """A pod template (of a RayCluster group) validated as the Pod it becomes."""
    metadata = template.get("metadata", {"name": "template"})
    validate_kubernetes(
        {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
    )


def serve_args(command: str):
    """Parse the `optserve serve ...` inside a shell command line with the real CLI parser."""
    words = shlex.split(command.replace(";", " ; "))
    start = words.index("optserve")
    end = next((i for i in range(start, len(words)) if words[i] in (">", "&", ";", "2>&1")),
               len(words))  # fmt: skip
    args = build_parser().parse_args(words[start + 1 : end])
    assert args.command == "serve"
    return args


def test_the_cluster_launcher_config_validates_against_rays_schema():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    assert config["head_node_type"] in config["available_node_types"]
    serves = [c for c in config["head_start_ray_commands"] if "optserve serve" in c]
    assert len(serves) == 1
    args = serve_args(serves[0])
    assert args.ray_address == "auto" and args.host == "0.0.0.0" and args.shard_gpus == 1
    assert args.tokens_file in config["file_mounts"]  # the table is a file, not an argument
    assert not args.no_auth and not args.no_ray_metrics
    # Every node's Ray metrics agent (Ray's series and optserve's twins) on one known port.
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[commands] if "ray start" in c]
        assert len(starts) == 1 and "--metrics-export-port=8080" in starts[0].split(), commands


def kuberay_objects():
    return list(yaml.safe_load_all((DEPLOY / "kuberay" / "optserve.yaml").read_text()))


def test_the_kuberay_manifest_is_well_formed_kubernetes_objects():
    objects = kuberay_objects()
    assert [(o["apiVersion"], o["kind"]) for o in objects] == [
        ("v1", "Secret"), ("ray.io/v1", "RayCluster"), ("v1", "Service"),
    ]  # fmt: skip
    for obj in objects:
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec", "type", "stringData"}
        assert DNS_1123.fullmatch(obj["metadata"]["name"]), obj["metadata"]
    secret, cluster, service = objects
    # Core objects, and every pod template of the RayCluster, against Kubernetes' schemas.
    validate_kubernetes(secret)
    validate_kubernetes(service)
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        validate_pod_template(group["template"])
    # The Secret's table is one the server accepts.
    TokenTable.parse(secret["stringData"]["tokens.json"])
    spec = cluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    (head_container,) = head["containers"]
    assert head_container["image"] and DNS_1123.fullmatch(head_container["name"])
    for port in head_container["ports"]:
        assert isinstance(port["containerPort"], int) and len(port["name"]) <= 15
    command = head_container["lifecycle"]["postStart"]["exec"]["command"]
    words = shlex.split(command[-1])  # nohup sh -c '<wait for Ray; exec optserve serve ...>' &
    args = serve_args(words[words.index("-c") + 1])
    assert args.ray_address == "auto" and args.port == 50051 and not args.no_auth
    env = {e["name"]: e["value"] for e in head_container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in head_container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert env["OPTSERVE_TOKENS_FILE"].startswith(mounts["tokens"] + "/")
    assert volumes["tokens"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(mounts) <= set(volumes)
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The Service sends the coordinator's port to the head pod (KubeRay's pod labels).
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head",
    }  # fmt: skip
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    exposed = {p["containerPort"] for p in head_container["ports"]}
    assert ports["grpc"]["targetPort"] == args.port
    # The metrics endpoint: on by default, on the serve command's --metrics-port.
    assert not args.no_metrics and args.metrics_host is None
    assert ports["metrics"]["targetPort"] == args.metrics_port
    assert {ports["grpc"]["targetPort"], ports["metrics"]["targetPort"]} <= exposed
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    # Ray's metrics agent port (KubeRay's default), named so KubeRay's head Service keeps it.
    assert {"containerPort": 8080, "name": "metrics"} in head_container["ports"]
    assert not args.no_ray_metrics


def test_the_kubernetes_schema_check_catches_a_broken_manifest():
    """The schemas are really applied: a misspelt field and a wrong type are refused."""
    secret, cluster, service = kuberay_objects()
    service["spec"]["ports"][0]["port"] = "50051"  # a string where an integer belongs
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(service)
    head = cluster["spec"]["headGroupSpec"]["template"]
    head["spec"]["containers"][0]["volumeMount"] = head["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template(head)


def test_the_image_recipe_installs_optserve_and_exposes_its_port():
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0].startswith("FROM python:3.11")
    assert any(line.startswith("RUN pip install") and " . " in f"{line} " for line in lines)
    assert "EXPOSE 50051 9464" in lines
    for folder in ("protos", "client", "server"):
        assert f"COPY {folder} {folder}" in lines

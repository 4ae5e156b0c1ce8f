"""The deploy files (deploy/): the Ray cluster launcher config validates against the schema Ray
ships, the KubeRay manifest holds well-formed Kubernetes objects of the right kinds, and the
`optserve serve` commands they run are ones the CLI accepts. They are safe as written (issue
17): Ray's dashboard on loopback, Ray's token authentication on every node with its token from a
file, TLS on, metrics behind a token, and placeholder tokens refused when the server starts."""

from __future__ import annotations

import ast
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
from optserve.server.cli.safety import check_exposure, check_token_table, placeholder_names
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
    mounts = config["file_mounts"]
    assert args.tokens_file in mounts  # the table is a file, not an argument
    assert not args.no_auth and not args.no_ray_metrics and not args.insecure
    # TLS on (files mounted), and serve would start off loopback without --insecure.
    assert {args.tls_cert.rsplit("/", 1)[0], args.tls_key.rsplit("/", 1)[0]} <= set(mounts)
    assert check_exposure(args.host, tls=True, auth=True, insecure=False) == []
    # Metrics leave the head's loopback only behind a token from a file.
    assert args.metrics_host == "0.0.0.0" and args.metrics_token_file in mounts
    # Ray's token authentication on every node, its token a mounted file.
    run_options = config["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in run_options
    (token_path,) = [o.split("=", 1)[1] for o in run_options if "RAY_AUTH_TOKEN_PATH=" in o]
    assert token_path in mounts
    every_command = " ".join(
        config[k] if isinstance(config[k], str) else " ".join(config[k])
        for k in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands")
    )
    assert "RAY_AUTH_TOKEN=" not in every_command and "--insecure" not in every_command
    # Every node's Ray metrics agent (Ray's series and optserve's twins) on one known port.
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[commands] if "ray start" in c]
        assert len(starts) == 1 and "--metrics-export-port=8080" in starts[0].split(), commands
    # Ray's dashboard (and its Jobs API, which runs any code) only on the head's loopback.
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start.split()


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
    # The Secret's table is well formed, but its placeholder tokens are refused at start, as
    # is its placeholder metrics token.
    table = secret["stringData"]["tokens.json"]
    TokenTable.parse(table)
    assert placeholder_names(table) == ["ops", "trainers"]
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
    assert not args.insecure and args.tls_cert and args.tls_key
    env = {e["name"]: e["value"] for e in head_container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in head_container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert env["OPTSERVE_TOKENS_FILE"].startswith(mounts["tokens"] + "/")
    assert volumes["tokens"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(mounts) <= set(volumes)
    # TLS from a Secret; the metrics token from the tokens Secret (a placeholder as shipped).
    assert args.tls_cert.startswith(mounts["tls"] + "/")
    assert args.tls_key.startswith(mounts["tls"] + "/")
    assert volumes["tls"]["secret"]["secretName"] == "optserve-tls"
    assert args.metrics_token_file == f"{mounts['tokens']}/metrics-token"
    assert "REPLACE" in secret["stringData"]["metrics-token"]
    # Ray's dashboard on the pod's loopback, not declared as a port; Ray's token auth on every
    # container, the token a file from a Secret (never a literal value).
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert 8265 not in {p["containerPort"] for p in head_container["ports"]}
    (workers_group,) = spec["workerGroupSpecs"]
    for group in (spec["headGroupSpec"], workers_group):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        container_env = {e["name"]: e for e in container["env"]}
        assert container_env["RAY_AUTH_MODE"]["value"] == "token"
        assert "RAY_AUTH_TOKEN" not in container_env
        token_dir = container_env["RAY_AUTH_TOKEN_PATH"]["value"].rsplit("/", 1)[0]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == token_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "optserve-ray-token"
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
    # The metrics endpoint: on, on the serve command's --metrics-port, off loopback for the
    # Service only with its token.
    assert not args.no_metrics and args.metrics_host == "0.0.0.0"
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
    # Every folder setup.py packages (and setup.py itself) is in the image.
    tree = ast.parse((DEPLOY.parent / "setup.py").read_text())
    (roots,) = [node.value for node in tree.body
                if isinstance(node, ast.Assign) and node.targets[0].id == "ROOTS"]  # fmt: skip
    for folder in {path.split("/")[0] for path in ast.literal_eval(roots).values()}:
        assert f"COPY {folder} {folder}" in lines, folder
    assert any(line.startswith("COPY ") and " setup.py " in line for line in lines)
    # The compiled kernels' compiler is installed, and checked once the image is built.
    assert any("apt-get install" in line and " g++ " in f"{line} " for line in lines)
    assert "compiler_problem" in (DEPLOY / "Dockerfile").read_text()


def test_the_shipped_placeholder_tokens_stop_the_server(monkeypatch, tmp_path):
    """An unedited manifest does not run with a public admin token: serve refuses its table."""
    secret = kuberay_objects()[0]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(secret["stringData"]["tokens.json"])
    monkeypatch.delenv("OPTSERVE_TOKENS_FILE", raising=False)
    with pytest.raises(SystemExit, match="placeholder tokens .entries ops, trainers"):
        check_token_table(str(tokens))
    metrics_token = tmp_path / "metrics-token"
    metrics_token.write_text(secret["stringData"]["metrics-token"])
    args = build_parser().parse_args(
        ["serve", "--metrics-host", "0.0.0.0", "--metrics-token-file", str(metrics_token)]
    )
    from optserve.server.cli.serve import _metrics_token

    with pytest.raises(SystemExit, match="placeholder"):
        _metrics_token(args)
    metrics_token.write_text("Zq3rT9-xV2mL8wK4pN7sB1yH6cF0dJ5a\n")
    assert _metrics_token(args) == "Zq3rT9-xV2mL8wK4pN7sB1yH6cF0dJ5a"

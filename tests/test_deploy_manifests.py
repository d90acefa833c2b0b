"""deploy/kubernetes agrees with the server it deploys and the image it runs.

Why: a manifest is a second copy of facts the server owns — its ports, the
health service names it reports, how long its drain takes. The copies drift
silently (a probe on the wrong port restarts pods forever; a grace period
shorter than the drain SIGKILLs streams mid-answer). So this test reads the
image's ENV (the Dockerfile), the Deployment's env and args and the tokenwire.toml
the kustomization turns into the ConfigMap through the server's own argument
parser and `load_config`, exactly as `tokenwire serve` would in the pod, and
compares the result with the probes, ports, Services and
terminationGracePeriodSeconds; the pod's user and ports with the image's; the
config file with `tokenwire serve --print-config`. Then it asks a live server
the probes' health questions.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import start_serve_process
from tests.dockerfile import parse as parse_dockerfile
from tokenwire_server.cli import add_serve_arguments
from tokenwire_server.config import ENV_PREFIX, Config, load_config
from tokenwire_server.config_example import render
from tokenwire_server.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8"))
IMAGE = parse_dockerfile()
NAME = "tokenwire"
#: Margin kubelet must leave after drain_delay + grace_period for the server to
#: close its stores, audit file and exporters and exit on its own.
CLOSE_MARGIN_SECONDS = 5


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                yield path.name, document


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for _, document in documents():
        if document["kind"] == "Kustomization":
            continue
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{key} defined twice"
        found[key] = document
    return found


OBJECTS = objects()
DEPLOYMENT = OBJECTS[("Deployment", NAME)]
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


def container_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in CONTAINER["ports"] if p["name"] == name]
    return int(port)


@dataclass(frozen=True)
class PodConfig:
    """What `tokenwire serve` resolves inside the pod, and where its inputs came from."""

    config: Config
    env: dict[str, str]
    args: argparse.Namespace
    file_text: str

    def explicitly_sets(self, section: str, name: str) -> bool:
        """Whether the flag, the env or the file names the setting (not the default)."""
        in_file = name in tomllib.loads(self.file_text).get(section, {})
        in_env = f"{ENV_PREFIX}{name.upper()}" in self.env
        return getattr(self.args, name) is not None or in_env or in_file


def pod_config(tmp_path: Path) -> PodConfig:
    """Runs the container's args, env (over the image's ENV) and mounted ConfigMap
    through the server's own parser and load_config (flag, env, file, default)."""
    assert CONTAINER["command"] == ["tokenwire"]
    assert CONTAINER["args"][0] == "serve"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(CONTAINER["args"][1:])
    env = IMAGE.final.env()
    env.update({e["name"]: str(e["value"]) for e in CONTAINER.get("env", []) if "value" in e})
    file_text = ""
    config_path = args.config or (
        Path(env["TOKENWIRE_CONFIG"]) if env.get("TOKENWIRE_CONFIG") else None
    )
    local_file = None
    if config_path is not None:
        file_text = mounted_file(PurePosixPath(str(config_path)))
        local_file = tmp_path / "tokenwire.toml"
        local_file.write_text(file_text, encoding="utf-8")
    config = load_config(vars(args), env=env, file=local_file)
    return PodConfig(config, env, args, file_text)


def generated_config_maps() -> dict[str, dict[str, str]]:
    """The kustomization's configMapGenerator: ConfigMap name -> key -> file text."""
    maps: dict[str, dict[str, str]] = {}
    for generator in KUSTOMIZATION.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, file = entry.rpartition("=")
            data[key or Path(file).name] = (KUBERNETES / file).read_text(encoding="utf-8")
        maps[generator["name"]] = data
    return maps


def config_map_data(name: str) -> dict[str, str]:
    generated = generated_config_maps()
    if name in generated:
        return generated[name]
    data: dict[str, str] = OBJECTS[("ConfigMap", name)]["data"]
    return data


def mounted_file(path: PurePosixPath) -> str:
    """The ConfigMap key a container path resolves to through its volume mount."""
    volumes = {v["name"]: v for v in POD["volumes"]}
    for mount in CONTAINER["volumeMounts"]:
        mount_path = PurePosixPath(mount["mountPath"])
        if path.parent == mount_path and "configMap" in volumes[mount["name"]]:
            data = config_map_data(volumes[mount["name"]]["configMap"]["name"])
            assert path.name in data, f"{path} is not a key of the mounted ConfigMap"
            return data[path.name]
    raise AssertionError(f"{path} is on no ConfigMap volume mount")


@pytest.fixture
def pod(tmp_path: Path) -> PodConfig:
    return pod_config(tmp_path)


def test_kustomization_lists_every_manifest() -> None:
    manifests = {path for path, doc in documents() if doc["kind"] != "Kustomization"}
    assert sorted(KUSTOMIZATION["resources"]) == sorted(manifests)


def _settings_and_comments(text: str) -> list[str]:
    """A config file without its values: comments, tables and key names, in order."""
    return [line.split(" = ")[0] for line in text.splitlines()]


def test_the_pods_config_file_is_the_example_config() -> None:
    """The ConfigMap comes from deploy/kubernetes/tokenwire.toml, which starts as
    `tokenwire serve --print-config`: every setting, its default and meaning.
    Values may be changed there; sections, keys and comments follow the config
    dataclasses, so a setting added to the server shows up in the pods' file."""
    (generator,) = KUSTOMIZATION["configMapGenerator"]
    assert generator["name"] == "tokenwire-config" and generator["files"] == ["tokenwire.toml"]
    assert not (KUBERNETES / "configmap.yaml").exists(), "generated from tokenwire.toml instead"
    text = (KUBERNETES / "tokenwire.toml").read_text(encoding="utf-8")
    assert _settings_and_comments(text) == _settings_and_comments(render()), (
        "deploy/kubernetes/tokenwire.toml lacks settings of the server: regenerate it with "
        "`tokenwire serve --print-config > deploy/kubernetes/tokenwire.toml` and set again "
        "the values you changed"
    )
    assert text == (ROOT / "deploy" / "tokenwire.example.toml").read_text(encoding="utf-8"), (
        "the shipped pods run the example config as it is; their own settings are env in "
        "deployment.yaml"
    )


def test_kubectl_kustomize_mounts_the_generated_config_map() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the rest of this file reads the manifests itself)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered.stdout)}
    (config_map,) = [d for (kind, _), d in built.items() if kind == "ConfigMap"]
    name = config_map["metadata"]["name"]
    assert name.startswith("tokenwire-config-"), "a hash suffix: a changed file rolls the pods"
    assert config_map["data"] == config_map_data("tokenwire-config")
    pod = built[("Deployment", NAME)]["spec"]["template"]["spec"]
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == name
    digest = hashlib.sha256(config_map["data"]["tokenwire.toml"].encode()).hexdigest()
    assert digest == hashlib.sha256(render().encode()).hexdigest()


def test_the_pod_runs_the_image_as_the_images_user_on_its_ports() -> None:
    (user,) = IMAGE.final.all("USER")
    uid, _, gid = user.arguments.partition(":")
    security = POD["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert security["fsGroup"] == int(gid), "the data volume is writable by the image's group"
    (expose,) = IMAGE.final.all("EXPOSE")
    exposed = {int(p.split("/")[0]) for p in expose.arguments.split()}
    assert {int(p["containerPort"]) for p in CONTAINER["ports"]} == exposed
    image, _, tag = CONTAINER["image"].rpartition(":")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert (image, tag) == (NAME, version["version"]), "the tag the Dockerfile's docs build"
    (entrypoint,) = IMAGE.final.all("ENTRYPOINT")
    assert CONTAINER["command"] == entrypoint.exec_form()


def test_the_server_binds_what_the_pod_exposes(pod: PodConfig) -> None:
    net, observability = pod.config.network, pod.config.observability
    assert net.host == "0.0.0.0", "kubelet probes and Services dial the pod IP"
    assert container_port("grpc") == net.port
    assert observability.metrics_host == "0.0.0.0"
    assert observability.metrics_port > 0, "metrics must be served on a fixed port"
    assert container_port("metrics") == observability.metrics_port
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == observability.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_ask_the_health_names_the_server_reports(pod: PodConfig) -> None:
    probes = {kind: CONTAINER[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == pod.config.network.port, kind
    # Readiness names the service: NOT_SERVING from the start of a drain.
    assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""
    assert probes["startupProbe"]["grpc"].get("service", "") == ""
    # Kubelet's gRPC probes speak plaintext only: TLS on the port would fail them.
    assert not pod.config.network.tls_cert, "native gRPC probes cannot do TLS"


def test_kubelet_waits_for_the_whole_drain(pod: PodConfig) -> None:
    net = pod.config.network
    # Set on purpose, not inherited from a default that may change under the manifest.
    for setting in ("grace_period", "drain_delay"):
        assert pod.explicitly_sets("network", setting), f"set {setting} in the manifest"
    drain = net.drain_delay + net.grace_period
    pre_stop = CONTAINER.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    drain += pre_stop.get("seconds", 0)
    assert POD["terminationGracePeriodSeconds"] >= drain + CLOSE_MARGIN_SECONDS, (
        f"terminationGracePeriodSeconds must exceed drain_delay + grace_period ({drain} s)"
    )
    readiness = CONTAINER["readinessProbe"]
    noticed_after = readiness["periodSeconds"] * readiness["failureThreshold"]
    assert net.drain_delay >= noticed_after, (
        "drain_delay must outlast the readiness probe noticing NOT_SERVING"
    )


def test_writes_go_to_volumes_on_a_read_only_root(pod: PodConfig) -> None:
    security = CONTAINER["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["runAsUser"] != 0
    writable = [
        PurePosixPath(m["mountPath"]) for m in CONTAINER["volumeMounts"] if not m.get("readOnly")
    ]
    audit = PurePosixPath(pod.config.audit.audit_path)
    assert audit.is_absolute() and audit.parent in writable, "audit file on a writable volume"


def test_no_service_links_shadow_the_settings() -> None:
    """A Service named tokenwire would inject TOKENWIRE_PORT=tcp://…:50051."""
    assert POD["enableServiceLinks"] is False


def test_resources_are_requested() -> None:
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_services_and_budget_select_the_pods(pod: PodConfig) -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in CONTAINER["ports"]}
    services = [doc for (kind, _), doc in OBJECTS.items() if kind == "Service"]
    assert {s["metadata"]["name"] for s in services} == {NAME, f"{NAME}-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
            if port["name"] == "grpc":
                assert port["port"] == pod.config.network.port
    budget = OBJECTS[("PodDisruptionBudget", NAME)]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < DEPLOYMENT["spec"]["replicas"]


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_a_live_server_answers_the_probes_then_fails_readiness_on_drain(
    pod: PodConfig,
) -> None:
    """The probes' exact questions against `tokenwire serve` with the pod's drain
    timing (drain_delay shortened so the test is quick)."""
    grace = str(pod.config.network.grace_period)
    process, address = await start_serve_process("--drain-delay", "2", "--grace-period", grace)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                service = CONTAINER[kind]["grpc"].get("service", "")
                assert await health_status(channel, service) == serving, kind
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health_status(channel, "tokenwire.v1.NoSuchService")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            readiness = CONTAINER["readinessProbe"]["grpc"]["service"]
            assert await health_status(channel, readiness) == not_serving
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

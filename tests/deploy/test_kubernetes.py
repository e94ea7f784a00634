"""The Kubernetes manifests, rendered by `kubectl kustomize` as `kubectl apply -k` would, and
checked for what breaks a rollout silently: probes on the wrong path, a port that is not the
one the gateway listens on, selectors that match nothing, a grace period shorter than the
drain, and a configuration the gateway would refuse.

Where kubectl is not installed (CI), `kustomize_lite` renders the same manifests less the
name hashes, so the checks still run; where it is, a test holds the two renderings equal."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Settings, parse_settings
from tests.deploy import assets, kustomize_lite
from tests.deploy.tools import run

Manifests = dict[tuple[str, str], dict[str, Any]]


def kubectl() -> str | None:
    path = shutil.which("kubectl")
    return path or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)


def by_kind_and_name(documents: list[dict[str, Any]]) -> Manifests:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def kubectl_render(binary: str, overlay: Path) -> str:
    return run([binary, "kustomize", str(overlay)])


def render(overlay: Path) -> Manifests:
    """kubectl's rendering where it is installed, else the same subset rendered here."""
    binary = kubectl()
    if binary is None:
        return by_kind_and_name(kustomize_lite.render(overlay))
    return by_kind_and_name([d for d in yaml.safe_load_all(kubectl_render(binary, overlay)) if d])


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return render(assets.K8S_EXAMPLE)


def one(manifests: Manifests, kind: str, name_prefix: str = "") -> dict[str, Any]:
    found = [m for (k, n), m in manifests.items() if k == kind and n.startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} {name_prefix!r}, got {len(found)}"
    return found[0]


def gateway_deployment(manifests: Manifests) -> dict[str, Any]:
    deployment: dict[str, Any] = manifests[("Deployment", "llm-gateway")]
    return deployment


def gateway_container(manifests: Manifests) -> dict[str, Any]:
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"]
    (container,) = [c for c in containers if c["name"] == "gateway"]
    return container


def pod_labels(deployment: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_env(manifests: Manifests) -> dict[str, str]:
    secret = one(manifests, "Secret", "gateway-secrets")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def gateway_settings(manifests: Manifests) -> Settings:
    """The ConfigMap's gateway.yaml, loaded by the gateway's own loader with the Secret's keys."""
    config_map = one(manifests, "ConfigMap", "gateway-config")
    return parse_settings(config_map["data"]["gateway.yaml"], secret_env(manifests), "configmap")


def test_base_renders_on_its_own() -> None:
    rendered = render(assets.K8S_BASE)
    assert ("Deployment", "llm-gateway") in rendered


@pytest.mark.parametrize("root", [assets.K8S_BASE, assets.K8S_EXAMPLE], ids=["base", "example"])
def test_fallback_renderer_agrees_with_kubectl_kustomize(root: Path) -> None:
    binary = kubectl() or pytest.skip("kubectl is not installed: nothing to compare with")
    lite = by_kind_and_name(kustomize_lite.render(root))
    text = kubectl_render(binary, root)
    for kind, name in lite:  # kubectl names generated objects name-<hash>: drop the hash
        if kind in {"ConfigMap", "Secret"}:
            text = re.sub(rf"\b{re.escape(name)}-[a-z0-9]{{10}}\b", name, text)
    assert by_kind_and_name([d for d in yaml.safe_load_all(text) if d]) == lite


def test_example_overlay_renders_every_kind_the_gateway_needs(manifests: Manifests) -> None:
    kinds = {kind for kind, _ in manifests}
    assert kinds >= {
        "Namespace", "Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
    }  # fmt: skip
    namespaced = [m for (kind, _), m in manifests.items() if kind != "Namespace"]
    assert {m["metadata"]["namespace"] for m in namespaced} == {"llm-gateway"}


def test_configmap_holds_a_configuration_the_gateway_accepts_with_the_secret_keys(
    manifests: Manifests,
) -> None:
    settings = gateway_settings(manifests)
    assert settings.listen.host == "0.0.0.0"
    assert settings.auth_enabled


def test_probes_point_at_healthz_and_readyz_on_the_listen_port(manifests: Manifests) -> None:
    container = gateway_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"]["path"] == "/healthz"
    assert readiness["httpGet"]["path"] == "/readyz"
    listen_port = gateway_settings(manifests).listen.port
    for probe in (liveness, readiness):
        port = probe["httpGet"]["port"]
        assert ports.get(port, port) == listen_port


def test_container_port_is_the_configured_listen_port(manifests: Manifests) -> None:
    ports = [p["containerPort"] for p in gateway_container(manifests)["ports"]]
    assert ports == [gateway_settings(manifests).listen.port]


def test_grace_period_outlasts_prestop_plus_the_configured_drain(manifests: Manifests) -> None:
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    command = gateway_container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(command[1]) + gateway_settings(manifests).shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > drain


def test_gateway_mounts_the_rendered_configmap_where_its_args_read_the_config(
    manifests: Manifests,
) -> None:
    container = gateway_container(manifests)
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    config_map = one(manifests, "ConfigMap", "gateway-config")
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]


def test_keys_come_from_the_rendered_secret(manifests: Manifests) -> None:
    """The config's `${...}` keys are all in this Secret: gateway_settings loads with it alone."""
    (source,) = gateway_container(manifests)["envFrom"]
    secret = one(manifests, "Secret", "gateway-secrets")
    assert source["secretRef"]["name"] == secret["metadata"]["name"]
    assert gateway_container(manifests).get("env", []) == []


def test_gateway_runs_as_non_root_with_resources(manifests: Manifests) -> None:
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    container = gateway_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_deployment_selector_matches_its_pod_labels(manifests: Manifests) -> None:
    for (kind, name), deployment in manifests.items():
        if kind == "Deployment":
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert selects(selector, pod_labels(deployment)), name


def test_service_selects_the_gateway_pods_and_targets_the_http_port(
    manifests: Manifests,
) -> None:
    service = manifests[("Service", "llm-gateway")]
    assert selects(service["spec"]["selector"], pod_labels(gateway_deployment(manifests)))
    redis = manifests[("Deployment", "gateway-redis")]
    assert not selects(service["spec"]["selector"], pod_labels(redis))
    container_ports = {p["name"] for p in gateway_container(manifests)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_servicemonitor_selects_the_service_and_scrapes_a_port_it_names(
    manifests: Manifests,
) -> None:
    monitor = manifests[("ServiceMonitor", "llm-gateway")]
    service = manifests[("Service", "llm-gateway")]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_pdb_and_hpa_target_the_gateway_deployment(manifests: Manifests) -> None:
    deployment = gateway_deployment(manifests)
    pdb = one(manifests, "PodDisruptionBudget")
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count


def test_replicas_share_limits_through_the_rendered_redis_service(manifests: Manifests) -> None:
    limits = gateway_settings(manifests).limits
    assert limits.backend == "redis"
    host_port = limits.redis_url.removeprefix("redis://").split("/")[0]
    host, port = host_port.split(":")
    service = manifests[("Service", host)]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    redis = manifests[("Deployment", host)]
    assert selects(service["spec"]["selector"], pod_labels(redis))


def test_overlay_labels_monitoring_resources_for_kube_prometheus_stack(
    manifests: Manifests,
) -> None:
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(manifests, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"

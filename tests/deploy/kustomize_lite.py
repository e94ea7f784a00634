"""The subset of kustomize our manifests use, for machines without kubectl.

CI installs prometheus but not kubectl (Debian's kubernetes-client is 1.20, whose kustomize
predates `labels:` and `patches:`), and the Kubernetes checks should run there too. This
renders `deploy/k8s` the way `kubectl kustomize` does, less the name hash suffixes of generated
ConfigMaps and Secrets. It refuses any kustomization field it does not implement, and where
kubectl is installed a test checks that both renderings agree, so it cannot drift silently.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

SUPPORTED = {
    "apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator",
    "secretGenerator", "images", "patches",
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class Unsupported(Exception):
    """The kustomization uses a feature this renderer does not implement."""


def render(root: Path) -> list[Manifest]:
    """Resources, then generators, then transformers: kustomize's order."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise Unsupported(f"{root}: kustomization fields not implemented: {sorted(unknown)}")
    manifests = [m for entry in kustomization.get("resources", []) for m in _load(root / entry)]
    manifests += [_config_map(root, g) for g in kustomization.get("configMapGenerator", [])]
    manifests += [_secret(root, g) for g in kustomization.get("secretGenerator", [])]
    for block in kustomization.get("labels", []):
        _add_labels(manifests, block)
    if "namespace" in kustomization:
        _set_namespace(manifests, kustomization["namespace"])
    for image in kustomization.get("images", []):
        _set_image(manifests, image)
    for patch in kustomization.get("patches", []):
        _apply_patch(manifests, patch)
    return manifests


def _load(path: Path) -> list[Manifest]:
    if path.is_dir():
        return render(path)
    return [m for m in yaml.safe_load_all(path.read_text(encoding="utf-8")) if m]


def _generated(kind: str, generator: dict[str, Any], data: dict[str, str]) -> Manifest:
    if generator.get("behavior", "create") != "create":
        raise Unsupported(f"{generator['name']}: behavior {generator['behavior']}")
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}, "data": data}


def _config_map(root: Path, generator: dict[str, Any]) -> Manifest:
    if set(generator) - {"name", "files"}:
        raise Unsupported(f"configMapGenerator {generator['name']}: only files are implemented")
    files = [root / f for f in generator["files"]]
    return _generated("ConfigMap", generator, {f.name: f.read_text("utf-8") for f in files})


def _secret(root: Path, generator: dict[str, Any]) -> Manifest:
    if set(generator) - {"name", "envs"}:
        raise Unsupported(f"secretGenerator {generator['name']}: only envs are implemented")
    pairs = {}
    for env_file in generator["envs"]:
        for line in (root / env_file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                pairs[key.strip()] = base64.b64encode(value.encode()).decode()
    secret = _generated("Secret", generator, pairs)
    secret["type"] = "Opaque"
    return secret


def _add_labels(manifests: list[Manifest], block: dict[str, Any]) -> None:
    if block.get("includeSelectors", False) or block.get("includeTemplates", False):
        raise Unsupported("labels with includeSelectors or includeTemplates")
    for manifest in manifests:
        manifest["metadata"].setdefault("labels", {}).update(block["pairs"])


def _set_namespace(manifests: list[Manifest], namespace: str) -> None:
    for manifest in manifests:
        if manifest["kind"] not in CLUSTER_SCOPED:
            manifest["metadata"]["namespace"] = namespace


def _containers(manifest: Manifest) -> Iterator[dict[str, Any]]:
    pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _set_image(manifests: list[Manifest], image: dict[str, str]) -> None:
    for manifest in manifests:
        for container in _containers(manifest):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def _apply_patch(manifests: list[Manifest], patch: dict[str, Any]) -> None:
    target = patch["target"]
    if set(target) - {"kind", "name", "group"}:
        raise Unsupported(f"patch target fields: {sorted(target)}")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise Unsupported("only JSON 6902 patches (a list of operations) are implemented")
    for manifest in manifests:
        if _targets(target, manifest):
            for operation in operations:
                _apply_operation(manifest, operation)


def _targets(target: dict[str, str], manifest: Manifest) -> bool:
    group = manifest["apiVersion"].rpartition("/")[0]
    checks = {"kind": manifest["kind"], "name": manifest["metadata"]["name"], "group": group}
    return all(re.fullmatch(target[key], checks[key]) for key in target)


def _apply_operation(manifest: Manifest, operation: dict[str, Any]) -> None:
    if operation["op"] not in {"add", "replace"}:
        raise Unsupported(f"patch operation {operation['op']}")
    *parents, last = [
        p.replace("~1", "/").replace("~0", "~") for p in operation["path"][1:].split("/")
    ]
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    value = copy.deepcopy(operation["value"])
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if operation["op"] == "add":
            node.insert(index, value)
        else:
            node[index] = value
    elif operation["op"] == "replace" and last not in node:
        raise KeyError(f"replace: {operation['path']} does not exist")
    else:
        node[last] = value

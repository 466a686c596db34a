"""deploy/: every manifest valid against the Kubernetes schemas (kubernetes-validate, strict) or its CRD's schema
(KEDA's, prometheus-operator's, as cloudcoil's models generated from the CRDs), every kustomization naming files
and patch targets that exist, the Envoy configurations rendered from swiftdiffusion.routing and accepted by Envoy,
and the replicas' container command rendering the README's GPU placements with `serve --write-only`.

No kustomize or kubectl here: the overlays are not built. Their patches are kept complete enough to be valid
manifests themselves (the ConfigMap ones whole), which is what these tests check, with their targets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PodMonitor
from kubernetes_validate import utils as kubernetes_validate

from swiftdiffusion.envoy import validate as envoy_validate
from swiftdiffusion.routing import KUBERNETES_UPSTREAMS, kubernetes_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUSTOMIZE_KINDS = ("Kustomization", "Component")
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
                    ("monitoring.coreos.com/v1", "PodMonitor"): PodMonitor}
ENVOY_CONFIGS = {"base/envoy.yaml": "least_request", "components/lora-affinity/envoy.yaml": "lora_affinity"}
# The README's Placement blocks: the ControlNet model's instance_group per layout.
PLACEMENTS = {"base": ("1", [[0]]), "components/gpu-2": ("2", [[1]]), "components/gpu-4": ("4", [[1], [2], [3]])}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/ (not kustomizations, not Envoy's configuration files)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.relative_to(DEPLOY).as_posix() in ENVOY_CONFIGS:
            continue
        found += [(path, d) for d in documents(path) if d["kind"] not in KUSTOMIZE_KINDS]
    return found


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def one(path: str, kind: str) -> dict:
    return next(d for d in documents(DEPLOY / path) if d["kind"] == kind)


@pytest.mark.parametrize("path,manifest", manifests(), ids=lambda v: v.relative_to(DEPLOY).as_posix()
                         if isinstance(v, Path) else "")
def test_every_manifest_is_valid(path, manifest):
    custom = CUSTOM_RESOURCES.get((manifest["apiVersion"], manifest["kind"]))
    if custom is None:
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
        return
    model = custom.model_validate(manifest)  # types, required fields, enums
    # pydantic drops fields the CRD does not have: what comes back must be all that went in
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == manifest


def test_the_validators_reject_what_they_should():
    deployment = one("base/triton-deployment.yaml", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    monitor = one("base/podmonitor.yaml", "PodMonitor")
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    assert PodMonitor.model_validate(monitor).model_dump(by_alias=True, exclude_unset=True, mode="json") != monitor


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: p.parent.relative_to(DEPLOY).as_posix())
def test_every_kustomization_names_what_exists(path):
    kustomization = documents(path)[0]
    folder = path.parent
    for entry in kustomization.get("resources", []):
        target = folder / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), entry
    for entry in kustomization.get("components", []):
        assert documents(folder / entry / "kustomization.yaml")[0]["kind"] == "Component", entry
    for generator in kustomization.get("configMapGenerator", []):
        assert all((folder / f.split("=")[-1]).is_file() for f in generator["files"])
    for patch in kustomization.get("patches", []):
        for target in documents(folder / patch["path"]):
            assert (target["kind"], target["metadata"]["name"], target["metadata"]["namespace"]) in base_objects()


def base_objects() -> set[tuple[str, str, str]]:
    return {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
            for path, d in manifests() if path.parent == DEPLOY / "base"}


def test_every_file_is_used():
    named = {DEPLOY / "Dockerfile", *kustomizations()}
    for path in kustomizations():
        kustomization = documents(path)[0]
        named |= {(path.parent / e).resolve() for e in kustomization.get("resources", [])}
        named |= {(path.parent / p["path"]).resolve() for p in kustomization.get("patches", [])}
        named |= {(path.parent / f.split("=")[-1]).resolve() for g in kustomization.get("configMapGenerator", [])
                  for f in g["files"]}
    assert {p for p in DEPLOY.rglob("*") if p.is_file()} <= named


def test_component_patches_replace_the_serve_settings_whole():
    base = one("base/serve-config.yaml", "ConfigMap")["data"]
    for component in ("gpu-2", "gpu-4"):
        patched = one(f"components/{component}/serve-config.yaml", "ConfigMap")["data"]
        assert patched.keys() == base.keys()
        assert {k: v for k, v in patched.items() if k != "SWIFTDIFFUSION_CONTROLNET_GPUS"} == \
               {k: v for k, v in base.items() if k != "SWIFTDIFFUSION_CONTROLNET_GPUS"}


@pytest.mark.parametrize("path,policy", ENVOY_CONFIGS.items())
def test_the_envoy_configurations_are_rendered_by_the_package_and_valid(path, policy):
    assert yaml.safe_load((DEPLOY / path).read_text()) == kubernetes_config(policy), \
        f"deploy/{path} is stale: python -m swiftdiffusion.routing --policy {policy} > deploy/{path}"
    checked = envoy_validate(DEPLOY / path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_envoy_reaches_the_replicas_through_the_headless_service():
    service = one("base/triton-service.yaml", "Service")
    (host, port), = KUBERNETES_UPSTREAMS.addresses
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert service["spec"]["clusterIP"] == "None" and KUBERNETES_UPSTREAMS.dns
    assert {"name": "grpc", "port": port} == {k: v for p in service["spec"]["ports"] if p["name"] == "grpc"
                                              for k, v in p.items() if k in ("name", "port")}
    listen = kubernetes_config("least_request")["static_resources"]["listeners"][0]["address"]["socket_address"]
    envoy = one("base/envoy-deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert envoy["ports"][0]["containerPort"] == listen["port_value"] and listen["address"] == "0.0.0.0"


def test_autoscalers_use_the_adapters_metric_and_one_target():
    rules = yaml.safe_load(one("components/hpa/prometheus-adapter-config.yaml", "ConfigMap")["data"]["config.yaml"])
    hpa_metric = one("components/hpa/hpa.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]
    assert hpa_metric["metric"]["name"] == rules["rules"][0]["name"]["as"]
    assert hpa_metric["target"]["averageValue"] == "400m"
    trigger = one("components/keda/scaledobject.yaml", "ScaledObject")["spec"]["triggers"][0]
    assert float(trigger["metadata"]["threshold"]) == 0.4
    for query in (rules["rules"][0]["metricsQuery"], trigger["metadata"]["query"]):
        assert 'model="denoiser"' in query and "nv_inference_queue_duration_us" in query


def test_the_dockerfile_copies_what_exists():
    copied = re.findall(r"^COPY (.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert (DEPLOY.parent / source).exists(), source


@pytest.mark.parametrize("layout", PLACEMENTS)
def test_the_replicas_command_renders_the_readmes_placement(tmp_path, tiny_root, layout):
    """The triton container's own command line, with the layout's settings as its environment and the tiny model
    in place of SD1.5, run here with --write-only: the ControlNet instances land on the README's GPUs."""
    gpu_count, controlnet_gpus = PLACEMENTS[layout]
    container = one("base/triton-deployment.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = one(f"{layout}/serve-config.yaml", "ConfigMap")["data"]
    settings.update(SWIFTDIFFUSION_MODEL=str(tiny_root / "model"),
                    SWIFTDIFFUSION_CONTROLNETS=str(tiny_root / "controlnets"),
                    SWIFTDIFFUSION_LORAS=str(tiny_root / "loras"))
    environment = {**os.environ, **settings, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [*container["command"], "--write-only", "--repository", str(tmp_path)]
    rendered = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stderr
    groups = re.findall(r"gpus: \[ ([\d, ]+) \]", (tmp_path / "controlnet" / "config.pbtxt").read_text())
    assert [[int(g) for g in group.split(",")] for group in groups] == controlnet_gpus
    assert "gpus: [ 0 ]" in (tmp_path / "denoiser" / "config.pbtxt").read_text()
    patched = container if layout == "base" else \
        one(f"{layout}/triton-gpus.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    resources = patched["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == gpu_count
    assert int(gpu_count) == 1 + max(max(g) for g in controlnet_gpus)  # the UNet on GPU 0, ControlNets after it

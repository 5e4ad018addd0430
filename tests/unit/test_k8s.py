"""The Kubernetes manifests (deploy/k8s), checked offline: every built-in object against Kubernetes'
own OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), every KEDA object
against the models generated from KEDA's CRDs (@kubernetes-models/keda, run by Node.js), and the
references between them and the code (queues, settings, probes, selectors) by hand."""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.support import ROOT, need

K8S = ROOT / "deploy" / "k8s"
TOOLS = K8S / "tools"
VERSIONS = ("1.30.0", "1.37.0")  # the oldest Kubernetes we support and the newest schema shipped


def load_kustomization(folder: pathlib.Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would send, for the features our manifests use:
    resources (files and folders), strategic-merge patches of Deployments, the common namespace."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert spec["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        path = (folder / res).resolve()
        if path.is_dir():
            objects += load_kustomization(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        doc = yaml.safe_load((folder / patch["path"]).read_text())
        target = [o for o in objects if o["kind"] == doc["kind"] and o["metadata"]["name"] == doc["metadata"]["name"]]
        assert len(target) == 1, f"patch {patch['path']} matches {len(target)} objects"
        merge(target[0], doc)
    if "namespace" in spec:
        for o in objects:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = spec["namespace"]
    for label in spec.get("labels", []):
        for o in objects:
            o["metadata"].setdefault("labels", {}).update(label["pairs"])
    return objects


def merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge as Kubernetes does it for what our patches touch: maps merge, lists of
    named items (containers, env) merge by name, other lists are replaced."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value) \
                and isinstance(base.get(key), list):
            by_name = {item["name"]: item for item in base[key]}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def keda_errors(objects: list[dict[str, Any]]) -> dict[str, str | None]:
    node = shutil.which("node")
    need(node is not None and (TOOLS / "node_modules" / "@kubernetes-models" / "keda").exists(),
         "Node.js and deploy/k8s/tools' packages (bash scripts/setup.sh test)")
    out = subprocess.run([node, str(TOOLS / "validate-keda.mjs")], input=json.dumps(objects), capture_output=True,
                         text=True, cwd=TOOLS, timeout=60)
    assert out.returncode == 0, out.stderr
    return {f"{r['kind']}/{r['name']}": r["error"] for r in json.loads(out.stdout)}


def is_keda(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].startswith("keda.sh/")


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return load_kustomization(K8S / request.param)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_builtin_objects_match_the_kubernetes_schemas(objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    builtin = [o for o in objects if not is_keda(o)]
    assert {o["kind"] for o in builtin} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                            "Ingress", "ConfigMap", "Secret", "Namespace"}
    for version in VERSIONS:
        for o in builtin:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{o['kind']}/{o['metadata']['name']} is invalid for Kubernetes {version}: {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")


def test_keda_objects_match_kedas_crd_models(objects: list[dict[str, Any]]) -> None:
    keda = [o for o in objects if is_keda(o)]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    errors = keda_errors(keda)
    assert len(errors) == len(keda) and not any(errors.values()), errors


def test_the_validators_reject_broken_objects() -> None:
    """Both checks above can fail: a wrongly typed field and a missing required one are caught."""
    import kubernetes_validate

    deployment = copy.deepcopy(by_kind(load_kustomization(K8S / "base"), "Deployment")["mp4totext-api"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment["spec"]["replicas"], deployment["spec"]["template"]["spec"]["containerz"] = 2, []
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: an unknown field is an error
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    broken = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "broken"},
              "spec": {"scaleTargetRef": {"name": "x"}, "minReplicaCount": "one"}}
    assert "triggers" in (keda_errors([broken])["ScaledObject/broken"] or "")


@dataclasses.dataclass
class Workers:
    deployments: dict[str, dict[str, Any]]

    def queues(self, name: str) -> list[str]:
        args = self.deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["worker", "--queues"], args
        return args[2].split(",")


def test_every_queue_has_one_worker_group_that_scales_on_it(objects: list[dict[str, Any]]) -> None:
    from core.plan import QUEUES

    deployments = by_kind(objects, "Deployment")
    workers = Workers({n: d for n, d in deployments.items() if n.startswith("mp4totext-worker-")})
    consumed = [q for name in workers.deployments for q in workers.queues(name)]
    assert sorted(consumed) == sorted(QUEUES), "each queue consumed by exactly one worker Deployment"
    scaled = by_kind(objects, "ScaledObject")
    assert set(scaled) == set(workers.deployments), "every worker group autoscales"
    for name, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in workers.deployments
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] in workers.queues(target)
            assert trigger["authenticationRef"]["name"] in by_kind(objects, "TriggerAuthentication")
    secrets = by_kind(objects, "Secret")
    for auth in by_kind(objects, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]["stringData"]


def test_server_probes_disruption_budget_autoscaler_and_ingress(objects: list[dict[str, Any]]) -> None:
    server = by_kind(objects, "Deployment")["mp4totext-api"]
    labels = server["spec"]["template"]["metadata"]["labels"]
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    http_paths = (ROOT / "observability" / "metrics.py").read_text()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert f'"{path}"' in http_paths, f"{probe} {path} is not served"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # grpc.health.v1 status: drains on SIGTERM
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["MP4T_GRPC_DRAIN_S"]) + float(env["MP4T_GRPC_GRACE_S"])
    pdb = by_kind(objects, "PodDisruptionBudget")["mp4totext-api"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind(objects, "Service")["mp4totext-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["mp4totext-api"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mp4totext-api" and hpa["spec"]["minReplicas"] >= 2
    ingress = by_kind(objects, "Ingress")["mp4totext-api"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "mp4totext-api" and backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_configuration_names_are_real_settings(objects: list[dict[str, Any]]) -> None:
    """Config and secrets use the same variables as docker-compose and deploy/example.env: a typo
    would be silently ignored by the program, so it fails here."""
    from mp4totext.config import Settings

    known = {f"MP4T_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    names: set[str] = set(by_kind(objects, "ConfigMap")["mp4totext-config"]["data"])
    names |= set(by_kind(objects, "Secret")["mp4totext-secrets"]["stringData"])
    for d in by_kind(objects, "Deployment").values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
            refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in c["envFrom"]}
            assert refs == {"mp4totext-config", "mp4totext-secrets"}
    unknown = {n for n in names if n.startswith("MP4T_")} - known
    assert not unknown, f"not settings of mp4totext/config.py: {sorted(unknown)}"


def test_gpu_overlay_runs_transcription_on_a_gpu() -> None:
    base = by_kind(load_kustomization(K8S / "base"), "Deployment")["mp4totext-worker-high"]
    gpu = by_kind(load_kustomization(K8S / "overlays" / "gpu"), "Deployment")["mp4totext-worker-high"]
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":cuda") and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MP4T_WHISPER_DEVICE"] == "cuda"
    assert container["args"] == base["spec"]["template"]["spec"]["containers"][0]["args"]  # same queue
    assert "nvidia.com/gpu" not in base["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

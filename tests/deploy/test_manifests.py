"""deploy/kubernetes/ against the real schemas: Kubernetes' own (kubernetes-validate, pinned),
the custom resources' (tests/deploy/schemas/, from their published packages), and the daemon
itself (its config loads; the metric the autoscalers read is one it exports)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.helpers import ROOT, free_port

KUBERNETES = "1.33.0"  # the Kubernetes version the manifests are checked against
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving.kserve.io-v1alpha1.json",
          ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.json",
          ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
          ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json"}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out.append((f"{path.relative_to(DEPLOY)}:{doc['kind']}", doc))
    return out


@functools.lru_cache(maxsize=1)
def kubernetes_definitions() -> dict:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES}-local-strict"
    return json.loads((base / "_definitions.json").read_text())


def validate(doc: dict) -> None:
    """Raise if `doc` does not fit its schema: Kubernetes' for its own kinds, else the CRD's."""
    custom = CUSTOM.get((doc["apiVersion"], doc["kind"]))
    if custom is None:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    schema = json.loads((SCHEMAS / custom).read_text())
    definitions = kubernetes_definitions()
    resource = Resource.from_contents(definitions)
    registry = Registry().with_resources([("_definitions.json", resource), (definitions["$id"], resource)])
    jsonschema.Draft7Validator(schema, registry=registry).validate(doc)


@pytest.mark.parametrize("name,doc", documents(), ids=[n for n, _ in documents()])
def test_every_manifest_fits_its_schema(name, doc):
    validate(doc)


def test_the_checks_can_fail():
    """A typo in a core kind and in a custom resource are both caught."""
    docs = dict(documents())
    deployment = json.loads(json.dumps(docs["deployment.yaml:Deployment"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    runtime = json.loads(json.dumps(docs["kserve/servingruntime.yaml:ServingRuntime"]))
    runtime["spec"]["containers"][0]["imagePullPolicy"] = 3  # a string in Kubernetes' Container
    with pytest.raises(jsonschema.ValidationError):
        validate(runtime)
    scaled = json.loads(json.dumps(docs["keda.yaml:ScaledObject"]))
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_the_kustomization_lists_every_manifest_of_its_directory():
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "keda.yaml"}  # keda: instead of the HPA
    assert set(listed) == on_disk


def test_the_config_loads_and_every_path_it_names_is_mounted(short_tmp):
    docs = dict(documents())
    toml_text = docs["configmap.yaml:ConfigMap"]["data"]["isopool.toml"]
    cfg = short_tmp / "isopool.toml"
    cfg.write_text(toml_text.replace("mymodel:Model", "isopool.models.default:DefaultModel"))
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--config", str(cfg), "--print-config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    printed = tomllib.loads(out.stdout)
    model = printed["models"]["default"]
    assert model["max-rss"] == 2560 << 20 and model["workers"] == 4
    container = docs["deployment.yaml:Deployment"]["spec"]["template"]["spec"]["containers"][0]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    paths = [v for v in tomllib.loads(toml_text).values() if isinstance(v, str) and v.startswith("/")]
    assert len(paths) == 5  # cert, key, tokens, CURVE key and clients
    paths.append(container["args"][container["args"].index("--config") + 1])
    assert paths and all(any(p.startswith(m + "/") for m in mounts) for p in paths), (paths, mounts)
    memory = container["resources"]["limits"]["memory"]
    assert memory == "12Gi" and model["max-rss"] * model["workers"] <= (12 << 30) - (2 << 30)  # as its comment says


def test_the_autoscalers_read_a_metric_the_daemon_exports(start_pool):
    docs = dict(documents())
    hpa = docs["hpa.yaml:HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(docs["prometheus-adapter.yaml:ConfigMap"]["data"]["config.yaml"])["rules"][0]
    adapter_in = re.match(r"(\w+)\{", rules["seriesQuery"]).group(1)
    keda = re.match(r"sum\((\w+)\{", docs["keda.yaml:ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]).group(1)
    assert hpa == rules["name"]["as"] == adapter_in == keda == "isopool_queue_depth"
    pool = start_pool("--metrics-port", str(free_port()))
    text = urllib.request.urlopen(pool.status()["pool"]["metrics_url"], timeout=10).read().decode()
    series = [line for line in text.splitlines() if line.startswith(hpa + "{")]
    assert series == ['isopool_queue_depth{model="default"} 0.0']  # one per model, labelled by it

"""Regenerate the custom resources' JSON schemas the manifest tests validate against.

    python tests/deploy/schemas/make.py      (needs pip and npm, and their registries)

Sources, each a published package (README.md here names the versions):
    KServe ServingRuntime, InferenceService   the `kserve` Python SDK on PyPI: its OpenAPI models
                                              (kserve/models/*.py: openapi_types, attribute_map)
    KEDA ScaledObject                         npm @kubernetes-models/keda (generated from KEDA's CRDs)
    Prometheus operator ServiceMonitor        npm @kubernetes-models/prometheus-operator (from its CRDs)

Kubernetes' own types inside them (Container, ObjectMeta, ...) are left as references to
`_definitions.json` (its `$defs`), which the test resolves to kubernetes-validate's schemas of the
pinned Kubernetes version. A kserve field of a type neither package describes is left open
({}), and counted in the output.
"""

from __future__ import annotations

import ast
import glob
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).parent
KSERVE = "kserve==0.21.0"
NPM = {"scaledobject-keda.sh-v1alpha1.json": ("@kubernetes-models/keda@0.3.1", "keda.sh/v1alpha1/ScaledObject.js"),
       "servicemonitor-monitoring.coreos.com-v1.json": ("@kubernetes-models/prometheus-operator@1.6.3",
                                                         "monitoring.coreos.com/v1/ServiceMonitor.js")}
KSERVE_ROOTS = {"servingruntime-serving.kserve.io-v1alpha1.json": ("V1alpha1ServingRuntime", "serving.kserve.io/v1alpha1",
                                                                   "ServingRuntime"),
                "inferenceservice-serving.kserve.io-v1beta1.json": ("V1beta1InferenceService", "serving.kserve.io/v1beta1",
                                                                    "InferenceService")}
K8S = "_definitions.json#/$defs/"
META = {"V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time", "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
        "V1Condition": "io.k8s.apimachinery.pkg.apis.meta.v1.Condition"}
SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
           "bool": {"type": "boolean"}, "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"}}


def kserve_models(wheel: str) -> dict[str, tuple[dict, dict]]:
    """{class name: (openapi_types, attribute_map)} of every kserve model, read without importing it."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not re.fullmatch(r"kserve/models/v1(alpha1|beta1)_\w+\.py", name):
                continue
            tree = ast.parse(z.read(name))
            for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
                found = {t.targets[0].id: ast.literal_eval(t.value) for t in cls.body
                         if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                         and t.targets[0].id in ("openapi_types", "attribute_map")}
                if len(found) == 2:
                    out[cls.name] = (found["openapi_types"], found["attribute_map"])
    return out


def kserve_schema(root: str, api_version: str, kind: str, models: dict, open_types: set) -> dict:
    definitions: dict[str, dict] = {}

    def of(t: str) -> dict:
        t = t.strip()
        if t in SCALARS:
            return dict(SCALARS[t])
        if t.startswith("list[") and t.endswith("]"):
            return {"type": "array", "items": of(t[5:-1])}
        if t.startswith("dict(") and t.endswith(")"):
            return {"type": "object", "additionalProperties": of(t[5:-1].split(",", 1)[1])}
        if t in models:
            if t not in definitions:
                definitions[t] = {}
                types, keys = models[t]
                definitions[t] = {"type": "object", "additionalProperties": False,
                                  "properties": {keys[a]: of(types[a]) for a in types}}
            return {"$ref": f"#/definitions/{t}"}
        if t in META:
            return {"$ref": K8S + META[t]}
        if re.fullmatch(r"V1[A-Z]\w+", t):
            return {"$ref": K8S + "io.k8s.api.core.v1." + t[2:]}
        if m := re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d(?:alpha\d|beta\d)?)([A-Z]\w+)", t):
            return {"$ref": K8S + f"io.k8s.api.{m.group(1).lower()}.{m.group(2).lower()}.{m.group(3)}"}
        open_types.add(t)
        return {}

    top = of(root)
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **definitions[root], "definitions": definitions}
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = ["apiVersion", "kind", "spec"]
    assert top == {"$ref": f"#/definitions/{root}"}
    return schema


def npm_schema(package: str, member: str, work: str) -> dict:
    subprocess.run(["npm", "pack", package, "--pack-destination", work], check=True, capture_output=True, timeout=300)
    tarball = max(glob.glob(f"{work}/*.tgz"), key=lambda p: Path(p).stat().st_mtime)
    with tarfile.open(tarball) as t:
        text = t.extractfile(f"package/{member}").read().decode()
    start = text.index("const schema = ") + len("const schema = ")
    end = text.index("\n};", start) + 2
    schema = json.loads(text[start:end])
    return json.loads(re.sub(r'"\$ref": "([\w.]+)#"', lambda m: f'"$ref": "{K8S}{m.group(1)}"', json.dumps(schema)))


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", KSERVE, "--no-deps", "-d", work], check=True,
                       capture_output=True, timeout=300)
        models = kserve_models(glob.glob(f"{work}/kserve-*.whl")[0])
        open_types: set[str] = set()
        for out, (root, api_version, kind) in KSERVE_ROOTS.items():
            (HERE / out).write_text(json.dumps(kserve_schema(root, api_version, kind, models, open_types), indent=1) + "\n")
        for out, (package, member) in NPM.items():
            (HERE / out).write_text(json.dumps(npm_schema(package, member, work), indent=1) + "\n")
    print(f"wrote {len(KSERVE_ROOTS) + len(NPM)} schemas; kserve types left open: {sorted(open_types) or 'none'}")


if __name__ == "__main__":
    main()

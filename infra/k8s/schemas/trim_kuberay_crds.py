"""Write the KubeRay CRDs' ``spec`` schemas, trimmed of core Kubernetes types, as one small JSON file.

The full CRDs are ~1.4 MB each, almost all of it the embedded PodTemplateSpec and other core types.
Those subtrees are replaced by ``{"type": "object"}`` here, because tests/test_infra_k8s.py validates them
with kubernetes-validate against the real Kubernetes schemas instead; what remains checks KubeRay's own
fields (names, types, enums, required keys). Regenerate after bumping KubeRay:

    python infra/k8s/schemas/trim_kuberay_crds.py <kuberay>/ray-operator/config/crd/bases v1.7.0 \\
        > infra/k8s/schemas/kuberay-crds.json
"""

import json
import sys
from pathlib import Path

import yaml

KINDS = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# Properties whose schema is a core Kubernetes type (validated elsewhere) or output-only.
CORE = {
    "template", "submitterPodTemplate", "securityContext", "resources", "env", "envFrom", "volumeMounts",
    "volumes", "headService", "serveService", "ingressOptions", "deletionStrategy", "submitterConfig",
    "tlsOptions", "historyServerOptions", "networkPolicy", "gcsFaultToleranceOptions", "upgradeStrategy",
}  # fmt: skip


def _trim(schema):
    if isinstance(schema, list):
        return [_trim(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {
                name: {"type": "object"} if name in CORE else _trim(sub) for name, sub in value.items()
            }
        else:
            out[key] = _trim(value)
    return out


def main(crd_dir: str, version: str) -> None:
    schemas = {"kuberay_version": version, "apiVersion": "ray.io/v1", "kinds": {}}
    for kind, filename in KINDS.items():
        crd = yaml.safe_load((Path(crd_dir) / filename).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas["kinds"][kind] = _trim(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
    json.dump(schemas, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

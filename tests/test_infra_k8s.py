"""The Kubernetes manifests (``infra/k8s``), checked without a cluster.

- yamllint on everything under ``infra/``;
- kubernetes-validate (strict) on the core kinds, and on every pod template the KubeRay objects embed
  (as ``PodTemplate`` objects), since it has no schema for the CRDs themselves;
- the KubeRay fields against KubeRay v1.7.0's CRD schemas (``infra/k8s/schemas/kuberay-crds.json``, core
  subtrees trimmed out because they are validated above), with unknown fields rejected;
- checkov on the core kinds plus every embedded pod template turned into a Pod; each accepted finding is
  a ``checkov.io/skipN`` annotation with its reason, and is listed in ``infra/k8s/README.md``;
- Pod Security "restricted" requirements on every pod;
- every command, module, flag, config path, import path, image tag and Secret a manifest names exists in
  the project (the missing ones show as failing parametrized cases with the reference in their id).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
IMAGE_ROOT = "/opt/qsmrim"  # the image's WORKDIR; `COPY platform ./platform` puts the configs under it


def _tool(name: str) -> str:
    """A linter's executable: the test venv, the isolated tools venv (checkov), then PATH; else fail loudly."""
    for candidate in (Path(sys.executable).parent / name, REPO / ".venv-tools" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"{name} not found: install the test extras (pip install -e '.[test]') and run .ci/install-system-deps.sh"
    )


def _docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def _doc_id(path: Path, doc: dict) -> str:
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


def _cluster_specs(doc: dict) -> list[dict]:
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return [doc["spec"] if key is None else doc["spec"][key]]


def _pod_templates() -> list[tuple[str, dict, dict]]:
    """``(id, pod template, owning doc)`` for every pod the manifests describe, embedded ones included."""
    out = []
    for path, doc in _docs():
        base = _doc_id(path, doc)
        if doc["kind"] in RAY_KINDS:
            for cluster in _cluster_specs(doc):
                out.append((f"{base}/head", cluster["headGroupSpec"]["template"], doc))
                for group in cluster.get("workerGroupSpecs", []):
                    out.append((f"{base}/{group['groupName']}", group["template"], doc))
            if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
                out.append((f"{base}/submitter", doc["spec"]["submitterPodTemplate"], doc))
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((base, doc["spec"]["template"], doc))
    return out


POD_TEMPLATES = _pod_templates()


# -- lint and schemas -----------------------------------------------------------------------------------------


def test_infra_yaml_is_yamllint_clean():
    """Check that every YAML file under infra/ passes yamllint with infra/yamllint.yaml."""
    res = subprocess.run(
        [_tool("yamllint"), "-c", str(REPO / "infra" / "yamllint.yaml"), "-f", "parsable", "--strict", "infra"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    "path, doc",
    [(p, d) for p, d in _docs() if d["kind"] not in RAY_KINDS],
    ids=lambda v: getattr(v, "name", ""),
)
def test_core_manifest_is_valid_kubernetes(path, doc):
    """Check a core-kind object against the Kubernetes OpenAPI schema, unknown fields rejected."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert doc["metadata"].get("namespace") == "qsmrim" or doc["kind"] == "Namespace"


@pytest.mark.parametrize("name, template, owner", POD_TEMPLATES, ids=[t[0] for t in POD_TEMPLATES])
def test_pod_template_is_valid_kubernetes(name, template, owner):
    """Check each (embedded) pod template as a v1 PodTemplate, unknown fields rejected."""
    import kubernetes_validate

    obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t", "namespace": "qsmrim"}}
    kubernetes_validate.validate(
        {**obj, "template": template}, kubernetes_validate.latest_version(), strict=True
    )


def _strict(schema):
    """Reject unknown fields wherever the schema lists its properties (Kubernetes would prune them)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


RAY_DOCS = [(p, d) for p, d in _docs() if d["kind"] in RAY_KINDS]


@pytest.mark.parametrize("path, doc", RAY_DOCS, ids=[_doc_id(p, d) for p, d in RAY_DOCS])
def test_kuberay_manifest_matches_the_crd(path, doc):
    """Check a KubeRay object's own fields against KubeRay v1.7.0's CRD schema (unknown fields rejected)."""
    crds = json.loads((K8S / "schemas" / "kuberay-crds.json").read_text())
    assert doc["apiVersion"] == crds["apiVersion"]
    schema = _strict(copy.deepcopy(crds["kinds"][doc["kind"]]))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc["spec"]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"spec.{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    for cluster in _cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling"):
            # The autoscaler sidecar is a container KubeRay adds: validate what we give it, as a container.
            import kubernetes_validate

            opts = cluster["autoscalerOptions"]
            container = {
                "name": "autoscaler",
                "image": "x",
                **{k: opts[k] for k in ("resources", "securityContext")},
            }
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "a"},
                "spec": {"containers": [container]},
            }
            kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


# -- security ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, template, owner", POD_TEMPLATES, ids=[t[0] for t in POD_TEMPLATES])
def test_pod_meets_restricted_pod_security_and_sets_resources(name, template, owner):
    """Check Pod Security "restricted" (the namespace enforces it) and requests/limits on every container."""
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True
    assert pod_sc.get("runAsUser", 0) >= 10000
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v]
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']}: {kind}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{c['name']}: read-only root needs a writable /tmp"
        if c.get("workingDir"):
            assert c["workingDir"] in mounts, f"{c['name']}: workingDir {c['workingDir']} is not a volume"
    for cluster in _cluster_specs(owner) if owner["kind"] in RAY_KINDS else []:
        if cluster.get("enableInTreeAutoscaling"):
            sc = cluster["autoscalerOptions"]["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def _checkov_inputs(tmp: Path) -> None:
    """Core manifests as they are, plus each embedded pod template as a Pod carrying its annotations."""
    for path in MANIFESTS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] not in RAY_KINDS]
        if docs:
            (tmp / path.name).write_text(yaml.safe_dump_all(docs))
    for i, (name, template, owner) in enumerate(POD_TEMPLATES):
        if owner["kind"] not in RAY_KINDS:
            continue
        meta = template.get("metadata", {})
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": re.sub(r"[^a-z0-9-]+", "-", name.split(":", 1)[1].lower()).strip("-"),
                "namespace": owner["metadata"]["namespace"],
                "labels": meta.get("labels", {}),
                "annotations": meta.get("annotations", {}),
            },
            "spec": template["spec"],
        }
        (tmp / f"pod-{i:02d}.yaml").write_text(yaml.safe_dump(pod))


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checkov")
    _checkov_inputs(tmp)
    res = subprocess.run(
        [_tool("checkov"), "-d", str(tmp), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov gave no JSON (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        )
    reports = report if isinstance(report, list) else [report]
    results = [r.get("results", {}) for r in reports]
    return {key: [c for r in results for c in r.get(key, [])] for key in ("failed_checks", "skipped_checks")}


def test_checkov_finds_nothing_unaccepted(checkov_report):
    """Check that checkov's Kubernetes policies pass, except findings accepted with a skip annotation."""
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in checkov_report["failed_checks"]]
    assert not failed, "\n".join(failed)


def test_every_accepted_checkov_finding_is_documented(checkov_report):
    """Check that each skipped checkov check has a reason and is listed in infra/k8s/README.md."""
    readme = (K8S / "README.md").read_text()
    skipped = {c["check_id"] for c in checkov_report["skipped_checks"]}
    assert skipped, "expected the accepted findings (image digests, ...) to show as skipped"
    for check in checkov_report["skipped_checks"]:
        reason = check.get("check_result", {}).get("suppress_comment") or check.get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} skipped on {check['resource']} without a reason"
    undocumented = sorted(c for c in skipped if c not in readme)
    assert not undocumented, f"accepted checkov findings missing from infra/k8s/README.md: {undocumented}"


# -- references to the project -----------------------------------------------------------------------------


# The guides name the same commands and paths: they are checked with the manifests.
DOCS = [
    REPO / "docs" / "deploy.md",
    REPO / "infra" / "README.md",
    *sorted((REPO / "infra").glob("*/README.md")),
]


def _all_text(with_docs: bool = True) -> str:
    return "\n".join(p.read_text() for p in MANIFESTS + (DOCS if with_docs else []) if p.exists())


def _entrypoint_commands() -> list[list[str]]:
    """Each ``python -m ...`` command in a RayJob entrypoint, and in the manifests' usage comments."""
    commands = []
    for _, doc in _docs():
        if doc["kind"] == "RayJob":
            for part in re.split(r"&&|;", doc["spec"]["entrypoint"]):
                tokens = shlex.split(part)
                if tokens[:2] == ["python", "-m"]:
                    commands.append(tokens)
    for match in re.finditer(r"python -m [\w.]+[^\n#`'\"]*", _all_text()):
        tokens = [t for t in shlex.split(match.group(0).rstrip("\\ ")) if t != "\\"]
        if tokens not in commands:
            commands.append(tokens)
    return commands


COMMANDS = _entrypoint_commands()
CONFIG_PATHS = sorted(
    set(
        re.findall(
            r"(?:/opt/qsmrim/)?(?:platform|jobs|serving|qsmrim|infra|docs)/[\w./-]+\.(?:yaml|yml|py|sh|json|md|lock|in)",
            _all_text(),
        )
    )
)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[2:]) for c in COMMANDS])
def test_manifest_command_exists_with_its_flags(command):
    """Check that a ``python -m <module>`` a manifest runs is a project module accepting every flag used."""
    module = command[2]
    rel = module.replace(".", "/")
    assert (REPO / f"{rel}.py").exists() or (REPO / rel / "__main__.py").exists(), (
        f"{module} is not in the project"
    )
    res = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for flag in (t for t in command[3:] if t.startswith("--")):
        assert flag in res.stdout, f"python -m {module} has no {flag}"


@pytest.mark.parametrize("path", CONFIG_PATHS)
def test_manifest_path_exists_in_the_project(path):
    """Check that a project path a manifest names exists (image paths /opt/qsmrim/... map to the checkout)."""
    rel = path.removeprefix(IMAGE_ROOT + "/")
    assert (REPO / rel).exists(), f"{path} is named in infra/k8s but {rel} is not in the project"
    if path.startswith(IMAGE_ROOT):
        dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
        top = rel.split("/")[0]
        assert re.search(rf"^COPY {top} \./{top}$", dockerfile, flags=re.M), f"the image does not copy {top}/"


QSMRIM_SUBCOMMANDS = sorted(
    set(re.findall(r"(?<!-n )(?:^|(?<=[\s/]))qsmrim ([a-z]+)(?= --)", _all_text(), re.M))
)


@pytest.mark.parametrize("sub", QSMRIM_SUBCOMMANDS)
def test_documented_qsmrim_subcommand_exists(sub):
    """Check that a ``qsmrim <command>`` the guides or manifests use is a subcommand of the CLI."""
    res = subprocess.run(
        [sys.executable, "-m", "qsmrim", sub, "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, f"qsmrim {sub}: {res.stderr[-500:]}"


def _serve_configs() -> list[tuple[str, dict]]:
    return [
        (_doc_id(p, d), yaml.safe_load(d["spec"]["serveConfigV2"]))
        for p, d in _docs()
        if d["kind"] == "RayService"
    ]


SERVE_CONFIGS = _serve_configs()


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[s[0] for s in SERVE_CONFIGS])
def test_rayservice_config_is_a_valid_serve_config_for_the_project_app(name, config):
    """Check serveConfigV2 against Ray Serve's schema, its import path in serving/, and its args against AppArgs."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.exists(), f"{app['import_path']}: no {source.relative_to(REPO)}"
        tree = ast.parse(source.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        names |= {
            t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
        }
        assert attr in names, f"{source.relative_to(REPO)} defines no {attr}"
        from serving.config import AppArgs

        AppArgs.model_validate(app.get("args", {}))


# Arguments that may differ between a laptop and the cluster; everything else must equal platform/serve.yaml.
CLUSTER_SPECIFIC_ARGS = {"execution_provider", "ort_threads"}


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[s[0] for s in SERVE_CONFIGS])
def test_rayservice_serves_the_application_of_platform_serve_yaml(name, config):
    """Check that the RayService runs platform/serve.yaml's application: import path, args, deployment names."""
    local = REPO / "platform" / "serve.yaml"
    assert local.exists(), "platform/serve.yaml is not in the tree yet"
    local_apps = {a["import_path"]: a for a in yaml.safe_load(local.read_text())["applications"]}
    for app in config["applications"]:
        assert app["import_path"] in local_apps, (
            f"{app['import_path']} is not an application of platform/serve.yaml"
        )
        theirs = local_apps[app["import_path"]]
        ours_args, their_args = app.get("args", {}), theirs.get("args", {})
        assert set(ours_args) == set(their_args), "args differ in keys from platform/serve.yaml"
        for key in set(ours_args) - CLUSTER_SPECIFIC_ARGS:
            assert ours_args[key] == their_args[key], f"args.{key}: {ours_args[key]!r} != {their_args[key]!r}"
        assert [d["name"] for d in app.get("deployments", [])] == [
            d["name"] for d in theirs.get("deployments", [])
        ]


def test_ingress_body_limit_admits_the_apps_upload_cap():
    """Check that nginx lets through bodies up to the app's max_upload_bytes (the app answers 413 itself)."""
    (config,) = [c for _, c in SERVE_CONFIGS]
    cap = config["applications"][0]["args"]["max_upload_bytes"]
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    for _, doc in _docs():
        if doc["kind"] == "Ingress" and doc["metadata"]["name"] == "qsmrim-serve":
            size = doc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
            assert int(size[:-1]) * units[size[-1].lower()] >= cap


def test_images_and_ray_version_match_the_project_pins():
    """Check image tags against the project version and the MLflow pin, and rayVersion against the lock."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    mlflow_pin = re.search(
        r"^mlflow\[auth\]==(\S+)", (REPO / "infra/mlflow/requirements.in").read_text(), re.M
    )
    ray_pin = re.search(r"^ray==(\S+)", (REPO / "infra/docker/requirements.lock").read_text(), re.M).group(1)
    images = set(re.findall(r"image: (\S+)", _all_text(with_docs=False)))
    assert images == {
        f"registry.example.org/qsmrim/qsmrim:{version}",
        f"registry.example.org/qsmrim/qsmrim-mlflow:{mlflow_pin.group(1)}",
    }
    for _, doc in RAY_DOCS:
        for cluster in _cluster_specs(doc):
            assert cluster["rayVersion"] == ray_pin


def test_mlflow_deployment_feeds_the_entrypoint_variables_it_reads():
    """Check that each MLFLOW_* variable the Deployment sets is one entrypoint.sh or MLflow itself reads."""
    import mlflow.environment_variables as mlflow_env

    script = (REPO / "infra" / "mlflow" / "entrypoint.sh").read_text()
    (deployment,) = [d for _, d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for var in (e["name"] for e in container["env"]):
        base = var.removesuffix("_FILE")
        assert base in script or hasattr(mlflow_env, var), (
            f"{var} is read by neither entrypoint.sh nor MLflow"
        )
        if var.endswith("_FILE"):
            assert base in script.split("for name in", 1)[1].split(";", 1)[0], f"entrypoint.sh has no {var}"


def test_every_secret_the_manifests_use_is_documented_with_its_keys():
    """Check that each Secret a manifest mounts or names has its `kubectl create secret` line in the README."""
    readme = (K8S / "README.md").read_text()
    text = _all_text()
    secrets = set(re.findall(r"secretName: (\S+)", text))
    assert secrets
    for secret in secrets:
        assert re.search(rf"kubectl .*create secret \w+ {re.escape(secret)}\b", readme), secret
    for path in set(re.findall(r"/etc/mlflow-server/([\w-]+)", text)):
        assert f"--from-file={path}=" in readme or f"--from-literal={path}=" in readme, path


def test_network_policies_select_pods_that_exist():
    """Check that each NetworkPolicy's podSelector matches at least one pod template's labels."""
    labels = [t.get("metadata", {}).get("labels", {}) for _, t, _ in POD_TEMPLATES]
    for _, doc in _docs():
        if doc["kind"] != "NetworkPolicy":
            continue
        wanted = doc["spec"]["podSelector"].get("matchLabels", {})
        assert any(wanted.items() <= pod.items() for pod in labels), doc["metadata"]["name"]


def test_ingress_backends_are_services_the_manifests_create():
    """Check each Ingress backend: a Service defined here, or the `<name>-serve-svc` KubeRay makes for a RayService."""
    services = {d["metadata"]["name"] for _, d in _docs() if d["kind"] == "Service"}
    services |= {f"{d['metadata']['name']}-serve-svc" for _, d in RAY_DOCS if d["kind"] == "RayService"}
    for _, doc in _docs():
        if doc["kind"] == "Ingress":
            for rule in doc["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    assert p["backend"]["service"]["name"] in services
            assert doc["spec"].get("tls"), f"{doc['metadata']['name']}: no TLS"

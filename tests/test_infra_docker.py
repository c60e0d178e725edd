"""The container images, checked by inspection (no Docker engine here): lint, build context, commands, pins.

``infra/docker/Dockerfile`` (one image for Ray, jobs and Serve) and ``infra/mlflow/Dockerfile`` cannot be
built on the dev machine or in CI, so these tests check what a build would trip on: hadolint and checkov,
every ``COPY`` source present and let through ``.dockerignore``, every command the image runs naming
something the project has, the dependency lock covering ``pyproject.toml``, and the HEALTHCHECK script
against a real HTTP server.
"""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "infra" / "docker" / "Dockerfile"
MLFLOW = REPO / "infra" / "mlflow" / "Dockerfile"
# Dockerfile -> its build context
CONTEXTS = {MAIN: REPO, MLFLOW: REPO / "infra" / "mlflow"}
SHELL_SCRIPTS = [
    REPO / "infra" / "mlflow" / "entrypoint.sh",
    *sorted((REPO / "infra" / "mlflow" / "initdb").glob("*.sh")),
    REPO / ".ci" / "install-system-deps.sh",
]


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


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments and parser directives dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = (buf + stripped).strip()
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(dockerfile):
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _copies(dockerfile: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    """``(sources, destination, flags)`` for every COPY/ADD, destination made absolute with WORKDIR."""
    out = []
    for stage in _stages(dockerfile):
        workdir = "/"
        for word, args in stage:
            if word == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, args))
            if word in ("COPY", "ADD"):
                tokens = shlex.split(args)
                flags = dict(t[2:].split("=", 1) for t in tokens if t.startswith("--"))
                paths = [t for t in tokens if not t.startswith("--")]
                dest = posixpath.normpath(posixpath.join(workdir, paths[-1]))
                out.append((paths[:-1], dest, flags))
    return out


def _dockerignore_patterns() -> list[tuple[re.Pattern, bool]]:
    """``.dockerignore`` as (regex, is_exception) in order, with Docker's (moby patternmatcher) syntax."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(f"^{regex}$"), negate))
    return rules


def _ignored(relpath: str, rules=None) -> bool:
    """Whether Docker leaves ``relpath`` out of the build context: the last pattern matching it or a parent wins."""
    rules = rules if rules is not None else _dockerignore_patterns()
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for regex, negate in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def _files_under(path: Path) -> list[Path]:
    return (
        [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        if path.is_dir()
        else [path]
    )


# -- lint ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [MAIN, MLFLOW], ids=["image", "mlflow"])
def test_dockerfile_is_hadolint_clean(dockerfile):
    """Check that hadolint reports nothing (ignores are inline, with their reason, in the Dockerfile)."""
    res = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfiles_pass_checkov():
    """Check that checkov's Dockerfile policies (non-root USER, HEALTHCHECK, no curl|sh, ...) all pass."""
    res = subprocess.run(
        [_tool("checkov"), "--framework", "dockerfile", "--skip-download", "--quiet", "--compact", "-o", "json",
         "-f", str(MAIN), "-f", str(MLFLOW)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    reports = json.loads(res.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['file_path']}:{c['file_line_range']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(script):
    """Check that the image and CI shell scripts exist and pass shellcheck."""
    assert script.exists(), script
    res = subprocess.run([_tool("shellcheck"), str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- build context ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [MAIN, MLFLOW], ids=["image", "mlflow"])
def test_every_copy_source_exists_in_the_build_context(dockerfile):
    """Check that each COPY source (not from another stage) exists and, for the main image, passes .dockerignore."""
    context = CONTEXTS[dockerfile]
    rules = _dockerignore_patterns() if context == REPO else []
    copies = [c for c in _copies(dockerfile) if "from" not in c[2]]
    assert copies
    for sources, _, _ in copies:
        for src in sources:
            path = context / src
            assert path.exists(), f"{dockerfile.relative_to(REPO)}: COPY source {src} missing from {context}"
            for f in _files_under(path):
                rel = f.relative_to(context).as_posix()
                if rules and not _ignored(rel, rules):
                    continue
                if rules:
                    # Only generated files may be ignored inside an allowed folder.
                    assert f.suffix in {".pyc", ".parquet", ".npy"} or ".egg-info" in rel, (
                        f"{rel} is copied by {dockerfile.name} but .dockerignore leaves it out"
                    )


@pytest.mark.parametrize(
    "path, ignored",
    [
        ("pyproject.toml", False),
        ("qsmrim/cli.py", False),
        ("platform/experiments/paper.yaml", False),
        ("infra/docker/healthcheck.py", False),
        (".venv/bin/python", True),
        (".venv-tools/bin/checkov", True),
        ("runs/demo/patches.npy", True),
        ("mlruns.db", True),
        ("mlartifacts/1/model.onnx", True),
        ("infra/mlflow/.env", True),
        ("tests/test_infra_docker.py", True),
        (".git/HEAD", True),
        ("qsmrim/__pycache__/cli.cpython-311.pyc", True),
        ("qsmrim/data/cohort/sub-01_Chimap.nii.gz", True),
    ],
)
def test_dockerignore_lets_through_only_what_the_image_needs(path, ignored):
    """Check the allow-list: sources in, local data, stores, environments, secrets and tests out."""
    assert _ignored(path) is ignored


# -- commands -----------------------------------------------------------------------------------------------


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    return _stages(dockerfile)[-1]


def _last(stage: list[tuple[str, str]], word: str) -> str:
    values = [args for w, args in stage if w == word]
    assert values, f"no {word} in the final stage"
    return values[-1]


def test_image_default_command_is_a_real_qsmrim_subcommand():
    """Check that CMD runs the ``qsmrim`` console script with a subcommand and flags it accepts."""
    cmd = _exec_form(_last(_final_stage(MAIN), "CMD"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD runs {cmd[0]!r}, not a [project.scripts] entry"
    res = subprocess.run(
        [sys.executable, "-m", "qsmrim", cmd[1], "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, (
        f"`qsmrim {cmd[1]} --help` failed (is the subcommand written yet?):\n{res.stderr}"
    )
    for flag in (t for t in cmd[2:] if t.startswith("--")):
        assert flag in res.stdout, f"`qsmrim {cmd[1]}` has no {flag}"
    port = cmd[cmd.index("--port") + 1]
    assert port in _last(_final_stage(MAIN), "EXPOSE").split()


def test_image_healthcheck_runs_the_copied_script_against_the_serve_port():
    """Check that HEALTHCHECK runs a file the image copies, which probes /healthz on the CMD's port."""
    stage = _final_stage(MAIN)
    check = _exec_form(_last(stage, "HEALTHCHECK").split(" CMD ", 1)[1])
    script = next(t for t in check if t.endswith(".py"))
    copied = {dest: srcs for srcs, dest, flags in _copies(MAIN) if "from" not in flags}
    assert script in copied, f"HEALTHCHECK runs {script}, which no COPY puts there"
    source = REPO / copied[script][0]
    text = source.read_text()
    assert '"http://127.0.0.1:8000/healthz"' in text
    assert "8000" in _exec_form(_last(stage, "CMD"))


def test_image_build_steps_refer_to_existing_things():
    """Check the RUN steps: the lock they install is copied, the modules they import exist, tini is installed."""
    build, runtime = _stages(MAIN)
    runs = " ".join(args for w, args in build if w == "RUN")
    copied = {dest for _, dest, _ in _copies(MAIN)}
    for path in re.findall(r"(/tmp/\S+|/src\S*)", runs):
        assert any(path == d or path.startswith(d + "/") for d in copied), f"RUN uses {path}, never copied"
    imports = re.search(r"import ([\w., ]+);", runs).group(1)
    for module in (m.strip() for m in imports.split(",")):
        rel = module.replace(".", "/")
        assert (REPO / f"{rel}.py").exists() or (REPO / rel / "__init__.py").exists(), module
    entrypoint = _exec_form(_last(runtime, "ENTRYPOINT"))
    assert entrypoint[0] == "/usr/bin/tini"
    assert re.search(r"apt-get install [^&]*\btini\b", " ".join(a for w, a in runtime if w == "RUN"))
    assert any(src == ["/opt/venv"] and flags.get("from") == "build" for src, _, flags in _copies(MAIN))


@pytest.mark.parametrize("dockerfile", [MAIN, MLFLOW], ids=["image", "mlflow"])
def test_images_run_as_the_non_root_user_they_create(dockerfile):
    """Check that the final USER is a numeric non-root uid that the Dockerfile itself creates."""
    stage = _final_stage(dockerfile)
    user = _last(stage, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, (
        f"USER {user}: use a numeric uid >= 10000 (Kubernetes runAsUser)"
    )
    runs = " ".join(a for w, a in stage if w == "RUN")
    assert f"useradd --uid {uid}" in runs


def test_mlflow_image_entrypoint_is_the_tested_script():
    """Check that the MLflow image's ENTRYPOINT is infra/mlflow/entrypoint.sh, the script the server test runs."""
    entrypoint = _exec_form(_last(_final_stage(MLFLOW), "ENTRYPOINT"))[0]
    copied = {dest: srcs for srcs, dest, _ in _copies(MLFLOW)}
    assert copied[entrypoint] == ["entrypoint.sh"]


# -- pins ---------------------------------------------------------------------------------------------------


def _lock(path: Path) -> dict[str, str]:
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", text, flags=re.M))
    blocks = re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", text.split("\n", 2)[-1])
    unhashed = [b.split("==")[0] for b in blocks if "==" in b and "--hash=sha256:" not in b]
    assert not unhashed, f"{path.name}: pins without hashes: {unhashed}"
    return {canonicalize_name(k): v for k, v in pins.items()}


def test_image_lock_pins_every_project_dependency():
    """Check that requirements.lock pins each pyproject dependency at a version its specifier allows."""
    lock = _lock(REPO / "infra" / "docker" / "requirements.lock")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    regenerate = (REPO / "infra" / "docker" / "requirements.in").read_text().split("\n")[2:5]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in lock, (
            f"{dep.name} is not in infra/docker/requirements.lock; regenerate it:\n" + "\n".join(regenerate)
        )
        assert dep.specifier.contains(lock[name], prereleases=True), f"{dep}: lock has {lock[name]}"


def test_image_torch_pin_matches_the_makefile():
    """Check that the image installs the torch the Makefile installs (TORCH_SPEC)."""
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    assert _lock(REPO / "infra" / "docker" / "requirements.lock")["torch"] == spec
    assert f"torch=={spec}" in (REPO / "infra" / "docker" / "requirements.in").read_text()


def test_mlflow_image_lock_pins_server_auth_and_driver():
    """Check that the MLflow image pins mlflow, its auth extra's Flask-WTF and the PostgreSQL driver."""
    lock = _lock(REPO / "infra" / "mlflow" / "requirements.lock")
    wanted = re.search(
        r"^mlflow\[auth\]==(\S+)", (REPO / "infra/mlflow/requirements.in").read_text(), re.M
    ).group(1)
    assert lock["mlflow"] == wanted
    assert {"psycopg2-binary", "flask-wtf", "boto3"} <= set(lock)


# -- healthcheck script ---------------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, rc", [(200, 0), (503, 1)])
def test_healthcheck_script_follows_the_healthz_status(health_server, status, rc):
    """Check that the HEALTHCHECK script exits 0 on 200 and 1 on a 503 from /healthz."""
    _Health.status = status
    url = f"http://127.0.0.1:{health_server.server_address[1]}/healthz"
    env = {**os.environ, "QSMRIM_HEALTHCHECK_URL": url}
    res = subprocess.run(
        [sys.executable, REPO / "infra/docker/healthcheck.py"], env=env, capture_output=True, timeout=30
    )
    assert res.returncode == rc, res.stderr


def test_healthcheck_script_fails_when_nothing_listens(health_server):
    """Check that a refused connection is unhealthy, not an exception."""
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    env = {
        **os.environ,
        "QSMRIM_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/healthz",
        "QSMRIM_HEALTHCHECK_TIMEOUT": "2",
    }
    res = subprocess.run(
        [sys.executable, REPO / "infra/docker/healthcheck.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "unhealthy" in res.stderr

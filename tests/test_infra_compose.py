"""The MLflow docker compose file (``infra/mlflow/compose.yaml``), checked without a Docker engine.

The dev machine and CI have the docker client only, without the compose plugin, so ``docker compose
config`` cannot run: the file is interpolated here the way compose does it (``${VAR}``, ``${VAR:-default}``,
``${VAR:?error}``, ``$$``) with the values of ``.env.example`` and validated against the Compose
Specification's JSON schema (vendored, ``infra/mlflow/schema/``). The server it starts is the one
tests/test_infra_mlflow.py runs for real.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MLFLOW = REPO / "infra" / "mlflow"
COMPOSE = MLFLOW / "compose.yaml"
_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (MLFLOW / ".env.example").read_text().splitlines())
    return {k.strip(): v.strip() for k, v in (p for p in pairs if len(p) == 2 and not p[0].startswith("#"))}


def _interpolate(node, env: dict[str, str]):
    """Compose's variable substitution on every string of the parsed file."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", "-") and not value:
            return arg
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        if value is None:
            raise KeyError(f"{name} is unset and has no default")
        return value

    return _VAR.sub(sub, node)


def _variables() -> dict[str, set[str | None]]:
    """Each variable compose.yaml uses, with the operators it is used with (None for a plain ``${VAR}``)."""
    out: dict[str, set[str | None]] = {}
    for m in _VAR.finditer(COMPOSE.read_text()):
        if m.group("name"):
            out.setdefault(m.group("name"), set()).add(m.group("op"))
    return out


def test_compose_file_is_valid_against_the_compose_spec():
    """Check compose.yaml, interpolated with .env.example, against the Compose Specification schema."""
    schema = json.loads((MLFLOW / "schema" / "compose-spec.json").read_text())
    config = _interpolate(yaml.safe_load(COMPOSE.read_text()), _env_example())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(config))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_refuses_to_start_without_the_secrets():
    """Check that each secret is required (``${VAR:?...}``): with no .env, interpolation fails on it."""
    required = {name for name, ops in _variables().items() if ":?" in ops}
    assert {"POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= required
    with pytest.raises(KeyError, match="set .* in infra/mlflow/.env"):
        _interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def test_env_example_covers_every_variable_and_holds_no_secret():
    """Check that .env.example names every variable compose.yaml uses without a default, and no real secret."""
    example = _env_example()
    missing = [n for n, ops in _variables().items() if ops - {":-", "-"} and n not in example]
    assert not missing, f"add to infra/mlflow/.env.example: {missing}"
    unused = [n for n in example if n not in _variables()]
    assert not unused, f"unused in compose.yaml: {unused}"
    for name in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert example[name] == "replace-me", name


def test_real_env_file_is_git_ignored():
    """Check that infra/mlflow/.env, where the real secrets go, can never be committed."""
    res = subprocess.run(["git", "check-ignore", "-q", "infra/mlflow/.env"], cwd=REPO)
    assert res.returncode == 0


def test_compose_wires_the_server_to_its_database_and_artifact_volume():
    """Check the wiring: DB names match the init script, artifacts on a volume, server on loopback by default."""
    config = _interpolate(yaml.safe_load(COMPOSE.read_text()), _env_example())
    pg, server = config["services"]["postgres"], config["services"]["mlflow"]
    env = server["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith(f"@postgres:5432/{pg['environment']['POSTGRES_DB']}")
    auth_db = env["MLFLOW_AUTH_DATABASE_URI"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {auth_db} " in (MLFLOW / "initdb" / "10-create-auth-db.sh").read_text()
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    assert f"mlartifacts:{env['MLFLOW_ARTIFACTS_DESTINATION']}" in server["volumes"]
    assert "ports" not in pg, "PostgreSQL must not be published"
    assert config["networks"]["backend"]["internal"] is True
    assert server["ports"][0].startswith("127.0.0.1:"), "publish on loopback unless a TLS proxy is in front"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["read_only"] is True and server["cap_drop"] == ["ALL"]


def test_compose_feeds_only_variables_the_server_reads():
    """Check each MLFLOW_* variable of the mlflow service is read by entrypoint.sh or by MLflow itself."""
    import mlflow.environment_variables as mlflow_env

    script = (MLFLOW / "entrypoint.sh").read_text()
    service = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    for name in service["environment"]:
        assert name in script or hasattr(mlflow_env, name), name
    version = re.search(r"^mlflow\[auth\]==(\S+)", (MLFLOW / "requirements.in").read_text(), re.M).group(1)
    assert service["image"] == f"qsmrim-mlflow:{version}"
    assert (MLFLOW / service["build"]["context"] / "Dockerfile").exists()

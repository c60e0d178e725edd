#!/bin/sh
# Start the MLflow tracking server on a PostgreSQL backend store with a served artifact store.
#
# One script for the docker compose service, a VM and the test suite (tests/test_infra_mlflow.py runs
# exactly this file), so what CI checks is what a lab runs. Configuration is environment only; no
# secret is ever written to the repository:
#
#   MLFLOW_BACKEND_STORE_URI      required  postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  required  /srv/mlartifacts, s3://bucket/prefix, gs://..., ...
#   MLFLOW_AUTH_DATABASE_URI      optional  postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow_auth;
#                                           when set, the basic-auth app is enabled, and then
#                                           MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY
#                                           are required too (MLflow reads them itself)
#   MLFLOW_AUTH_DEFAULT_PERMISSION optional  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_AUTH_CACHE_TTL_SECONDS optional  seconds a verified password is cached per worker, default 60
#                                           (PBKDF2 costs ~1 s per request on a busy 2-core box; 0 = off,
#                                           at the price of that cost on every request)
#   MLFLOW_HOST / MLFLOW_PORT     optional  bind address, default 127.0.0.1:5000 (compose sets 0.0.0.0)
#   MLFLOW_WORKERS                optional  server worker processes, default 2
#
# Each of MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_DATABASE_URI, MLFLOW_AUTH_ADMIN_PASSWORD and
# MLFLOW_FLASK_SERVER_SECRET_KEY may instead be given as <NAME>_FILE, a file holding the value (docker
# secrets, Kubernetes secret volumes), so no password has to sit in the process environment of a pod spec.
#
# Extra arguments are passed on to `mlflow server` (e.g. --allowed-hosts, --expose-prometheus).
set -eu

for name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    eval "file=\${${name}_FILE:-}"
    if [ -n "$file" ]; then
        if [ ! -r "$file" ]; then
            echo "entrypoint.sh: ${name}_FILE=$file is not a readable file" >&2
            exit 2
        fi
        value=$(cat "$file")
        export "$name=$value"
    fi
done

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI to postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION to a directory or object-store URI}"

case "$MLFLOW_BACKEND_STORE_URI" in
    postgresql://* | postgresql+*://*) ;;
    *)
        echo "entrypoint.sh: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (the registry needs a" \
            "database that several workers can share; sqlite is for a laptop only)" >&2
        exit 2
        ;;
esac

# MLflow 3 starts a server-side job runner (GenAI judges and the like) by default; this server only
# tracks runs and holds the registry, so it stays off unless asked for.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION

set -- --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" "$@"

if [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]; then
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?basic-auth needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin user is created with it on first start)}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"
    # MLflow reads the auth database URI from an ini file only: write it at start, readable by us alone.
    MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-auth-$$/basic_auth.ini}"
    export MLFLOW_AUTH_CONFIG_PATH
    umask 077
    mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
    cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
EOF
    set -- "$@" --app-name basic-auth
fi

exec mlflow server "$@"

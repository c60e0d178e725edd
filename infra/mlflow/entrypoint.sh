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
# Secrets never reach a command line (where `ps` shows them to every local user): `mlflow server` reads the
# backend store URI from MLFLOW_BACKEND_STORE_URI itself. Placeholder or short passwords (replace-me,
# changeme, password, ... or under 12 characters) in either database URI, MLFLOW_AUTH_ADMIN_PASSWORD or
# MLFLOW_FLASK_SERVER_SECRET_KEY are refused before anything starts.
#
# Extra arguments are passed on to `mlflow server` (e.g. --allowed-hosts, --expose-prometheus).
set -eu

MIN_SECRET_CHARS=12

# refuse_placeholder NAME VALUE: exit 2 naming NAME (never echoing VALUE) when VALUE is a placeholder.
refuse_placeholder() {
    lowered=$(printf '%s' "$2" | tr '[:upper:]' '[:lower:]')
    case "$lowered" in
        *replace*me* | *change*me* | *changeit* | password | passw0rd | secret | mlflow | postgres | admin | \
            example | test | xxx* | "<"*">" | "\${"*"}" | todo | none | null)
            echo "entrypoint.sh: $1 holds a placeholder password; set a real secret, e.g." \
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'" >&2
            exit 2
            ;;
    esac
    if [ "${#2}" -lt "$MIN_SECRET_CHARS" ]; then
        echo "entrypoint.sh: $1 holds a password of ${#2} characters; use at least $MIN_SECRET_CHARS, e.g." \
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'" >&2
        exit 2
    fi
}

# uri_password URI: the password of scheme://user:password@host/..., empty when the URI carries none.
uri_password() {
    rest=${1#*://}
    case "$rest" in
        *@*) userinfo=${rest%%@*} ;;
        *) return 0 ;;
    esac
    case "$userinfo" in
        *:*) printf '%s' "${userinfo#*:}" ;;
    esac
}

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

for name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI; do
    eval "uri=\${${name}:-}"
    password=$(uri_password "$uri")
    if [ -n "$uri" ] && [ -n "$password" ]; then
        refuse_placeholder "the password in $name" "$password"
    fi
done
export MLFLOW_BACKEND_STORE_URI

# MLflow 3 starts a server-side job runner (GenAI judges and the like) by default; this server only
# tracks runs and holds the registry, so it stays off unless asked for.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION

set -- --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" "$@"

if [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]; then
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?basic-auth needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin user is created with it on first start)}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"
    refuse_placeholder MLFLOW_AUTH_ADMIN_PASSWORD "$MLFLOW_AUTH_ADMIN_PASSWORD"
    refuse_placeholder MLFLOW_FLASK_SERVER_SECRET_KEY "$MLFLOW_FLASK_SERVER_SECRET_KEY"
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

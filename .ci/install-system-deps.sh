#!/usr/bin/env bash
# What the infra tests need beyond `pip install -e ".[test]"`; idempotent, quick when already done.
#   1. PostgreSQL server binaries (Debian's `postgresql` package): tests/test_infra_mlflow.py starts a
#      throwaway server from /usr/lib/postgresql/*/bin (initdb + postgres, run as user `postgres` when
#      the tests run as root).
#   2. headless Chromium (Debian's `chromium-headless-shell`): tests/test_review_browser.py renders the CV
#      report and a review page offline and checks every image loads and nothing is fetched.
#   3. checkov in its own virtual environment, .venv-tools/: it pins packaging<24, networkx 2.x and other
#      old versions that would downgrade the project's .venv. tests/test_infra_*.py look for it there.
# Usage: .ci/install-system-deps.sh            (root, or a user with passwordless sudo, for steps 1 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo -n"
    fi
    echo "installing PostgreSQL server (apt-get install postgresql)"
    # Only the binaries are wanted: no default cluster started as a system service on port 5432.
    $SUDO mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/qsmrim-ci.conf >/dev/null
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

if ! command -v chromium-headless-shell >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo -n"
    fi
    echo "installing headless Chromium (apt-get install chromium-headless-shell)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null
fi

if [ ! -x .venv-tools/bin/checkov ] || ! .venv-tools/bin/checkov --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    echo "installing checkov $CHECKOV_VERSION into .venv-tools"
    "$PYTHON" -m venv .venv-tools
    .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

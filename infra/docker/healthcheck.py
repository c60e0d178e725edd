"""Container HEALTHCHECK for the serving role: exit 0 when ``GET /healthz`` answers 200, else 1.

Standard library only, so the image needs no curl. ``QSMRIM_HEALTHCHECK_URL`` overrides the URL (default
``http://127.0.0.1:8000/healthz``, the Ray Serve HTTP proxy inside the container) and
``QSMRIM_HEALTHCHECK_TIMEOUT`` the timeout in seconds (default 4, below the HEALTHCHECK's 5 s).
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/healthz"


def main() -> int:
    url = os.environ.get("QSMRIM_HEALTHCHECK_URL") or DEFAULT_URL
    timeout = float(os.environ.get("QSMRIM_HEALTHCHECK_TIMEOUT") or 4)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Container healthcheck: exit 0 when the API answers GET /readyz with 200, else 1.

Docker runs this inside the API container (HEALTHCHECK), so it needs nothing beyond the
standard library. /readyz answers 503 until the model and indexes are loaded and stays 200
when only Redis is down (the service is degraded but still searches), which is what
`depends_on: condition: service_healthy` and the nginx upstream should wait for.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def readiness_url() -> str:
    """The URL to probe: CAMPSEARCH_HEALTHCHECK_URL, else /readyz on CAMPSEARCH_PORT locally."""
    explicit = os.environ.get("CAMPSEARCH_HEALTHCHECK_URL")
    if explicit:
        return explicit
    port = os.environ.get("CAMPSEARCH_PORT", "8000")
    return f"http://127.0.0.1:{port}/readyz"


def main() -> int:
    url = readiness_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url} unreachable: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

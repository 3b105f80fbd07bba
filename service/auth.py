"""API keys for writes: `X-API-Key`, compared in constant time, never logged.

With no keys configured, writes are anonymous (and `Settings` only allows that on a loopback
bind unless the operator opts in). With keys, a write without a key or with a wrong one is
refused with 401 before any work is done.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from service.errors import FieldProblem, ProblemError

API_KEY_HEADER = "X-API-Key"


def key_matches(presented: str, keys: Sequence[SecretStr]) -> bool:
    """True when `presented` equals one of `keys`.

    Every key is compared (no early exit) with `hmac.compare_digest`, so the time taken says
    nothing about which key or how many leading characters matched.
    """
    candidate = presented.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.get_secret_value().encode("utf-8"))
    return matched


def check_write_key(presented: str | None, keys: Sequence[SecretStr]) -> None:
    """Raise a 401 problem unless writes are open (no keys) or `presented` is a valid key."""
    if not keys:
        return
    if not presented:
        reason = f"writes need an API key in the {API_KEY_HEADER} header"
    elif not key_matches(presented, keys):
        reason = "the API key is not valid"
    else:
        return
    raise ProblemError(
        401,
        "Unauthorized",
        reason,
        errors=[FieldProblem(f"header.{API_KEY_HEADER}", reason)],
        headers={"WWW-Authenticate": API_KEY_HEADER},
    )

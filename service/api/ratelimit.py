"""Rate limiting per API key or client address: fixed windows, shared through Redis.

Every `/v1/...` request counts against the client's `requests` budget, and writes (POST or
DELETE of images and captions) also against its `writes` budget, per window of
`rate_limit_window_s`. Past a budget the answer is 429 problem+json with `Retry-After` (the
seconds until the window ends). Health, readiness, metrics and the web UI are never limited.

A client is its API key when it presents a valid one (the key is hashed before it becomes a
counter name, so it never reaches Redis or a log), otherwise its address. Behind a reverse
proxy the address is the proxy's unless uvicorn trusts its forwarded headers
(`--forwarded-allow-ips`).

With `CAMPSEARCH_REDIS_URL` set, the counters live in Redis (INCR + EXPIRE in one MULTI), so
every replica draws on the same budget. When Redis does not answer, the limiter fails open to
in-process counters (one budget per replica), logs it, and tries Redis again after
`REDIS_RETRY_AFTER_S`: a dead Redis never turns into refused requests.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import RedisClusterException, RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import key_matches
from service.api.errors import problem_response

logger = logging.getLogger(__name__)

KEY_PREFIX = "campsearch:ratelimit"
REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_AFTER_S = 1.0  # after a Redis failure, count in-process this long before retrying
LOG_EVERY_S = 30.0  # at most one "Redis is down" line per this many seconds
MAX_LOCAL_COUNTERS = 100_000  # in-process counters kept before older windows are dropped
LIMITED_PREFIX = "/v1/"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ONLY_POSTS = ("/v1/search/",)  # POSTs that only read (search bodies)

REQUESTS = "requests"
WRITES = "writes"


@dataclass(frozen=True)
class Decision:
    """Whether a request may go on; when not, which budget ran out and for how long."""

    allowed: bool
    bucket: str = ""
    limit: int = 0
    retry_after_s: int = 0


class LocalCounters:
    """Fixed-window counts in this process (one replica's view)."""

    def __init__(self, max_counters: int = MAX_LOCAL_COUNTERS) -> None:
        self.max_counters = max_counters
        self._counts: dict[str, tuple[int, int]] = {}  # name -> (window index, count)

    def hit(self, name: str, window: int) -> int:
        seen_window, count = self._counts.get(name, (window, 0))
        count = count + 1 if seen_window == window else 1
        if name not in self._counts and len(self._counts) >= self.max_counters:
            self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
            if len(self._counts) >= self.max_counters:  # a flood of clients in one window
                self._counts.clear()
        self._counts[name] = (window, count)
        return count


class RateLimiter:
    """Counts requests per (budget, client, window); Redis when configured, else in-process."""

    def __init__(
        self,
        *,
        window_s: int,
        limits: Mapping[str, int],
        redis_url: str | None = None,
        redis_cluster: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`redis_cluster`: `redis_url` names a node of a Redis Cluster. A counter's INCR and
        EXPIRE touch one key, so one slot: the transaction works there as on one Redis."""
        self.window_s = window_s
        self.limits = {bucket: limit for bucket, limit in limits.items() if limit > 0}
        self.clock = clock
        self.local = LocalCounters()
        client_class = aioredis.RedisCluster if redis_cluster else aioredis.Redis
        self._redis = (
            client_class.from_url(
                redis_url,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            if redis_url
            else None
        )
        self._redis_down_until = 0.0
        self._last_log = -math.inf

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    async def check(self, identity: str, *, write: bool) -> Decision:
        """Count one request of `identity`; refuse it when a budget of this window is spent."""
        now = self.clock()
        window = int(now // self.window_s)
        retry_after_s = max(1, math.ceil((window + 1) * self.window_s - now))
        buckets = [REQUESTS, WRITES] if write else [REQUESTS]
        for bucket in buckets:
            limit = self.limits.get(bucket)
            if limit is None:
                continue
            count = await self._hit(f"{KEY_PREFIX}:{bucket}:{identity}:{window}", window, now)
            if count > limit:
                return Decision(False, bucket, limit, retry_after_s)
        return Decision(True)

    async def _hit(self, name: str, window: int, now: float) -> int:
        if self._redis is None or now < self._redis_down_until:
            return self.local.hit(name, window)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.expire(name, self.window_s + 1)
                count, _ = await pipe.execute()
            return int(count)
        except (RedisError, RedisClusterException, OSError) as error:
            self._redis_down_until = now + REDIS_RETRY_AFTER_S
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                logger.warning(
                    "rate limiting in-process (per replica): Redis does not answer (%s)",
                    type(error).__name__,
                )
            return self.local.hit(name, window)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def client_identity(scope: Scope, api_keys: Sequence[SecretStr]) -> str:
    """`key:<hash>` for a valid API key, else `addr:<client address>`.

    An invalid key does not get a budget of its own, or a client could mint fresh budgets by
    sending random keys.
    """
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            presented = value.decode("latin-1")
            if api_keys and key_matches(presented, api_keys):
                digest = hashlib.sha256(value).hexdigest()[:32]
                return f"key:{digest}"
            break
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


def is_write(method: str, path: str) -> bool:
    return method in WRITE_METHODS and not path.startswith(READ_ONLY_POSTS)


class RateLimit:
    """ASGI middleware: 429 + Retry-After once a client spends a budget of its window."""

    def __init__(
        self, app: ASGIApp, *, limiter: RateLimiter, api_keys: Sequence[SecretStr]
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.api_keys = list(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not self.limiter.enabled
            or not path.startswith(LIMITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        identity = client_identity(scope, self.api_keys)
        decision = await self.limiter.check(identity, write=is_write(method, path))
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        noun = "writes" if decision.bucket == WRITES else "requests"
        detail = (
            f"more than {decision.limit} {noun} in {self.limiter.window_s} s from this client; "
            f"retry after {decision.retry_after_s} s"
        )
        response = problem_response(
            429,
            "Too many requests",
            detail,
            headers={"Retry-After": str(decision.retry_after_s)},
            instance=path,
        )
        await response(scope, receive, send)

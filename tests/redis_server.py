"""A real `redis-server` for tests: own port, own temp folder, no persistence; killable.

Tests never use a system Redis: each server is started here on a free port and can be killed
(SIGKILL, like a crash) and restarted on the same port to test recovery.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import redis
from redis.cluster import RedisCluster

START_TIMEOUT_S = 10.0


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are chosen, because the
    kernel may hand a just-closed port out again (a node's bus port equal to its own port)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


class RedisServer:
    """One redis-server process; `url` stays the same across `kill` and `start`."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        cluster: bool = False,
        cluster_port: int | None = None,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if port is None:
            port, chosen_bus_port = free_ports(2)
            cluster_port = cluster_port or chosen_bus_port
        self.port = port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # A cluster node's bus port: given, since port + 10000 may be past 65535.
        self.cluster_port = (cluster_port or free_ports(1)[0]) if cluster else None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                *self._cluster_arguments(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log_file = self.workdir / "redis.log"
                    log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                    message = f"redis-server did not start on {self.port}:\n{log}"
                    raise RuntimeError(message) from error
                time.sleep(0.02)
        client.close()
        return self

    def _cluster_arguments(self) -> list[str]:
        if self.cluster_port is None:
            return []
        return [
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.cluster_port),
            "--cluster-config-file", str(self.workdir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def keys(self, pattern: str) -> list[bytes]:
        with self.client() as client:
            return sorted(client.keys(pattern))

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def redis_cli_binary() -> str | None:
    return shutil.which("redis-cli")


class RedisClusterServers:
    """A real 3-node Redis Cluster (masters only): `redis-server --cluster-enabled yes` on free
    ports, joined by `redis-cli --cluster create`. `url` names one node, as an operator gives
    CAMPSEARCH_REDIS_URL; `kill` and `start` take every node down and back (each keeps its
    nodes.conf, so the cluster re-forms with its slots; the data is gone, as with no
    persistence)."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.workdir = Path(workdir)
        ports = free_ports(2 * nodes)  # every node's port and bus port, all distinct
        self.servers = [
            RedisServer(
                self.workdir / f"node{index}",
                ports[2 * index],
                cluster=True,
                cluster_port=ports[2 * index + 1],
            )
            for index in range(nodes)
        ]
        self.url = self.servers[0].url
        self._created = False

    def start(self) -> RedisClusterServers:
        for server in self.servers:
            server.start()
        if not self._created:
            cli = redis_cli_binary()
            if cli is None:
                raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
            addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._created = True
        self._wait_cluster_ok()
        return self

    def _wait_cluster_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S * 3
        while True:
            states = []
            for server in self.servers:
                with server.client() as client:
                    states.append(client.cluster("INFO").get("cluster_state") == "ok")
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not become ok: {states}")
            time.sleep(0.05)

    def kill(self) -> None:
        for server in self.servers:
            server.kill()

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url)

    def keys(self, pattern: str) -> list[bytes]:
        """Every node's keys that match (KEYS through a cluster client asks one node)."""
        return sorted(key for server in self.servers for key in server.keys(pattern))

    def node_of(self, key: str) -> int:
        """Index of the node that holds `key`'s slot."""
        with self.client() as client:
            node = client.get_node_from_key(key)
        return next(i for i, server in enumerate(self.servers) if server.port == node.port)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

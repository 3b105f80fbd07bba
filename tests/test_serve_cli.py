"""`camp-search serve` on a port it cannot have: one line that says which setting moves it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from redis_server import free_port

CAMP_SEARCH = Path(sys.executable).parent / "camp-search"
START_TIMEOUT_S = 120


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")},
        "CAMPSEARCH_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "80",  # a narrow terminal: the message must still be one line
        **env,
    }
    return subprocess.run(
        [str(CAMP_SEARCH), "serve", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=environment,
        cwd=tmp_path,
    )


def test_a_busy_port_exits_with_one_line_naming_the_fix(tmp_path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        for result in (
            serve(tmp_path, "--port", str(port)),
            serve(tmp_path, CAMPSEARCH_PORT=str(port)),
        ):
            assert result.returncode == 1, result.stdout + result.stderr
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, result.stderr
            (message,) = lines
            assert f"port {port} on 127.0.0.1 is already in use" in message
            assert "CAMPSEARCH_PORT" in message and "--port" in message
            assert "Traceback" not in result.stdout + result.stderr
        # Nothing was loaded or created before the port was refused.
        assert not (tmp_path / "data").exists()


def test_an_address_that_is_not_ours_says_which_setting_moves_it(tmp_path) -> None:
    result = serve(tmp_path, "--host", "192.0.2.1", CAMPSEARCH_ALLOW_ANONYMOUS_WRITES="true")
    assert result.returncode == 1, result.stdout + result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "cannot listen on 192.0.2.1:8000" in message
    assert "CAMPSEARCH_HOST" in message and "--host" in message
    assert "Traceback" not in result.stderr

"""`camp-search serve`: the API and the web UI under uvicorn, on a socket bound first."""

from __future__ import annotations

import errno
import logging
import socket

import typer

from service.cli.output import console, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_serve(host: str | None, port: int | None, log_level: str) -> None:
    """Run the API and the web UI with uvicorn (one process: it owns the data directory)."""
    import uvicorn

    from service.api.app import create_app

    settings = load_settings(host=host, port=port)
    listener = bind_listener(settings.host, settings.port)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    console.print(
        f"camp-search on http://{settings.host}:{settings.port} (data in {settings.data_dir}, "
        f"cache: {'Redis' if settings.redis_url else 'in-process'}, "
        f"writes: {'API key' if settings.writes_need_key else 'open on loopback'})"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )
    with listener:
        uvicorn.Server(config).run(sockets=[listener])


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads; a port that cannot be had exits 1
    with one line that says which setting moves it (uvicorn would log a bare errno)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        console.print(f"[red]error:[/red] {_bind_problem(host, port, error)}", soft_wrap=True)
        raise typer.Exit(1) from None
    listener.set_inheritable(True)
    return listener


def _bind_problem(host: str, port: int, error: OSError) -> str:
    move = f"choose another port with CAMPSEARCH_PORT or --port (e.g. --port {port + 1})"
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use by another program; {move}"
    if error.errno == errno.EACCES:
        return f"port {port} on {host} needs more privileges than this user has; {move}"
    return (
        f"cannot listen on {host}:{port} ({error.strerror or error}); set CAMPSEARCH_HOST or "
        f"--host to an address of this machine, or {move}"
    )

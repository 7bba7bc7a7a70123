"""The gateway process: one uvicorn server, or GENQ_GATEWAY_PROCESSES of them on one socket."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn
from prometheus_client import multiprocess

from common import tracing
from common.catalog import CatalogError, CatalogSource
from common.logs import setup_logging
from common.settings import Settings
from common.webhooks import WebhookPolicy, WebhookRefused
from gateway.app import create_app
from gateway.auth import InvalidKeys, KeyRing
from gateway.drain import Drain
from gateway.metrics import MULTIPROC_DIR_VARIABLE

logger = logging.getLogger(__name__)

# Beyond GENQ_SHUTDOWN_GRACE_S, what a stopping server process may take before it is killed.
_STOP_MARGIN_S = 5


class _Server(uvicorn.Server):
    """uvicorn runs the lifespan shutdown only once every connection has closed, and streams
    and sync waits do not close by themselves: the drain starts with the signal instead."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.drain.started:
            logger.info("signal %s: draining (readyz 503, streams and waits end)", sig)
        self.drain.start()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_gateway(settings: Settings) -> None:
    """Serve the API; exits 2 if the model registry file or the API keys are invalid (or there
    are none, and anonymous access is not allowed), 0 after SIGTERM/SIGINT."""
    setup_logging(settings)
    try:
        CatalogSource(settings)
        keyring = KeyRing.from_settings(settings)
        WebhookPolicy.from_settings(settings)
    except (CatalogError, InvalidKeys, WebhookRefused) as e:
        logger.error("%s", e)
        raise SystemExit(2) from e
    if keyring.anonymous is not None:
        logger.warning(
            "GENQ_ALLOW_ANONYMOUS: every client of %s:%d is served without a key, with every "
            "scope (admin included)",
            settings.host,
            settings.port,
        )
    if settings.gateway_processes == 1:
        _serve(settings, sockets=None)
    else:
        raise SystemExit(_serve_processes(settings))


def _serve(settings: Settings, sockets: list[socket.socket] | None) -> None:
    # uvicorn re-raises the stop signal once it has shut down, to the handler it found: a
    # drained gateway then exits 0, as it does for a signal before serving starts.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    tracing.configure("genq-gateway")
    drain = Drain()
    config = uvicorn.Config(
        create_app(settings, drain),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our handlers: one log format for the whole process
        access_log=False,  # AccessLogMiddleware logs requests, with their request id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
    _Server(config, drain).run(sockets=sockets)


def _serve_process(settings: Settings, sock: socket.socket) -> None:
    """One of several server processes (spawned: a fresh interpreter, which reads the metrics
    directory from the environment before it imports prometheus-client)."""
    setup_logging(settings)
    _serve(settings, sockets=[sock])


def _serve_processes(settings: Settings) -> int:
    """GENQ_GATEWAY_PROCESSES servers sharing one listening socket, with their metrics merged
    through prometheus-client's multiprocess mode. SIGTERM or SIGINT drains them all (each as a
    single gateway drains). A server that exits by itself stops the others, and the gateway
    exits 1 for its supervisor to restart it whole: the metrics of a process that died abruptly
    cannot be trusted, nor can a half-served port."""
    directory = tempfile.mkdtemp(prefix="genq-metrics-")
    os.environ[MULTIPROC_DIR_VARIABLE] = directory
    multiprocessing.allow_connection_pickling()  # the socket goes to each child
    sock = uvicorn.Config(
        "gateway.app:create_app", host=settings.host, port=settings.port
    ).bind_socket()
    spawn = multiprocessing.get_context("spawn")
    children: list[BaseProcess] = [
        spawn.Process(target=_serve_process, args=(settings, sock), name=f"gateway-{i}")
        for i in range(settings.gateway_processes)
    ]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    for child in children:
        child.start()
    logger.info(
        "serving on %s:%d with %d processes (metrics in %s)",
        settings.host,
        settings.port,
        len(children),
        directory,
    )
    status = 0
    while not stop.is_set():
        ended = wait([c.sentinel for c in children], timeout=0.5)
        if ended and not stop.is_set():
            dead = [c for c in children if c.sentinel in ended]
            logger.error(
                "gateway process %s exited with status %s; stopping the others",
                dead[0].pid,
                dead[0].exitcode,
            )
            status = 1
            break
    _stop_all(children, settings.shutdown_grace_s + _STOP_MARGIN_S)
    for child in children:
        if child.pid is not None:
            multiprocess.mark_process_dead(child.pid, directory)  # type: ignore[no-untyped-call]
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)
    return status


def _stop_all(children: list[BaseProcess], timeout_s: float) -> None:
    for child in children:
        if child.is_alive() and child.pid is not None:
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            logger.error(
                "gateway process %s did not stop in %.0f s; killing it", child.pid, timeout_s
            )
            child.kill()
            child.join()

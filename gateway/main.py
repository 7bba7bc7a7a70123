"""The gateway process."""

from __future__ import annotations

import logging
import math
import signal
from types import FrameType

import uvicorn

from common.catalog import CatalogError, CatalogSource
from common.logs import setup_logging
from common.settings import Settings
from common.webhooks import WebhookPolicy, WebhookRefused
from gateway.app import create_app
from gateway.auth import InvalidKeys, KeyRing
from gateway.drain import Drain

logger = logging.getLogger(__name__)


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
    # uvicorn re-raises the stop signal once it has shut down, to the handler it found: a
    # drained gateway then exits 0, as it does for a signal before serving starts.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    drain = Drain()
    config = uvicorn.Config(
        create_app(settings, drain),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our handlers: one log format for the whole process
        access_log=False,  # AccessLogMiddleware logs requests, with their request id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
    _Server(config, drain).run()

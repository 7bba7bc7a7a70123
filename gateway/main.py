"""The gateway process."""

from __future__ import annotations

import logging

import uvicorn

from common.catalog import CatalogError, CatalogSource
from common.logs import setup_logging
from common.settings import Settings
from gateway.app import create_app

logger = logging.getLogger(__name__)


def run_gateway(settings: Settings) -> None:
    """Serve the API; exits 2 if the model registry file is invalid."""
    setup_logging(settings)
    try:
        CatalogSource(settings)
    except CatalogError as e:
        logger.error("%s", e)
        raise SystemExit(2) from e
    if settings.admin_token is None:
        logger.warning("GENQ_ADMIN_TOKEN is unset: the /v1/admin routes are open to every client")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our handlers: one log format for the whole process
        access_log=False,  # AccessLogMiddleware logs requests, with their request id
        timeout_graceful_shutdown=settings.worker_job_completion_wait_s,
    )

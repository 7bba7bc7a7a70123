"""The gateway process."""

from __future__ import annotations

import uvicorn

from common.logs import setup_logging
from common.settings import Settings
from gateway.app import create_app


def run_gateway(settings: Settings) -> None:
    setup_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep our handlers: one log format for the whole process
        access_log=False,  # AccessLogMiddleware logs requests, with their request id
        timeout_graceful_shutdown=settings.worker_job_completion_wait_s,
    )

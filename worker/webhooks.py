"""Delivering finished jobs to their webhooks: signed, logged, retried with backoff."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any

import httpx
from arq.worker import Retry
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import logs, tracing
from common.jobstore import JobStore
from common.schemas import Job, WebhookDelivery
from common.settings import Settings

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Genq-Signature"


def sign(secret: bytes, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of the body>`: receivers recompute it with the shared secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # No redirects: a redirect could lead a signed body outside the allow-list.
        self.http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)

    async def close(self) -> None:
        await self.http.aclose()

    async def deliver(self, job_id: str, url: str, attempt: int) -> bool:
        """One attempt, logged on the job, and a span in the job's trace; True once the
        receiver answered 2xx."""
        job = await self.store.load(job_id)
        if job is None:
            logger.warning("webhook for job %s dropped: the job expired", job_id)
            return True
        parent = (
            tracing.extract(await self.store.trace_context(job_id)) if tracing.enabled() else None
        )
        with tracing.tracer().start_as_current_span(
            "genq.webhook.deliver",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "genq.job.id": job_id,
                "genq.webhook.attempt": attempt,
                "http.request.method": "POST",
                "server.address": httpx.URL(url).host,
            },
        ) as span:
            delivery = await self._post(job, url, attempt)
            if delivery.status_code is not None:
                span.set_attribute("http.response.status_code", delivery.status_code)
            if delivery.error is not None:
                span.set_status(Status(StatusCode.ERROR, delivery.error))
        await self.store.log_delivery(job_id, delivery)
        return delivery.delivered

    async def _post(self, job: Job, url: str, attempt: int) -> WebhookDelivery:
        secret = self.settings.webhook_secret
        assert secret is not None, "the gateway accepts webhooks only with a secret"
        body = job.model_dump_json(exclude={"webhook_deliveries"}).encode()
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(secret.get_secret_value().encode(), body),
            "X-Genq-Job-Id": job.id,
            **tracing.inject(),  # the receiver may carry the trace on
        }
        status_code = None
        error = None
        try:
            resp = await self.http.post(url, content=body, headers=headers)
            status_code = resp.status_code
            if not resp.is_success:
                error = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        return WebhookDelivery(
            attempt=attempt,
            at=time.time(),
            delivered=error is None,
            status_code=status_code,
            error=error,
        )


async def deliver_webhook(ctx: dict[str, Any], job_id: str, url: str) -> str:
    """arq job: deliver, or retry after a delay that doubles with every failed attempt."""
    sender: WebhookSender = ctx["webhooks"]
    logs.current().job_id = job_id
    attempt = int(ctx["job_try"])
    if await sender.deliver(job_id, url, attempt):
        return "delivered"
    settings = sender.settings
    if attempt >= settings.webhook_max_tries:
        logger.warning("webhook for job %s failed %d times; giving up", job_id, attempt)
        return "gave up"
    raise Retry(defer=settings.webhook_retry_base_s * 2 ** (attempt - 1))

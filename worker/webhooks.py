"""Delivering finished jobs to their webhooks: checked, pinned, signed, logged, retried.

Each attempt resolves the target's host, refuses it unless every address is allowed
(`WebhookPolicy.check_addresses`), and connects to the address it checked, sending the host
name as `Host` and as the TLS server name, so that the certificate is still verified against
the name. The job's delivery log shows the receiver's status code and the attempt count; why an
attempt failed goes to this worker's log only, so that webhooks cannot probe the network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from typing import Any

import httpx
from arq.worker import Retry
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import logs, tracing
from common.jobs import WebhookDelivery
from common.jobstore import JobStore
from common.settings import Settings
from common.webhooks import (
    SIGNATURE_HEADER,
    IPAddress,
    Target,
    WebhookPolicy,
    WebhookRefused,
    sign,
)

logger = logging.getLogger(__name__)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (itself, if it is one)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # An IPv6 address may carry a zone (`fe80::1%eth0`): the address is what is checked.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _pinned(url: str, target: Target, address: IPAddress) -> tuple[httpx.URL, dict[str, str]]:
    """The URL with the checked address as its host, and the Host header it must carry."""
    parsed = httpx.URL(url)
    default = 443 if target.https else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    netloc = host if target.port == default else f"{host}:{target.port}"
    return parsed.copy_with(host=str(address)), {"host": netloc}


class WebhookSender:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.policy = WebhookPolicy.from_settings(settings)
        # No redirects: a redirect could lead a signed body outside the allow-list. No proxies
        # from the environment: a proxy would resolve the name itself, past the check; so
        # SSL_CERT_FILE is not read either, and a private CA comes from GENQ_WEBHOOK_CA_FILE.
        verify: ssl.SSLContext | bool = True
        if settings.webhook_ca_file is not None:
            verify = ssl.create_default_context(cafile=settings.webhook_ca_file)
        self.http = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=verify,
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def deliver(self, job_id: str, url: str, attempt: int) -> bool:
        """One attempt, logged on the job, and a span in the job's trace; True once the
        receiver answered 2xx."""
        job = await self.store.load(job_id)
        if job is None:
            logger.warning("webhook for job %s dropped: the job expired", job_id)
            return True
        secret = self.settings.webhook_secret
        assert secret is not None, "the gateway accepts webhooks only with a secret"
        body = job.model_dump_json(exclude={"webhook_deliveries"}).encode()
        parent = (
            tracing.extract(await self.store.trace_context(job_id)) if tracing.enabled() else None
        )
        status_code = None
        with tracing.tracer().start_as_current_span(
            "genq.webhook.deliver",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={"genq.job.id": job_id, "genq.webhook.attempt": attempt},
        ) as span:
            try:
                status_code = await self._post(
                    url, body, secret.get_secret_value().encode(), job_id
                )
                span.set_attribute("http.response.status_code", status_code)
                if not 200 <= status_code < 300:
                    logger.warning(
                        "webhook of job %s: the receiver answered %d", job_id, status_code
                    )
            except WebhookRefused as e:
                logger.warning("webhook of job %s refused: %s", job_id, e)
            except (httpx.HTTPError, OSError) as e:
                logger.warning("webhook of job %s failed: %s", job_id, type(e).__name__)
            delivered = status_code is not None and 200 <= status_code < 300
            if not delivered:
                span.set_status(Status(StatusCode.ERROR, "not delivered"))
        delivery = WebhookDelivery(
            attempt=attempt, at=time.time(), delivered=delivered, status_code=status_code
        )
        await self.store.log_delivery(job_id, delivery)
        return delivered

    async def _post(self, url: str, body: bytes, secret: bytes, job_id: str) -> int:
        target = self.policy.check_url(url)
        addresses = await resolve(target.host, target.port)
        self.policy.check_addresses(addresses)
        pinned, host = _pinned(url, target, addresses[0])
        headers = {
            **host,
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
            "X-Genq-Job-Id": job_id,
            **tracing.inject(),  # the receiver may carry the trace on
        }
        extensions = {"sni_hostname": target.host} if target.https else {}
        resp = await self.http.post(pinned, content=body, headers=headers, extensions=extensions)
        return resp.status_code


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

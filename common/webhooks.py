"""Webhook deliveries: queued by whoever finishes a job, run by the pool's workers.

Where a webhook may go is checked twice: its URL when the job is submitted (scheme, host and
port against `GENQ_WEBHOOK_ALLOWED_HOSTS`), and the addresses its host resolves to when it is
sent, by the worker, which then connects to the address it checked (so a name cannot be
rebound between the check and the connection). Loopback, private, link-local (cloud metadata
included), shared, reserved and multicast addresses are refused, unless the allow-list names
the address (or its network) itself.

Bodies are signed Stripe-style: `X-Genq-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>">`, so a receiver can refuse a delivery replayed later (`verify_signature`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from arq.connections import ArqRedis

from common import keys
from common.contract import DELIVER_WEBHOOK_FUNCTION
from common.settings import Settings

SIGNATURE_HEADER = "X-Genq-Signature"
# How old a signature a receiver should accept (the README's verification uses it).
SIGNATURE_TOLERANCE_S = 300

_DEFAULT_PORTS = {"https": 443, "http": 80}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """The target is not allowed; the message says which rule, and names the setting."""


@dataclass(frozen=True, slots=True)
class _Allowed:
    name: str | None  # a host name, or
    network: IPNetwork | None  # an address or network
    port: int | None  # None: the scheme's default; -1: any

    def matches_port(self, port: int, default: int) -> bool:
        return self.port == -1 or port == (default if self.port is None else self.port)


def _parse_entry(entry: str) -> _Allowed:
    """`name`, `name:port`, `name:*`, an address (`10.0.0.5`, `[fd00::1]:8443`) or a network
    (`10.0.0.0/24`)."""
    text, port_text = entry.strip().lower(), ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
    if port_text == "*":
        port: int | None = -1
    elif port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise WebhookRefused(f"GENQ_WEBHOOK_ALLOWED_HOSTS: bad port in {entry!r}")
        port = int(port_text)
    else:
        port = None
    try:
        return _Allowed(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        return _Allowed(host, None, port)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local (169.254.169.254, the
    cloud metadata service), shared (100.64/10), reserved, unspecified or multicast."""
    address = _unmapped(address)
    return address.is_global and not address.is_multicast


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # as in the URL, lower case, without brackets
    port: int
    https: bool


class WebhookPolicy:
    def __init__(self, allowed: list[str], *, allow_http: bool) -> None:
        self.allowed = [_parse_entry(e) for e in allowed]
        self.allow_http = allow_http

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(settings.webhook_allowed_hosts, allow_http=settings.webhook_allow_http)

    def check_url(self, url: str) -> Target:
        """The URL's target if its scheme, host and port are allowed; else `WebhookRefused`."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise WebhookRefused(f"webhook scheme {scheme!r}: use https")
        if scheme == "http" and not self.allow_http:
            raise WebhookRefused("webhooks need https (plain http: GENQ_WEBHOOK_ALLOW_HTTP)")
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError as e:
            raise WebhookRefused("webhook URL has an invalid port") from e
        default = _DEFAULT_PORTS[scheme]
        address = _address(host)
        for entry in self.allowed:
            if not entry.matches_port(port, default):
                continue
            if entry.name is not None and entry.name == host:
                return Target(host, port, scheme == "https")
            if entry.network is not None and address is not None and address in entry.network:
                return Target(host, port, scheme == "https")
        raise WebhookRefused(
            f"webhook target {host!r} port {port} is not allowed (GENQ_WEBHOOK_ALLOWED_HOSTS)"
        )

    def check_addresses(self, addresses: list[IPAddress]) -> None:
        """Refuse if any address the target resolved to is not public, unless the allow-list
        names that address (or its network) itself."""
        if not addresses:
            raise WebhookRefused("the webhook host resolves to no address")
        for address in addresses:
            plain = _unmapped(address)
            if is_public(plain) or self._named(plain):
                continue
            raise WebhookRefused(
                f"the webhook host resolves to {plain}, which is not a public address; name the "
                "address in GENQ_WEBHOOK_ALLOWED_HOSTS to allow it"
            )

    def _named(self, address: IPAddress) -> bool:
        return any(e.network is not None and address in e.network for e in self.allowed)


def _address(host: str) -> IPAddress | None:
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """`t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: float, tolerance_s: int = SIGNATURE_TOLERANCE_S
) -> bool:
    """What a receiver does: the signature matches the body and its time, and that time is
    recent (a delivery replayed later is refused). The README shows the same steps."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp = fields.get("t", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    expected = sign(secret, body, int(timestamp))
    return hmac.compare_digest(expected, f"t={timestamp},v1={fields.get('v1', '')}")


async def enqueue_delivery(redis: ArqRedis, pool: str, job_id: str, url: str) -> None:
    await redis.enqueue_job(
        DELIVER_WEBHOOK_FUNCTION,
        job_id,
        url,
        _job_id=f"webhook-{job_id}",
        _queue_name=keys.queue(pool),
    )

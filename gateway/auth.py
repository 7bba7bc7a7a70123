"""API keys: who a request comes from, what it may do, and its rate limits.

Keys come from `GENQ_API_KEYS` (or `GENQ_API_KEYS_FILE`), a JSON object mapping each key to its
owner. Only their SHA-256 digests are kept; a presented key is hashed and compared with every
digest in constant time. A key may also be given as `sha256:<hex digest>`, so that the file need
not hold the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.settings import Settings

# Shorter keys can be guessed, and their digests reversed.
MIN_KEY_CHARS = 20
_DIGEST_PREFIX = "sha256:"
_LOOPBACK_NAMES = ("localhost",)


class Scope(StrEnum):
    generate = "generate"  # submit generation requests
    read = "read"  # list models and queues (a key always reads its own jobs)
    admin = "admin"  # the /v1/admin routes, and model sources and workers in /v1/models


class KeyLimits(BaseModel):
    """Per-key overrides of the GENQ_RATE_LIMIT_* defaults; 0 turns a limit off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    concurrent: int | None = Field(None, ge=0)


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.generate, Scope.read])
    limits: KeyLimits = Field(default_factory=KeyLimits)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    concurrent: int


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from. `id` owns its jobs, idempotency keys and rate-limit counters:
    derived from the key's digest, it is stable across restarts and names no secret."""

    id: str
    name: str
    scopes: frozenset[Scope]
    limits: Limits

    def can(self, scope: Scope) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class Quota:
    """Where one of a key's limits stands after this request."""

    quota: int
    remaining: int
    reset_s: int | None  # seconds until a unit frees up; None: when one of its jobs ends


@dataclass(slots=True)
class Caller:
    """One request's principal, and what its rate limits counted (the answer's headers)."""

    principal: Principal
    quota: dict[str, Quota] = field(default_factory=dict)


class InvalidKeys(ValueError):
    """The API keys' JSON is invalid; the message names the setting."""


class NotAuthenticated(Exception):
    """No key, or a key that is not one of ours; `presented` says which."""

    def __init__(self, presented: bool) -> None:
        super().__init__("invalid API key" if presented else "missing API key")
        self.presented = presented


def _limits(spec: KeyLimits, settings: Settings) -> Limits:
    return Limits(
        requests_per_minute=_pick(
            spec.requests_per_minute, settings.rate_limit_requests_per_minute
        ),
        tokens_per_minute=_pick(spec.tokens_per_minute, settings.rate_limit_tokens_per_minute),
        concurrent=_pick(spec.concurrent, settings.rate_limit_concurrent),
    )


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


def _digest(key: str, name: str) -> bytes:
    if key.startswith(_DIGEST_PREFIX):
        try:
            digest = bytes.fromhex(key.removeprefix(_DIGEST_PREFIX))
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise InvalidKeys(f"GENQ_API_KEYS: the digest of {name!r} is not sha256:<64 hex>")
        return digest
    if len(key) < MIN_KEY_CHARS:
        raise InvalidKeys(
            f"GENQ_API_KEYS: the key of {name!r} is {len(key)} characters; keys need at least "
            f"{MIN_KEY_CHARS} (make one with `python -c 'import secrets; "
            'print("sk-" + secrets.token_urlsafe(32))\'`)'
        )
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, entries: Iterable[tuple[bytes, Principal]], anonymous: Principal | None):
        self._entries = list(entries)
        self.anonymous = anonymous

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Raises `InvalidKeys` for invalid keys, or for no keys without GENQ_ALLOW_ANONYMOUS."""
        raw = settings.api_keys.get_secret_value() if settings.api_keys else ""
        if not raw.strip():
            return cls([], _anonymous(settings))
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidKeys(f"GENQ_API_KEYS is not valid JSON: {e}") from e
        if not isinstance(parsed, dict) or not parsed:
            raise InvalidKeys('GENQ_API_KEYS must be a JSON object: {"<key>": {"name": ...}}')
        entries: list[tuple[bytes, Principal]] = []
        for key, value in parsed.items():
            try:
                spec = KeySpec.model_validate(value)
            except ValidationError as e:
                # The message never quotes the key.
                raise InvalidKeys(f"GENQ_API_KEYS entry #{len(entries) + 1}: {e}") from e
            digest = _digest(key, spec.name)
            principal = Principal(
                id="k" + digest.hex()[:24],
                name=spec.name,
                scopes=frozenset(spec.scopes),
                limits=_limits(spec.limits, settings),
            )
            entries.append((digest, principal))
        return cls(entries, None)

    def authenticate(self, key: bytes | None) -> Principal:
        """The principal of `key` (the raw header bytes), or `NotAuthenticated`."""
        if self.anonymous is not None:
            return self.anonymous
        if not key:
            raise NotAuthenticated(presented=False)
        digest = hashlib.sha256(key).digest()
        found: Principal | None = None
        for stored, principal in self._entries:
            # Every digest is compared, whatever matched: the time taken says nothing.
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise NotAuthenticated(presented=True)
        return found


def _anonymous(settings: Settings) -> Principal:
    if not settings.allow_anonymous:
        raise InvalidKeys(
            "no API keys: set GENQ_API_KEYS or GENQ_API_KEYS_FILE, or GENQ_ALLOW_ANONYMOUS=true "
            "to let every client in without a key (development only)"
        )
    if not is_loopback(settings.host) and not settings.allow_anonymous_remote:
        raise InvalidKeys(
            f"anonymous access on {settings.host} would open the API to the network: set API "
            "keys, bind 127.0.0.1, or force it with GENQ_ALLOW_ANONYMOUS_REMOTE=true"
        )
    return Principal(
        id="anonymous",
        name="anonymous",
        scopes=frozenset(Scope),
        limits=_limits(KeyLimits(), settings),
    )


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key of `Authorization: Bearer <key>` or `x-api-key: <key>`, as raw bytes: a header
    that is not ASCII is compared as it came, never decoded."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
            return value.strip()  # another scheme: an invalid key, not a missing one
    return None

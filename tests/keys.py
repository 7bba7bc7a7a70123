"""API keys of the test stacks that run with keys (the others are anonymous: `genq_env`)."""

from __future__ import annotations

from typing import Any

import orjson

OPERATOR = "sk-test-operator-0123456789abcdef"  # every scope, no rate limits
ALICE = "sk-test-alice-0123456789abcdefgh"  # generate and read
BOB = "sk-test-bob-0123456789abcdefghijk"  # generate and read
READER = "sk-test-reader-0123456789abcdefg"  # read only

ALL_SCOPES = ["generate", "read", "admin"]
UNLIMITED = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_json(limits: dict[str, Any] | None = None) -> str:
    """GENQ_API_KEYS for these keys; `limits` apply to Alice and Bob."""
    return orjson.dumps(
        {
            OPERATOR: {"name": "operator", "scopes": ALL_SCOPES, "limits": UNLIMITED},
            ALICE: {"name": "alice", "limits": limits or {}},
            BOB: {"name": "bob", "limits": limits or {}},
            READER: {"name": "reader", "scopes": ["read"]},
        }
    ).decode()

"""API keys of the test stacks that run with keys (the others are anonymous: `genq_env`)."""

from __future__ import annotations

import orjson

OPERATOR = "sk-test-operator-0123456789abcdef"  # every scope, no rate limits
ALICE = "sk-test-alice-0123456789abcdefgh"  # generate and read
BOB = "sk-test-bob-0123456789abcdefghijk"  # generate and read
READER = "sk-test-reader-0123456789abcdefg"  # read only
# Small limits, one each, so that tests of one limit do not trip another.
FEW_REQUESTS = "sk-test-few-requests-0123456789"
FEW_TOKENS = "sk-test-few-tokens-0123456789ab"
FEW_JOBS = "sk-test-few-jobs-0123456789abcd"
REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, CONCURRENT = 4, 30, 2

ALL_SCOPES = ["generate", "read", "admin"]
UNLIMITED = {"requests_per_minute": 0, "tokens_per_minute": 0, "concurrent": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_json() -> str:
    """GENQ_API_KEYS for these keys."""
    return orjson.dumps(
        {
            OPERATOR: {"name": "operator", "scopes": ALL_SCOPES, "limits": UNLIMITED},
            ALICE: {"name": "alice"},
            BOB: {"name": "bob"},
            READER: {"name": "reader", "scopes": ["read"]},
            FEW_REQUESTS: {
                "name": "few-requests",
                "limits": {"requests_per_minute": REQUESTS_PER_MINUTE},
            },
            FEW_TOKENS: {"name": "few-tokens", "limits": {"tokens_per_minute": TOKENS_PER_MINUTE}},
            FEW_JOBS: {"name": "few-jobs", "limits": {"concurrent": CONCURRENT}},
        }
    ).decode()

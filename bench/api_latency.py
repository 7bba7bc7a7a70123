"""Single-request latency and tokens/s through the HTTP API of a running genq stack.

    python -m bench.api_latency [--url http://127.0.0.1:8000] [--requests 10] [--json]

Requests go one at a time (no concurrency), so the figures are what one user sees on an idle
stack: end-to-end latency of `POST /v1/generate`, and completion tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import orjson

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn.",
    "Explain what a queue is in one paragraph.",
    "List three fruits and their colours.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--api-key", help="an API key with the generate scope (none: anonymous)")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    run_id = time.time_ns()
    with httpx.Client(base_url=args.url, timeout=300, headers=headers) as client:
        # One warm-up request: the first forward pass pays for lazy initialisation.
        client.post("/v1/generate", json={"prompt": f"Hi {run_id}", "max_new_tokens": 4})
        for i in range(args.requests):
            # Numbered, so no two requests are identical: the result cache must not answer them.
            prompt = f"{PROMPTS[i % len(PROMPTS)]} ({run_id}-{i})"
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_new_tokens": args.max_new_tokens,
            }
            started = time.perf_counter()
            job = client.post("/v1/generate", json=body).json()
            latencies.append(time.perf_counter() - started)
            tokens += job["result"]["usage"]["completion_tokens"]
            ttfts.append(job["timings"]["time_to_first_token_s"])
    total = sum(latencies)
    figures = {
        "requests": args.requests,
        "completion_tokens": tokens,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
        "time_to_first_token_p50_s": round(statistics.median(ttfts), 3),
        "tokens_per_s": round(tokens / total, 1),
    }
    if args.json:
        print(orjson.dumps(figures).decode())
    else:
        for key, value in figures.items():
            print(f"{key:28} {value}")


if __name__ == "__main__":
    main()

"""vLLM's tokenizer routes, served as genq jobs: the gateway holds no tokenizer, the workers
holding the model do, and answer a job of a prompt alone (`max_new_tokens` 0) when they take
it in, without a forward pass."""

from __future__ import annotations

from redis.asyncio import Redis

from common.jobs import Job, JobResult
from gateway.auth import Caller
from gateway.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from gateway.openai.serving import OpenAIServing, native_requests
from gateway.schemas import PromptReading
from gateway.services.listing import ModelListing

# How a tokenizer request runs: its prompt read alone, ahead of generations (it costs the worker
# no forward pass), and greedy, which makes it deterministic: an identical request of the same
# key is answered by the result cache.
_PROMPT_ONLY: dict[str, object] = {"max_new_tokens": 0, "priority": "high", "temperature": 0.0}


class TokenizationServing:
    def __init__(self, openai: OpenAIServing, listing: ModelListing) -> None:
        self.openai = openai
        self.listing = listing

    async def tokenize(
        self,
        body: TokenizeCompletionRequest | TokenizeChatRequest,
        caller: Caller,
        listener: Redis,
    ) -> TokenizeResponse:
        """The prompt's token ids, or the messages' after the model's chat template, with the
        `max_model_len` of the version that encoded them."""
        job, result = await self._read(
            {**body.generation(), "return_token_ids": True}, caller, listener
        )
        tokens = result.prompt_token_ids or []
        max_model_len = await self.listing.max_model_len(job.model)
        return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens)

    async def detokenize(
        self, body: DetokenizeRequest, caller: Caller, listener: Redis
    ) -> DetokenizeResponse:
        """The text of the token ids, special tokens kept; an id outside the model's vocabulary
        fails the job (`invalid_prompt`, a 400 naming it)."""
        _, result = await self._read(body.generation(), caller, listener)
        return DetokenizeResponse(prompt=result.prompt_text or "")

    async def _read(
        self, fields: dict[str, object], caller: Caller, listener: Redis
    ) -> tuple[Job, JobResult]:
        requests = native_requests([{**fields, **_PROMPT_ONLY}], PromptReading)
        (job,), (result,) = await self.openai.run(requests, 1, caller, None, listener)
        return job, result

"""The usual first attempt at serving a model, kept as a peer for `bench.report` to measure genq
against: a plain FastAPI app whose endpoint calls `model.generate` for each request.

    python -m bench.plain_server [--model PATH] [--port 8100]

Not part of genq. It does what a tutorial does: one model, loaded at start; a synchronous
endpoint (FastAPI runs it in its thread pool, so concurrent requests call `generate` at once on
the same model, competing for the cores); no queue, no batching across requests, no streaming.
`POST /generate` takes `prompt` or `messages`, `max_new_tokens`, `temperature`, `seed` and
`ignore_eos`, and answers `{"text", "completion_tokens", "prompt_tokens"}`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from common.settings import Settings
from worker.engine.model import LoadedModel
from worker.loading import load_model


class Message(BaseModel):
    role: str
    content: str


class Request(BaseModel):
    prompt: str | None = None
    messages: list[Message] | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


class Answer(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int


def create_app(lm: LoadedModel) -> FastAPI:
    app = FastAPI(title="plain model.generate server")
    tokenizer = lm.tokenizer

    @app.post("/generate")
    def generate(request: Request) -> Answer:
        if request.messages is not None:
            text = tokenizer.apply_chat_template(
                [m.model_dump() for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tokenizer(request.prompt or "", return_tensors="pt").input_ids
        ids = ids.to(lm.device)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        options: dict[str, Any] = {"max_new_tokens": request.max_new_tokens}
        if request.ignore_eos:
            options["min_new_tokens"] = request.max_new_tokens
        if request.temperature > 0:
            options |= {"do_sample": True, "temperature": request.temperature}
        else:
            options["do_sample"] = False
        with torch.inference_mode():
            out = lm.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                **options,
            )
        new = out[0, ids.shape[1] :]
        return Answer(
            text=tokenizer.decode(new, skip_special_tokens=True),
            prompt_tokens=int(ids.shape[1]),
            completion_tokens=int(new.shape[0]),
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the default model)")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    lm = load_model(Settings(model=args.model))
    uvicorn.run(create_app(lm), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

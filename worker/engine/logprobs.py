"""Log-probabilities of tokens, as vLLM reports them by default: the raw log-softmax of the
model's logits, before the processors (penalties, biases, bans) and temperature change them.

A step's generated tokens get theirs from the logits the step samples from, in the same pass,
only for the rows that ask (`Plan.logprobs`). A prompt's tokens get theirs from a pass of the
model over the whole prompt (`score_prompt`) when the row is admitted: the batch's own pass
computes logits at each row's last position only, as the LM head over whole prompts would cost
more than the layers for every other row.

The text side turns token ids into the client's `TokenLogprob`s (`TokenTexts`), off the step's
path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from common.jobs import Logprob, TokenLogprob

# What vLLM reports for a token the model gives no chance at all (JSON has no -Infinity).
FLOOR = -9999.0
# Prompt positions whose logits are computed at once: bounds the (positions x vocab) floats.
_SCORE_CHUNK = 512
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True, slots=True)
class TokenScores:
    """One position's token, its log-probability and the likeliest tokens there (id, logprob),
    best first: what the engine hands the text side."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the log-probabilities of `logits` (rows x vocab), finite for JSON."""
    scores = torch.log_softmax(logits.float(), dim=-1)
    return scores.nan_to_num_(nan=FLOOR, neginf=FLOOR).clamp_(min=FLOOR)


def gather(scores: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenScores]:
    """Each row's entry for its token of `tokens`, with its `top` likeliest, in one transfer to
    the host per kind of number."""
    chosen = scores.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ids = tokens.tolist()
    logprobs = chosen.tolist()
    if not top:
        return [TokenScores(t, lp, ()) for t, lp in zip(ids, logprobs, strict=True)]
    best = scores.topk(min(top, scores.shape[1]), dim=-1)
    best_ids, best_logprobs = best.indices.tolist(), best.values.tolist()
    return [
        TokenScores(t, lp, tuple(zip(i, v, strict=True)))
        for t, lp, i, v in zip(ids, logprobs, best_ids, best_logprobs, strict=True)
    ]


def score_prompt(model: Any, prompt_ids: list[int], top: int) -> list[TokenScores | None]:
    """Each prompt token's entry given the tokens before it; the first has none (None). One pass
    of the decoder over the prompt, the LM head over it a chunk of positions at a time."""
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    entries: list[TokenScores | None] = [None]
    following = ids[0, 1:]
    for start in range(0, len(prompt_ids) - 1, _SCORE_CHUNK):
        stop = min(start + _SCORE_CHUNK, len(prompt_ids) - 1)
        logits = head(hidden[start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        entries += gather(log_softmax(logits), following[start:stop], top)
    return entries


class TokenTexts:
    """Token ids as the client sees them: the text of each and, where that text does not hold
    the token's exact bytes (part of a character), the bytes, worked out once per id; and a
    prompt's text."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _byte_decoder() if _is_byte_level(tokenizer) else None
        self._known: dict[int, tuple[str, list[int] | None]] = {}

    def decode(self, tokens: list[int]) -> str:
        """`tokens` as text, special tokens included."""
        return str(self._tokenizer.decode(tokens, skip_special_tokens=False))

    def of(self, token: int) -> tuple[str, list[int] | None]:
        known = self._known.get(token)
        if known is None:
            raw = self._bytes(token)
            text = raw.decode("utf-8", errors="replace")
            known = self._known[token] = (text, None if text.encode() == raw else list(raw))
        return known

    def _bytes(self, token: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        decoder = self._byte_level
        if decoder is not None and all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
        if match := _BYTE_TOKEN.match(piece):
            return bytes([int(match.group(1), 16)])
        # SentencePiece marks a leading space with U+2581.
        return str(piece).replace("\u2581", " ").encode()

    def entry(self, scores: TokenScores) -> TokenLogprob:
        text, raw = self.of(scores.token)
        return TokenLogprob(
            id=scores.token,
            token=text,
            logprob=scores.logprob,
            bytes=raw,
            top_logprobs=[self._logprob(token, logprob) for token, logprob in scores.top],
        )

    def unscored(self, token: int) -> TokenLogprob:
        """A prompt's first token, which has no log-probability."""
        text, raw = self.of(token)
        return TokenLogprob(id=token, token=text, logprob=None, bytes=raw)

    def _logprob(self, token: int, logprob: float) -> Logprob:
        text, raw = self.of(token)
        return Logprob(id=token, token=text, logprob=logprob, bytes=raw)


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's pieces spell bytes in GPT-2's printable alphabet."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet: dict[int, str] = bytes_to_unicode()  # type: ignore[no-untyped-call]
    return {char: byte for byte, char in alphabet.items()}

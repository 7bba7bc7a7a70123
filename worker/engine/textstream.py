"""Token ids -> text deltas: incremental detokenization with stop strings.

The concatenation of every delta `push` and `flush` return is the final text, by construction:
nothing emitted is ever taken back, which is what lets streamed text equal the result.

Each token is decoded with the tokenizers library's `DecodeStream` (in Rust: about a tenth of
the cost of two `decode` calls a token), which holds a token back while it ends inside a
multi-byte character, as TGI's incremental decoding does. Tokenizers without a Rust backend take
the same steps through `decode`. Either way the prompt's last tokens go through first, as vLLM
primes its streams, so that tokenizers which strip a leading space from a lone token
(SentencePiece) still produce it; their text is not emitted.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from worker.engine.generation import DetokenizationError

# Prompt tokens decoded before the first generated ones.
_CONTEXT_TOKENS = 5


class TextStream:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        stop: list[str],
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._context: list[int] | None = prompt_ids[-_CONTEXT_TOKENS:]
        self._ids: list[int] = []
        # What `_decode_new` decodes: ids from `_prefix` on, of which those before `_read` were
        # decoded already. DecodeStream keeps the same offsets.
        self._prefix = self._read = 0
        self._backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._decoder = DecodeStream(skip_special_tokens=True) if self._backend else None
        self._stop = stop
        self._text = ""  # all text decoded so far, cut at a stop string once one is found
        self._emitted = 0  # how much of _text has been handed out
        # Stop strings count only once `min_tokens` tokens were generated (vLLM), and only in
        # text from then on: what was emitted before stays the start of the result.
        self._min_tokens = min_tokens
        self._generated = 0
        self._stops_from: int | None = None if min_tokens else 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit."""
        try:
            if self._context is not None:
                # The prompt's tail goes through first, its text never emitted.
                for token in self._context:
                    self._decode_next(token)
                self._context = None
                self._text = ""
            self._generated += 1
            if self._stops_from is None and self._generated >= self._min_tokens:
                self._stops_from = self._emitted
            if not self._decode_next(token_id):
                return ""
            return self._release(final=False)
        except Exception as e:
            raise _failed(e) from e

    def flush(self) -> str:
        """The end of generation: release everything held back, undecodable bytes included."""
        if self.stopped:
            return ""
        try:
            if len(self._ids) > self._read:
                self._decode_new(final=True)
            return self._release(final=True)
        except Exception as e:
            raise _failed(e) from e

    def _decode_next(self, token_id: int) -> bool:
        """Decode one more token into `_text`; whether that gave new text."""
        self._ids.append(token_id)
        if self._decoder is None or self._backend is None:
            return self._decode_new(final=False)
        new = self._decoder.step(self._backend, token_id)
        if new is None:
            return False
        self._prefix, self._read = self._read, len(self._ids)
        self._text += new
        return True

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _decode_new(self, *, final: bool) -> bool:
        """Decode the tokens past `_read` into `_text`; whether there was new text."""
        prefix = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means the token ends inside a multi-byte character: wait for the rest.
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return False
        self._prefix, self._read = self._read, len(self._ids)
        self._text += full[len(prefix) :]
        return True

    def _release(self, *, final: bool) -> str:
        if not self._stop or self._stops_from is None:
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out
        longest = max(map(len, self._stop))
        search_from = max(self._stops_from, self._emitted - longest + 1)
        hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True
            final = True
        end = len(self._text) if final else len(self._text) - self._held_back()
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that may still grow into a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best


def _failed(error: Exception) -> DetokenizationError:
    """Whatever the tokenizer or the stop strings raise is this sequence's fault alone."""
    return DetokenizationError(f"turning the generated tokens into text failed: {error}")

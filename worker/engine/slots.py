"""Each row's sampling parameters and counters as tensors, slot by slot, in buffers with spare
rows: what a step's sampling and stop conditions read, without a tensor built per row or per
step. Where a row has penalties, the slots also count each row's generated tokens and mark its
prompt's, over the vocabulary (`TokenHistory`)."""

from __future__ import annotations

import torch

from worker.engine.compaction import Compaction
from worker.engine.sampling import SamplingParams, stream_key

# Integer columns. GENERATED and POSITION are next to each other: one add ticks both.
TOP_K, KEY, GENERATED, POSITION, LAST, EOS_ENDS, MIN_TOKENS = range(INT_COLUMNS := 7)
# Float columns.
TEMPERATURE, TOP_P, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(FLOAT_COLUMNS := 6)
ROW_SLACK = 8


class TokenHistory:
    """Per slot, over the vocabulary: how often the row generated each token (float32, for the
    frequency penalty) and which tokens its prompt holds (bool, for the repetition penalty)."""

    def __init__(self, counts: torch.Tensor, prompt: torch.Tensor) -> None:
        self.counts = counts
        self.prompt = prompt

    @classmethod
    def of(
        cls, prompts: list[list[int]], generated: list[list[int]], vocab: int, device: torch.device
    ) -> TokenHistory:
        """Rows whose prompts are `prompts`, having generated `generated` already (a resumed
        request's earlier tokens)."""
        history = cls.empty(len(prompts), vocab, device)
        for i, (ids, done) in enumerate(zip(prompts, generated, strict=True)):
            history.prompt[i, torch.tensor(ids, device=device).clamp(max=vocab - 1)] = True
            if done:
                history.counts[i].index_add_(
                    0, torch.tensor(done, device=device), torch.ones(len(done), device=device)
                )
        return history

    @classmethod
    def empty(cls, capacity: int, vocab: int, device: torch.device) -> TokenHistory:
        return cls(
            torch.zeros((capacity, vocab), dtype=torch.float32, device=device),
            torch.zeros((capacity, vocab), dtype=torch.bool, device=device),
        )

    def grown(self, live: int, capacity: int) -> TokenHistory:
        return TokenHistory(
            _grown(self.counts, live, capacity), _grown(self.prompt, live, capacity)
        )

    def put(self, first: int, other: TokenHistory | None, rows: int) -> None:
        """Rows' histories into slots from `first`: `other`'s, or none yet (zeros)."""
        end = first + rows
        if other is None:
            self.counts[first:end] = 0
            self.prompt[first:end] = False
            return
        self.counts[first:end] = other.counts[:rows]
        self.prompt[first:end] = other.prompt[:rows]

    def count(self, tokens: torch.Tensor) -> None:
        """Each row generated its token of `tokens` (one per row, in slot order)."""
        self.counts[: tokens.shape[0]].scatter_add_(
            1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.float32).unsqueeze(1)
        )

    def compact(self, plan: Compaction) -> None:
        if plan.dst is not None and plan.src is not None:
            self.counts[plan.dst] = self.counts[plan.src]
            self.prompt[plan.dst] = self.prompt[plan.src]


class SlotTensors:
    """Per row: top-k (0: off), its random stream's key, tokens generated so far, the position
    of the token it feeds next, the index of its last token (max_new_tokens - 1), whether an
    end-of-sequence token ends it, the tokens it generates before one may; temperature and
    top-p."""

    def __init__(
        self,
        ints: torch.Tensor,
        floats: torch.Tensor,
        rows: int,
        history: TokenHistory | None = None,
    ) -> None:
        self._ints = ints
        self._floats = floats
        self.rows = rows
        # Kept once some row has penalties (until then, no row needs it).
        self.history = history

    @classmethod
    def of(
        cls,
        params: list[SamplingParams],
        prompts: list[list[int]],
        vocab: int,
        device: torch.device,
        generated: list[list[int]] | None = None,
    ) -> SlotTensors:
        """New rows, before the pass that prefills their prompts and, for a resumed request,
        the tokens it `generated` before: they count as generated, so its random stream, its
        length and `min_tokens` go on where they were, and its penalties see them."""
        done = generated or [[] for _ in prompts]
        ints = [
            [
                p.top_k_cut,
                stream_key(p.seed),
                len(ids),
                len(prompt) + len(ids) - 1,
                p.max_new_tokens - 1,
                int(not p.ignore_eos),
                p.min_tokens,
            ]
            for p, prompt, ids in zip(params, prompts, done, strict=True)
        ]
        floats = [
            [
                p.temperature,
                p.top_p if p.top_p_cut else 1.0,
                p.min_p,
                p.presence_penalty,
                p.frequency_penalty,
                p.repetition_penalty,
            ]
            for p in params
        ]
        penalized = any(p.penalized for p in params)
        return cls(
            torch.tensor(ints, dtype=torch.long, device=device),
            torch.tensor(floats, dtype=torch.float32, device=device),
            len(params),
            TokenHistory.of(prompts, done, vocab, device) if penalized else None,
        )

    @classmethod
    def empty(cls, capacity: int, device: torch.device) -> SlotTensors:
        """No rows yet, room for `capacity` that never moves (the static path's CUDA graphs read
        the positions in place)."""
        return cls(
            torch.zeros((capacity, INT_COLUMNS), dtype=torch.long, device=device),
            torch.ones((capacity, FLOAT_COLUMNS), dtype=torch.float32, device=device),
            0,
        )

    @property
    def all_positions(self) -> torch.Tensor:
        """The position column of every slot, rows or not (a view)."""
        return self._ints[:, POSITION]

    @property
    def top_k(self) -> torch.Tensor:
        return self._ints[: self.rows, TOP_K]

    @property
    def keys(self) -> torch.Tensor:
        return self._ints[: self.rows, KEY]

    @property
    def generated(self) -> torch.Tensor:
        return self._ints[: self.rows, GENERATED]

    @property
    def positions(self) -> torch.Tensor:
        return self._ints[: self.rows, POSITION]

    @property
    def last(self) -> torch.Tensor:
        return self._ints[: self.rows, LAST]

    @property
    def eos_ends(self) -> torch.Tensor:
        return self._ints[: self.rows, EOS_ENDS]

    @property
    def min_tokens(self) -> torch.Tensor:
        return self._ints[: self.rows, MIN_TOKENS]

    @property
    def temperature(self) -> torch.Tensor:
        return self._floats[: self.rows, TEMPERATURE]

    @property
    def top_p(self) -> torch.Tensor:
        return self._floats[: self.rows, TOP_P]

    @property
    def min_p(self) -> torch.Tensor:
        return self._floats[: self.rows, MIN_P]

    @property
    def penalties(self) -> torch.Tensor:
        """Presence, frequency and repetition penalties (rows x 3)."""
        return self._floats[: self.rows, PRESENCE : REPETITION + 1]

    def tick(self, tokens: torch.Tensor) -> None:
        """A pass gave every row its token of `tokens`: one more generated, the next one a
        position on."""
        self._ints[: self.rows, GENERATED : POSITION + 1] += 1
        if self.history is not None:
            self.history.count(tokens)

    def append(self, other: SlotTensors) -> None:
        rows = self.rows + other.rows
        if rows > self._ints.shape[0]:
            capacity = rows + ROW_SLACK
            self._ints = _grown(self._ints, self.rows, capacity)
            self._floats = _grown(self._floats, self.rows, capacity)
            if self.history is not None:
                self.history = self.history.grown(self.rows, capacity)
        self._put_history(self.rows, other)
        self._ints[self.rows : rows] = other._ints[: other.rows]
        self._floats[self.rows : rows] = other._floats[: other.rows]
        self.rows = rows

    def put(self, first: int, other: SlotTensors) -> None:
        """`other`'s rows into slots from `first`, within the room there is, not yet counted
        among the rows."""
        assert first + other.rows <= self._ints.shape[0], "no room for the rows"
        self._put_history(first, other)
        self._ints[first : first + other.rows] = other._ints[: other.rows]
        self._floats[first : first + other.rows] = other._floats[: other.rows]

    def _put_history(self, first: int, other: SlotTensors) -> None:
        if self.history is None and other.history is not None:
            vocab = other.history.counts.shape[1]
            self.history = TokenHistory.empty(self._ints.shape[0], vocab, self._ints.device)
        if self.history is not None:
            self.history.put(first, other.history, other.rows)

    def compact(self, plan: Compaction) -> None:
        if plan.dst is not None and plan.src is not None:
            self._ints[plan.dst] = self._ints[plan.src]
            self._floats[plan.dst] = self._floats[plan.src]
        if self.history is not None:
            self.history.compact(plan)
        self.rows = plan.rows


def _grown(buffer: torch.Tensor, live: int, rows: int) -> torch.Tensor:
    grown = buffer.new_empty((rows, buffer.shape[1]))
    grown[:live] = buffer[:live]
    return grown

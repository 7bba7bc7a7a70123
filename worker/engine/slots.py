"""Each row's sampling parameters and counters as tensors, slot by slot, in buffers with spare
rows: what a step's sampling and stop conditions read, without a tensor built per row or per
step."""

from __future__ import annotations

import torch

from worker.engine.compaction import Compaction
from worker.engine.sampling import SamplingParams, stream_key

# Integer columns. GENERATED and POSITION are next to each other: one add ticks both.
TOP_K, KEY, GENERATED, POSITION, LAST, EOS_ENDS, MIN_TOKENS = range(INT_COLUMNS := 7)
# Float columns.
TEMPERATURE, TOP_P = range(FLOAT_COLUMNS := 2)
ROW_SLACK = 8


class SlotTensors:
    """Per row: top-k (0: off), its random stream's key, tokens generated so far, the position
    of the token it feeds next, the index of its last token (max_new_tokens - 1), whether an
    end-of-sequence token ends it, the tokens it generates before one may; temperature and
    top-p."""

    def __init__(self, ints: torch.Tensor, floats: torch.Tensor, rows: int) -> None:
        self._ints = ints
        self._floats = floats
        self.rows = rows

    @classmethod
    def of(
        cls, params: list[SamplingParams], prompt_lengths: list[int], device: torch.device
    ) -> SlotTensors:
        """New rows, before the pass that prefills their prompts."""
        ints = [
            [
                p.top_k_cut,
                stream_key(p.seed),
                0,
                n - 1,
                p.max_new_tokens - 1,
                int(not p.ignore_eos),
                p.min_tokens,
            ]
            for p, n in zip(params, prompt_lengths, strict=True)
        ]
        floats = [[p.temperature, p.top_p if p.top_p_cut else 1.0] for p in params]
        return cls(
            torch.tensor(ints, dtype=torch.long, device=device),
            torch.tensor(floats, dtype=torch.float32, device=device),
            len(params),
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

    def tick(self) -> None:
        """A pass gave every row a token: one more generated, the next one a position on."""
        self._ints[: self.rows, GENERATED : POSITION + 1] += 1

    def append(self, other: SlotTensors) -> None:
        rows = self.rows + other.rows
        if rows > self._ints.shape[0]:
            self._ints = _grown(self._ints, self.rows, rows + ROW_SLACK)
            self._floats = _grown(self._floats, self.rows, rows + ROW_SLACK)
        self._ints[self.rows : rows] = other._ints[: other.rows]
        self._floats[self.rows : rows] = other._floats[: other.rows]
        self.rows = rows

    def put(self, first: int, other: SlotTensors) -> None:
        """`other`'s rows into slots from `first`, within the room there is, not yet counted
        among the rows."""
        assert first + other.rows <= self._ints.shape[0], "no room for the rows"
        self._ints[first : first + other.rows] = other._ints[: other.rows]
        self._floats[first : first + other.rows] = other._floats[: other.rows]

    def compact(self, plan: Compaction) -> None:
        if plan.dst is not None and plan.src is not None:
            self._ints[plan.dst] = self._ints[plan.src]
            self._floats[plan.dst] = self._floats[plan.src]
        self.rows = plan.rows


def _grown(buffer: torch.Tensor, live: int, rows: int) -> torch.Tensor:
    grown = buffer.new_empty((rows, buffer.shape[1]))
    grown[:live] = buffer[:live]
    return grown

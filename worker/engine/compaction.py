"""Keeping a batch's rows dense as rows leave: which rows move into the holes, and the index
tensors every buffer of the batch (cache, mask, sampling tensors) applies the moves with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Compaction:
    """Dropping rows: `rows` remain, slots `dst` take the rows in slots `src` (None: no row
    moves), and the first `drop_columns` columns of the window go."""

    rows: int
    dst: torch.Tensor | None
    src: torch.Tensor | None
    drop_columns: int


def compaction(size: int, dropped: Sequence[int]) -> list[tuple[int, int]]:
    """The moves (slot, from slot) that keep a batch of `size` rows dense once the rows in
    `dropped` leave: kept rows below the new size stay where they are, and each hole below it
    takes a kept row from above it. Costs O(dropped), not O(size)."""
    rows = size - len(dropped)
    gone = set(dropped)
    holes = sorted(i for i in gone if i < rows)
    movers = [i for i in range(rows, size) if i not in gone]
    return list(zip(holes, movers, strict=True))


def compaction_plan(
    rows: int, moves: list[tuple[int, int]], drop_columns: int, device: torch.device
) -> Compaction:
    """The `Compaction` of `moves`, its index tensors built once for every buffer."""
    if not moves:
        return Compaction(rows, None, None, drop_columns)
    dst = torch.tensor([slot for slot, _ in moves], device=device)
    src = torch.tensor([source for _, source in moves], device=device)
    return Compaction(rows, dst, src, drop_columns)

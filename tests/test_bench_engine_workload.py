"""How `bench.engine` measures every system: its steady window, and the tokens counted in it
(synthetic timestamps; the tiny model for what the systems record)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.engine_workload import (
    Item,
    LoopRecord,
    engine_closed_loop,
    hf_generate_batch,
    sequential,
    static_batch,
    tokens_between,
    workload,
)
from worker.engine.model import LoadedModel


def test_the_steady_window_counts_only_the_tokens_made_inside_it() -> None:
    # Two in flight, each row making a token a second. B's answer (the second) opens the window
    # at 6 and E's submission closes it at 10; C and D each make 4 tokens inside. Counting the
    # whole of the requests answered inside (C's 6 tokens, 2 of them before 6) gives 1.5/s.
    made = {  # request: (submitted, its tokens' times)
        "A": (0, [1, 2, 3, 4]),
        "B": (0, [1, 2, 3, 4, 5, 6]),
        "C": (4, [5, 6, 7, 8, 9, 10]),
        "D": (6, [7, 8, 9, 10, 11, 12]),
        "E": (10, [11, 12, 13, 14]),
    }
    record = LoopRecord(
        concurrency=2,
        submitted=[float(at) for at, _ in made.values()],
        answered=[float(times[-1]) for _, times in made.values()],
        tokens=[(float(t), 1) for _, times in made.values() for t in times],
    )
    assert record.steady_window() == (6.0, 10.0)
    assert record.steady_tok_s == 2.0
    assert record.whole_run_tok_s == 26 / 14


def test_a_step_counts_when_it_came_not_when_its_request_ended() -> None:
    steps = [(0.5, 16), (1.0, 16), (1.5, 15), (2.0, 16), (2.5, 16)]
    assert tokens_between(steps, 1.0, 2.0) == 31  # after the start, up to the end included


def test_a_loop_too_short_for_a_steady_state_is_refused() -> None:
    # One wave of two: its last submission comes before its second answer.
    record = LoopRecord(2, submitted=[0.0, 0.0], answered=[1.0, 1.0], tokens=[(1.0, 2)])
    with pytest.raises(ValueError, match="steady state"):
        _ = record.steady_tok_s


@pytest.fixture(scope="module")
def items(tiny_lm: LoadedModel) -> list[Item]:
    # Short requests of unequal lengths: a static batch pads the short ones.
    return [replace(item, max_new_tokens=3 + i % 4) for i, item in enumerate(workload(tiny_lm, 12))]


def test_the_engine_loop_records_every_token_its_steps_made(
    tiny_lm: LoadedModel, items: list[Item]
) -> None:
    record = engine_closed_loop(tiny_lm, items, 2, total=8, prefix_cache=False)
    assert sum(count for _, count in record.tokens) == sum(i.max_new_tokens for i in items[:8])
    start, end = record.steady_window()
    assert min(record.submitted) < start < end < max(record.answered)
    assert 0 < tokens_between(record.tokens, start, end) < sum(c for _, c in record.tokens)


def test_the_baselines_are_credited_with_the_tokens_asked_for_not_the_padding(
    tiny_lm: LoadedModel, items: list[Item]
) -> None:
    asked = sum(i.max_new_tokens for i in items)
    with torch.inference_mode():
        one_at_a_time = sequential(tiny_lm, items)
        waves = static_batch(tiny_lm, items, 4)
    assert sum(count for _, count in one_at_a_time.tokens) == asked
    assert sum(count for _, count in waves.tokens) == asked
    # A wave is submitted together and answered together.
    assert sorted(waves.answered)[3] < sorted(waves.submitted)[4]
    assert waves.steady_tok_s > 0


def test_generate_batch_runs_in_waves_with_a_timestamp_a_token(
    tiny_lm: LoadedModel, items: list[Item]
) -> None:
    record = hf_generate_batch(tiny_lm, items, 4)
    mean = round(sum(i.max_new_tokens for i in items) / len(items))
    assert sum(count for _, count in record.tokens) == len(items) * mean
    assert record.steady_tok_s > 0

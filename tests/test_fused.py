"""The fused pass over several batches gives what the model's own forward gives batch by batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.settings import Settings
from gateway.schemas import GenerationRequest
from tests.tiny_model import build_tiny_model
from worker.engine import fused
from worker.engine.eager.batch import Batch, forward, forward_all
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixCache
from worker.engine.rows import new_row
from worker.engine.sampling import SamplingParams
from worker.loading import load_model

RUNNING = ["Hi", "The capital of France is", "Once upon a time there was a small model that"]
SHARED_START = "You are a careful assistant: answer briefly, precisely, and in plain words. "
ADMITTED = [SHARED_START + "The quick brown fox", "Streaming servers batch requests"]


def tiny(tmp_path: Path, architecture: str) -> LoadedModel:
    path = build_tiny_model(tmp_path / architecture, architecture=architecture)
    return load_model(Settings(model=str(path), device="cpu"))


def batch_of(lm: LoadedModel, prompts: list[str], cache: PrefixCache | None = None) -> Batch:
    params = SamplingParams(max_new_tokens=50, temperature=0.0)
    ids = [build_prompt_ids(lm, GenerationRequest(prompt=p)) for p in prompts]
    rows = [new_row(lm, str(i), p, params) for i, p in enumerate(ids)]
    hits = [cache.lookup(p) for p in ids] if cache else None
    return Batch.prefill(lm, rows, hits)


NO_EOS = torch.tensor([], dtype=torch.long)


def decoding(lm: LoadedModel) -> Batch:
    """The running prompts prefilled and their first token picked: a batch ready to decode."""
    batch = batch_of(lm, RUNNING)
    batch.advance(forward(lm, batch), NO_EOS)
    return batch


@pytest.mark.parametrize("architecture", sorted(fused.FUSED_MODEL_TYPES))
def test_a_fused_step_equals_the_models_own_passes(tmp_path: Path, architecture: str) -> None:
    lm = tiny(tmp_path, architecture)
    assert fused.supports(lm.model)
    # One admitted prompt starts with a cached prefix: its mask reads [pad, prefix, pad, rest].
    prefixes = PrefixCache(2**20)
    seeded = batch_of(lm, [SHARED_START + "Paris"])
    forward(lm, seeded)
    prefixes.store(seeded.rows[0].prompt_ids, seeded.prompt_kv(0))

    with torch.inference_mode():
        own = [decoding(lm), batch_of(lm, ADMITTED, prefixes)]
        mine = [decoding(lm), batch_of(lm, ADMITTED, prefixes)]
        assert mine[1].rows[0].cached_prompt_tokens > 0
        for step in range(3):
            expected = torch.cat([forward(lm, b) for b in own])
            got = forward_all(lm, mine)  # one fused pass: the model is of a fused type
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"step {step}"
            # Both sides decode on: the next steps read what this one wrote into the caches.
            own = [merged(own, expected)]
            mine = [merged(mine, got)]


def merged(batches: list[Batch], logits: torch.Tensor) -> Batch:
    """The batches as one, each row's token picked from `logits`."""
    batch = batches[0]
    for other in batches[1:]:
        batch = batch.extend(other)
    batch.advance(logits, NO_EOS)
    return batch

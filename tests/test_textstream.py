from __future__ import annotations

import random
from typing import cast

import pytest
from transformers import PreTrainedTokenizerFast

from tests.tiny_model import build_tokenizer
from worker.engine.textstream import TextStream


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def run(tokenizer: PreTrainedTokenizerFast, text: str, stop: list[str]) -> tuple[list[str], str]:
    stream = TextStream(tokenizer, [], stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return [d for d in deltas if d], stream.text


@pytest.mark.parametrize(
    "text", ["plain ascii text", "Café déjà vu", "日本語のテキスト", "emoji 🎉🚀 party", "ß🎉ü"]
)
def test_deltas_concatenate_to_the_decoded_text_and_never_split_a_character(
    tokenizer: PreTrainedTokenizerFast, text: str
) -> None:
    deltas, final = run(tokenizer, text, [])
    assert "".join(deltas) == final == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_characters_are_made_of_several_tokens(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # Guards the test above: the emoji must really arrive split across byte tokens.
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1


def test_stop_string_cuts_the_text_before_it(tokenizer: PreTrainedTokenizerFast) -> None:
    deltas, final = run(tokenizer, "The capital of France is Paris. More text", ["Paris"])
    assert final == "The capital of France is "
    assert "".join(deltas) == final


def test_text_that_may_become_a_stop_string_is_held_back(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    stream = TextStream(tokenizer, [], ["ab cd"])
    emitted = "".join(
        stream.push(t) for t in tokenizer("xy ab", add_special_tokens=False).input_ids
    )
    assert emitted == "xy "  # "ab" could still become "ab cd"
    assert stream.flush() == "ab"


def test_earliest_of_several_stop_strings_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    _, final = run(tokenizer, "one two three four", ["four", "two"])
    assert final == "one "


class WithoutBackend:
    """The tokenizer's `decode` alone: what a tokenizer without a Rust backend offers."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.decode = tokenizer.decode


def deltas_of(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(token) for token in ids] + [stream.flush()]


def test_the_incremental_decoder_gives_what_decoding_the_tokens_gives(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # Random tokens, byte tokens among them: characters split across tokens, and sequences that
    # end inside one (the flush releases those bytes as replacement characters).
    rng = random.Random(5)
    plain = cast(PreTrainedTokenizerFast, WithoutBackend(tokenizer))
    vocabulary = len(tokenizer)
    for _ in range(50):
        prompt = [rng.randrange(vocabulary) for _ in range(rng.randint(0, 8))]
        ids = [rng.randrange(vocabulary) for _ in range(rng.randint(1, 40))]
        stop = rng.choice([[], ["e"], ["th", "🎉"]])
        fast = deltas_of(TextStream(tokenizer, prompt, list(stop)), ids)
        slow = deltas_of(TextStream(plain, prompt, list(stop)), ids)
        assert fast == slow, (prompt, ids, stop)


def test_a_character_cut_off_at_the_end_is_flushed_as_a_replacement(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer("ok 🎉", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, [], [])
    emitted = "".join(stream.push(token) for token in ids[:-1])
    assert emitted == "ok"  # the space rides in the emoji's first token
    flushed = stream.flush()
    assert flushed.startswith(" \ufffd")
    assert stream.text == emitted + flushed == tokenizer.decode(ids[:-1])

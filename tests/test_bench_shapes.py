"""The model shapes `bench.engine --shape` builds are the published ones (checked on the meta
device: no memory, no weights)."""

from __future__ import annotations

import pytest

from bench import shapes

VOCAB = 49_152  # the default model's tokenizer, which every shape uses


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("smollm2-135m", 134.5e6),
        ("smollm2-1.7b", 1.711e9),
        # 8.03 billion with its own 128,256-token vocabulary, in the input and output embeddings.
        ("llama3-8b", 8.030e9 - 2 * (128_256 - VOCAB) * 4096),
    ],
)
def test_each_shape_has_its_published_size(name: str, published: float) -> None:
    assert abs(shapes.parameters(name, VOCAB) - published) / published < 0.01


def test_a_shape_can_be_cut_to_fewer_layers() -> None:
    config = shapes.config("llama3-8b", VOCAB, layers=2)
    assert config.num_hidden_layers == 2
    assert (config.hidden_size, config.num_key_value_heads) == (4096, 8)

"""Tiny randomly initialised decoders (Llama by default) with a real byte-level BPE tokenizer
and chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a small model that generated text token by token.",
    "Café, naïve, déjà vu, 日本語のテキスト, emoji 🎉🚀 and more unicode: ü ö ä ß.",
    "Streaming servers batch requests, stream tokens, and never lose a job.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers is untyped
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: Path,
    seed: int = 1234,
    architecture: str = "llama",
    config: dict[str, object] | None = None,
) -> Path:
    """A random decoder of `architecture` (a transformers model type), with full attention
    unless `config` overrides say otherwise (its shape too); another `seed` gives other weights
    of the same shapes (a new version)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    shape: dict[str, object] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,  # Qwen3's default is 128 whatever the hidden size
        "max_position_embeddings": 1024,
        "sliding_window": None,
    }
    model_config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Far above the usual 0.02: with tiny random weights the attention output is so small
        # that the next token depends on the current token alone, and a test could not tell a
        # row that sees the wrong keys from one that sees the right ones.
        initializer_range=0.3,
        **{**shape, **(config or {})},
    )
    model = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]  # untyped
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

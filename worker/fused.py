"""One forward pass over several batches of a Llama-family decoder: the running batch's decode
step and the prompts of newly admitted rows ride together, as in vLLM's mixed prefill and decode
batches.

The linear layers and norms, nearly all of a small model's time, run once over every batch's
tokens flattened into one matrix, so each weight is read once per step instead of once per
batch, and the decode rows' few tokens fill out the prompts' larger matmuls. Attention runs per
batch, on that batch's own cache and mask. On this project's CPU a decode step at 16 rows plus a
64-token prompt takes about 70% of the two passes it replaces.

The layers are driven module by module with transformers' own rotary and SDPA functions, so the
logits match the model's own forward pass up to float rounding (within 1e-4 in fp32, where
matmuls over more rows sum in another order); the architectures listed in FUSED_MODEL_TYPES
share Llama's decoder layer (pre-norm attention and MLP, rotary positions, no logit scaling;
Qwen3 adds a norm over each head's queries and keys). Other models run one batch at a time
through their own forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class Part(NamedTuple):
    """One batch's inputs: `input_ids` (B, T), `attention_mask` (B, cached + T), and its cache."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any  # a transformers DynamicCache


class _Prepared(NamedTuple):
    rows: int
    tokens: int  # per row
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor  # (B, 1, T, cached + T), True where a query may attend


def supports(model: Any) -> bool:
    return model.config.model_type in FUSED_MODEL_TYPES


def forward(model: Any, parts: Sequence[Part]) -> list[torch.Tensor]:
    """The next-token logits (B x vocab, fp32) of every part; each part's cache grows by its
    inputs, as `model(...)` would grow it."""
    decoder = model.model
    embeds = [decoder.embed_tokens(part.input_ids) for part in parts]
    prepared = [_prepare(decoder, part, e) for part, e in zip(parts, embeds, strict=True)]
    hidden = torch.cat([e.flatten(0, 1) for e in embeds])
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q, k, v = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head's queries and keys
            q = attention.q_norm(q.unflatten(-1, (-1, attention.head_dim))).flatten(-2)
            k = attention.k_norm(k.unflatten(-1, (-1, attention.head_dim))).flatten(-2)
        outputs = []
        start = 0
        for part, prep in zip(parts, prepared, strict=True):
            stop = start + prep.rows * prep.tokens
            shape = (prep.rows, prep.tokens, -1, attention.head_dim)
            heads = [x[start:stop].view(shape).transpose(1, 2) for x in (q, k, v)]
            queries, keys = apply_rotary_pos_emb(heads[0], heads[1], *prep.rope)
            keys, values = part.cache.layers[index].update(keys, heads[2])
            out, _ = sdpa_attention_forward(
                attention, queries, keys, values, prep.mask, scaling=attention.scaling
            )
            outputs.append(out.flatten(0, 1).flatten(1))
            start = stop
        hidden = hidden + attention.o_proj(torch.cat(outputs))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    # Only each row's last position needs logits: the LM head over whole prompts would cost
    # more than the layers.
    last, start = [], 0
    for prep in prepared:
        ends = torch.arange(1, prep.rows + 1, device=hidden.device) * prep.tokens - 1
        last.append(start + ends)
        start += prep.rows * prep.tokens
    logits = model.lm_head(decoder.norm(hidden[torch.cat(last)])).float()
    return list(logits.split([prep.rows for prep in prepared]))


def _prepare(decoder: Any, part: Part, embeds: torch.Tensor) -> _Prepared:
    rows, tokens = part.input_ids.shape
    width = part.attention_mask.shape[1]
    positions = (part.attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -tokens:]
    seen = part.attention_mask.bool()[:, None, :]
    query_at = torch.arange(width - tokens, width, device=seen.device)
    columns = torch.arange(width, device=seen.device)
    mask = seen & (columns[None, :] <= query_at[:, None])
    # A padding query sees no real key; letting it see itself keeps its (unused) output finite.
    mask |= columns[None, :] == query_at[:, None]
    return _Prepared(rows, tokens, decoder.rotary_emb(embeds, positions), mask[:, None])

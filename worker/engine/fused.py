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


class Attention(NamedTuple):
    """What a batch's queries see: `positions` (B, T) of its inputs, and `mask` (B, 1, T,
    cached + T, bool), True where a query may attend."""

    positions: torch.Tensor
    mask: torch.Tensor


class Part(NamedTuple):
    """One batch's inputs: `input_ids` (B, T), their attention, and the batch's cache."""

    input_ids: torch.Tensor
    attention: Attention
    cache: Any  # a transformers DynamicCache


def supports(model: Any) -> bool:
    return model.config.model_type in FUSED_MODEL_TYPES


def prefill_attention(mask: torch.Tensor, tokens: int) -> Attention:
    """The attention of a prefill batch whose last `tokens` columns of `mask` (B x width, bool:
    real tokens, left-padded, a cached prefix before them) are its inputs: causal over real
    columns, positions counting real tokens."""
    width = mask.shape[1]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -tokens:]
    seen = mask[:, None, :]
    query_at = torch.arange(width - tokens, width, device=mask.device)
    columns = torch.arange(width, device=mask.device)
    attend = seen & (columns[None, :] <= query_at[:, None])
    # A padding query sees no real key; letting it see itself keeps its (unused) output finite.
    attend |= columns[None, :] == query_at[:, None]
    return Attention(positions, attend[:, None])


def forward(model: Any, parts: Sequence[Part]) -> torch.Tensor:
    """The next-token logits (rows x vocab, fp32) of every part's rows, in order; each part's
    cache grows by its inputs, as `model(...)` would grow it."""
    decoder = model.model
    embeds = [decoder.embed_tokens(part.input_ids) for part in parts]
    rope = [
        decoder.rotary_emb(e, part.attention.positions)
        for part, e in zip(parts, embeds, strict=True)
    ]
    flat = [e.flatten(0, 1) for e in embeds]
    hidden = flat[0] if len(flat) == 1 else torch.cat(flat)
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        q, k, v = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head's queries and keys
            q = attention.q_norm(q.unflatten(-1, (-1, attention.head_dim))).flatten(-2)
            k = attention.k_norm(k.unflatten(-1, (-1, attention.head_dim))).flatten(-2)
        outputs = []
        start = 0
        for part, (cos, sin) in zip(parts, rope, strict=True):
            rows, tokens = part.input_ids.shape
            stop = start + rows * tokens
            shape = (rows, tokens, -1, attention.head_dim)
            heads = [x[start:stop].view(shape).transpose(1, 2) for x in (q, k, v)]
            queries, keys = apply_rotary_pos_emb(heads[0], heads[1], cos, sin)
            keys, values = part.cache.layers[index].update(keys, heads[2])
            out, _ = sdpa_attention_forward(
                attention, queries, keys, values, part.attention.mask, scaling=attention.scaling
            )
            outputs.append(out.flatten(0, 1).flatten(1))
            start = stop
        hidden = hidden + attention.o_proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    # Only each row's last position needs logits: the LM head over whole prompts would cost
    # more than the layers.
    if any(part.input_ids.shape[1] > 1 for part in parts):
        last, start = [], 0
        for part in parts:
            rows, tokens = part.input_ids.shape
            last.append(start + torch.arange(1, rows + 1, device=hidden.device) * tokens - 1)
            start += rows * tokens
        hidden = hidden[torch.cat(last)]
    return model.lm_head(decoder.norm(hidden)).float()  # type: ignore[no-any-return]

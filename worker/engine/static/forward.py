"""One forward pass of a Llama-family decoder (the architectures of `fused.FUSED_MODEL_TYPES`) over
the static cache: decode rows, prompts being prefilled, or both in one pass.

Every token of the pass is one row of a flat (tokens x hidden) matrix: the linear layers, norms
and rotary positions run once over all of them, whichever part they belong to, so each weight is
read once per step. Each token's keys and values are written into its slot at its column
(`index_put_`, scratch column for padding), then attention runs per part:

- decode: rows 0..b-1 of the cache, one query each, over the first `length` columns (a length
  bucket) with the mask `column <= position`. Grouped-query heads need no repeated keys: the
  query heads that share a KV head ride as that head's queries, (b, KV heads, group, D);
- prefill: `rows` slots from `first`, right-padded prompt rests of `tokens_per_row`, each query
  over its slot's columns up to its own position (a cached prefix sits in the first columns).

Shapes depend only on the host-side ints (b, length; the prefill's sizes) and every index is a
device tensor, so the decode part is one fixed sequence of kernels per bucket, as CUDA graphs
need, and the same function runs eagerly on any device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from worker.engine.static.cache import StaticCache


class DecodePart(NamedTuple):
    """Rows 0..b-1, one token each."""

    tokens: torch.Tensor  # (b,)
    positions: torch.Tensor  # (b,) the column each token goes to
    write_columns: torch.Tensor  # (b,) positions, or the scratch column for padding rows
    length: int  # columns attention reads (a bucket >= every live row's position + 1)


class PrefillPart(NamedTuple):
    """`rows` slots from `first`, `tokens_per_row` tokens each (right-padded), flattened."""

    tokens: torch.Tensor  # (rows x tokens_per_row,)
    positions: torch.Tensor  # (same,) a padding token repeats its row's last position
    slots: torch.Tensor  # (same,) the slot each token is written to
    write_columns: torch.Tensor  # (same,) its position, or the scratch column for padding
    last: torch.Tensor  # (rows,) the flat index of each row's last real token
    first: int
    rows: int
    tokens_per_row: int
    length: int  # columns attention reads: the longest row's prefix plus rest


def forward(
    model: Any, cache: StaticCache, decode: DecodePart | None, prefill: PrefillPart | None
) -> torch.Tensor:
    """Next-token logits (decode rows, then prefill rows; fp32) of a pass over the parts."""
    decoder = model.model
    parts = [p for p in (decode, prefill) if p is not None]
    ids = parts[0].tokens if len(parts) == 1 else torch.cat([p.tokens for p in parts])
    positions = parts[0].positions if len(parts) == 1 else torch.cat([p.positions for p in parts])
    hidden = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary_emb(hidden, positions.unsqueeze(0))
    cos, sin = cos[0], sin[0]
    slots, columns = _writes(cache, decode, prefill)
    decode_mask = prefill_mask = None
    if decode is not None:
        seen = cache.columns_index[: decode.length]
        decode_mask = (seen[None, :] <= decode.positions[:, None])[:, None, None, :]
    if prefill is not None:
        seen = cache.columns_index[: prefill.length]
        query_at = prefill.positions.view(prefill.rows, prefill.tokens_per_row, 1)
        prefill_mask = (seen[None, None, :] <= query_at)[:, None]
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        head_dim = attention.head_dim
        normed = layer.input_layernorm(hidden)
        q = attention.q_proj(normed).unflatten(-1, (-1, head_dim))
        k = attention.k_proj(normed).unflatten(-1, (-1, head_dim))
        v = attention.v_proj(normed).unflatten(-1, (-1, head_dim))
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head's queries and keys
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        keys, values = cache.layer(index)
        keys[slots, :, columns] = k
        values[slots, :, columns] = v
        outputs = []
        if decode is not None:
            assert decode_mask is not None
            rows = len(decode.tokens)
            outputs.append(
                _decode_attention(
                    q[:rows], keys, values, decode_mask, decode.length, attention.scaling
                )
            )
        if prefill is not None:
            assert prefill_mask is not None
            start = len(decode.tokens) if decode is not None else 0
            outputs.append(
                _prefill_attention(attention, q[start:], keys, values, prefill_mask, prefill)
            )
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        hidden = hidden + attention.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    if prefill is not None:
        start = len(decode.tokens) if decode is not None else 0
        last = prefill.last + start
        picked = last if decode is None else torch.cat([cache.rows_index[:start], last])
        hidden = hidden[picked]
    return model.lm_head(decoder.norm(hidden)).float()  # type: ignore[no-any-return]


def _writes(
    cache: StaticCache, decode: DecodePart | None, prefill: PrefillPart | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (slot, column) every token of the pass writes its keys and values to."""
    if decode is None:
        assert prefill is not None
        return prefill.slots, prefill.write_columns
    decode_slots = cache.rows_index[: len(decode.tokens)]
    if prefill is None:
        return decode_slots, decode.write_columns
    return (
        torch.cat([decode_slots, prefill.slots]),
        torch.cat([decode.write_columns, prefill.write_columns]),
    )


def _decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    length: int,
    scaling: float,
) -> torch.Tensor:
    """q (b, H, D) over rows 0..b-1 of a layer's cache, `length` columns: (b, H x D)."""
    rows, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(rows, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped,
        keys[:rows, :, :length],
        values[:rows, :, :length],
        attn_mask=mask,
        scale=scaling,
    )
    return out.reshape(rows, heads * head_dim)


def _prefill_attention(
    attention: Any,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    part: PrefillPart,
) -> torch.Tensor:
    """The prefill rows' queries (rows x tokens, H, D) over their slots: (rows x tokens, H x D)."""
    queries = q.view(part.rows, part.tokens_per_row, *q.shape[1:]).transpose(1, 2)
    window = slice(part.first, part.first + part.rows)
    out, _ = sdpa_attention_forward(
        attention,
        queries,
        keys[window, :, : part.length],
        values[window, :, : part.length],
        mask,
        scaling=attention.scaling,
    )
    return out.flatten(0, 1).flatten(1)

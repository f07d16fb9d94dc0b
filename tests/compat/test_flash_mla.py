"""dsv3.compat.flash_mla, called the way FlashMLA's first test calls FlashMLA (a blocked K cache with NaN past
each length, `get_mla_metadata` then `flash_mla_with_kvcache`, a ten-line softmax-attention reference per
request, `cal_diff` cosine < 1e-5 for out and lse), on CPU tensors; plus its FP8 cache flag and the later
keywords."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dsv3 import ops
from dsv3.compat.flash_mla import flash_mla_with_kvcache, get_mla_metadata


def scaled_dot_product_attention(query, key, value, h_q, h_kv, is_causal=False):
    query, key, value = query.float(), key.float(), value.float()
    key = key.repeat_interleave(h_q // h_kv, dim=0)
    value = value.repeat_interleave(h_q // h_kv, dim=0)
    attn_weight = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
    if is_causal:
        s_q, s_k = query.shape[-2], key.shape[-2]
        visible = torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)
        attn_weight = attn_weight.masked_fill(~visible, float("-inf"))
    lse = attn_weight.logsumexp(dim=-1)
    attn_weight = torch.softmax(attn_weight, dim=-1, dtype=torch.float32)
    return attn_weight @ value, lse


def cal_diff(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    x, y = x.double(), y.double()
    cos_diff = 1 - 2 * (x * y).sum().item() / max((x * x + y * y).sum().item(), 1e-12)
    assert cos_diff < 1e-5, f"{name}: cos_diff {cos_diff}"


def blocked_cache(b, s_q, mean_sk, h_kv, d, varlen, dtype, block_size=64):
    cache_seqlens = torch.full((b,), mean_sk, dtype=torch.int32)
    if varlen:
        for i in range(b):
            cache_seqlens[i] = max(int(random.normalvariate(mean_sk, mean_sk / 2)), s_q)
    max_seqlen_pad = math.ceil(int(cache_seqlens.max()) / 256) * 256
    block_table = torch.arange(b * max_seqlen_pad // block_size, dtype=torch.int32).view(b, -1)
    block_table = block_table.view(-1)[torch.randperm(block_table.numel())].view(b, -1)
    blocked_k = torch.randn(block_table.numel(), block_size, h_kv, d, dtype=dtype)
    for i in range(b):  # everything past the length is NaN: the kernel must never read it
        pages = block_table[i, math.ceil(int(cache_seqlens[i]) / block_size) :].long()
        blocked_k[pages] = float("nan")
        tail = int(cache_seqlens[i]) % block_size
        if tail:
            blocked_k[block_table[i, int(cache_seqlens[i]) // block_size], tail:] = float("nan")
    return cache_seqlens, block_table, blocked_k


def ref_mla(q, blocked_k, block_table, cache_seqlens, dv, h_q, h_kv, causal):
    b, s_q = q.shape[:2]
    d = q.shape[-1]
    out = torch.empty(b, s_q, h_q, dv, dtype=torch.float32)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32)
    for i in range(b):
        s_k = int(cache_seqlens[i])
        k = blocked_k[block_table[i].long()].view(-1, h_kv, d)[:s_k]
        o, s = scaled_dot_product_attention(
            q[i].transpose(0, 1), k.transpose(0, 1), k[..., :dv].transpose(0, 1), h_q, h_kv, causal
        )
        out[i], lse[i] = o.transpose(0, 1), s
    return out, lse


@pytest.mark.parametrize(
    "b, s_q, mean_sk, h_q, h_kv, causal, varlen",
    [
        (4, 1, 1000, 128, 1, False, False),  # TP = 1, MTP = 1
        (4, 2, 1000, 16, 1, True, True),  # TP = 8, MTP = 2
        (3, 2, 300, 64, 1, True, False),
        (5, 1, 300, 32, 2, False, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_mla(b, s_q, mean_sk, h_q, h_kv, causal, varlen, dtype):
    d, dv = 576, 512
    cache_seqlens, block_table, blocked_k = blocked_cache(b, s_q, mean_sk, h_kv, d, varlen, dtype)
    q = torch.randn(b, s_q, h_q, d, dtype=dtype)

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out_flash, lse_flash = flash_mla_with_kvcache(
        q, blocked_k, block_table, cache_seqlens, dv, tile_scheduler_metadata, num_splits, causal=causal
    )
    out_torch, lse_torch = ref_mla(q, blocked_k, block_table, cache_seqlens, dv, h_q, h_kv, causal)
    assert out_flash.dtype == dtype and lse_flash.dtype == torch.float32
    cal_diff(out_flash, out_torch, "out")
    cal_diff(lse_flash, lse_torch, "lse")


def test_later_keywords_and_fp8_cache():
    """The Sep-2025 keywords (`num_heads_q`, `is_fp8_kvcache`) and an FP8 cache in FlashMLA's 656-byte layout
    (from dsv3.ops.quantize_mla_kv_fp8), against the reference on the dequantized cache."""
    b, s_q, h_q, h_kv, d, dv = 3, 2, 16, 1, 576, 512
    cache_seqlens, block_table, blocked_k = blocked_cache(b, s_q, 400, h_kv, d, True, torch.bfloat16)
    k_fp8 = ops.quantize_mla_kv_fp8(blocked_k, dv)
    assert k_fp8.shape[-1] == 656
    q = torch.randn(b, s_q, h_q, d, dtype=torch.bfloat16)
    meta, num_splits = get_mla_metadata(
        cache_seqlens, s_q * h_q // h_kv, h_kv, num_heads_q=h_q, is_fp8_kvcache=True
    )
    for cache in (k_fp8, k_fp8.view(torch.float8_e4m3fn)):
        out, lse = flash_mla_with_kvcache(
            q, cache, block_table, cache_seqlens, dv, meta, num_splits, causal=True, is_fp8_kvcache=True
        )
        dequantized = ops.dequantize_mla_kv_fp8(k_fp8, d, dv)
        out_torch, lse_torch = ref_mla(q, dequantized, block_table, cache_seqlens, dv, h_q, h_kv, True)
        cal_diff(out, out_torch, "out")
        cal_diff(lse, lse_torch, "lse")


def test_fp8_flag_must_match_the_cache():
    cache_seqlens, block_table, blocked_k = blocked_cache(2, 1, 100, 1, 576, False, torch.bfloat16)
    q = torch.randn(2, 1, 16, 576, dtype=torch.bfloat16)
    meta, num_splits = get_mla_metadata(cache_seqlens, 16, 1)
    k_fp8 = ops.quantize_mla_kv_fp8(blocked_k, 512)
    with pytest.raises(ValueError, match="is_fp8_kvcache=True but k_cache has dtype torch.bfloat16"):
        flash_mla_with_kvcache(
            q, blocked_k, block_table, cache_seqlens, 512, meta, num_splits, is_fp8_kvcache=True
        )
    with pytest.raises(ValueError, match="is_fp8_kvcache=False but k_cache has dtype torch.uint8"):
        flash_mla_with_kvcache(q, k_fp8, block_table, cache_seqlens, 512, meta, num_splits)
    with pytest.raises(ValueError, match="must have 656 bytes per token"):
        flash_mla_with_kvcache(
            q, k_fp8[..., :640], block_table, cache_seqlens, 512, meta, num_splits, is_fp8_kvcache=True
        )

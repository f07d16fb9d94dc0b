"""FlashMLA's Python API (its first release's `get_mla_metadata` and `flash_mla_with_kvcache`, plus the
keywords its Sep-2025 version added) over dsv3.ops, so code written for FlashMLA runs unchanged, on CPU
tensors too.

Argument adaptation only; the semantics are FlashMLA's (SPEC §4). Where dsv3 differs:
  - any `d_qk` / `head_dim_v` and any `h_kv` dividing `h_q` on CPU (FlashMLA: 576 / 512 on SM90), and q in
    bfloat16, float16 or float32 with a cache of the same dtype;
  - nothing past `cache_seqlens` is read, and block-table entries past a request's pages are ignored, so
    unused entries may hold anything;
  - the FP8 cache (`is_fp8_kvcache=True`) is dsv3's packed layout, FlashMLA's 656-byte "V32" format for
    576 / 512 (e4m3 latent, fp32 scale per 128 values, bf16 rope), usable by the dense decode kernel;
  - the schedule is a plain pair of int32 tensors built for the device of `cache_seqlens` (CPU: one part per
    ATen thread), valid for those lengths only; a stale one raises instead of reading out of bounds.
"""

from __future__ import annotations

import torch

from .. import ops

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache"]

_FP8_CACHE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_heads_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])` for requests of lengths
    `cache_seqlens`; `num_heads_per_head_k` is s_q * h_q // h_kv. `num_heads_q` and `is_fp8_kvcache` (the
    Sep-2025 keywords) are accepted; the schedule does not depend on them."""
    return ops.get_mla_decode_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of `q [b, s_q, h_q, d]` over `k_cache [num_blocks, 64, h_kv, d]` (V = its first
    `head_dim_v` columns): `(out [b, s_q, h_q, head_dim_v] in q's dtype, softmax_lse fp32 [b, h_q, s_q])`.
    With `is_fp8_kvcache=True` the cache must be the packed FP8 layout (uint8 or float8_e4m3fn, last dim
    `mla_fp8_token_bytes(d, head_dim_v)`, e.g. from `dsv3.ops.quantize_mla_kv_fp8`)."""
    packed = k_cache.dtype in _FP8_CACHE_DTYPES
    if is_fp8_kvcache != packed:
        raise ValueError(
            f"flash_mla_with_kvcache: is_fp8_kvcache={is_fp8_kvcache} but k_cache has dtype {k_cache.dtype} "
            "(a packed FP8 cache is uint8 or float8_e4m3fn)"
        )
    if packed:
        token_bytes = ops.mla_fp8_token_bytes(q.shape[-1], head_dim_v)
        if k_cache.shape[-1] != token_bytes:
            raise ValueError(
                f"flash_mla_with_kvcache: an FP8 k_cache for d = {q.shape[-1]}, head_dim_v = {head_dim_v} "
                f"must have {token_bytes} bytes per token and head, got shape {tuple(k_cache.shape)}"
            )
    return ops.mla_decode(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        softmax_scale=softmax_scale,
        causal=causal,
        tile_scheduler_metadata=tile_scheduler_metadata,
        num_splits=num_splits,
    )

"""dsv3's functional ops. Each is a `torch.ops.dsv3.*` custom op with CPU, CUDA and Meta kernels; these
wrappers add torch-style conveniences (allocated outputs, optional `out=`). Arguments are validated in the
op's C++ entry, which raises ValueError/TypeError naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsv3)
from .reference import calc_diff, ceil_div, dequantize_mla_kv_fp8, mla_fp8_token_bytes

__all__ = [
    "calc_diff",
    "ceil_div",
    "quantize_per_token_group",
    "dequantize_per_token_group",
    "quantize_per_block",
    "dequantize_per_block",
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "fp8_gemm_wgrad_nt",
    "k_grouped_fp8_gemm_wgrad_nt",
    "get_mla_decode_metadata",
    "mla_decode",
    "quantize_mla_kv_fp8",
    "dequantize_mla_kv_fp8",
    "mla_fp8_token_bytes",
    "store_mla_kv",
    "moe_route",
]

_ops = torch.ops.dsv3


def quantize_per_token_group(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False, col_major_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 1 x `group_size` groups along the last dim to float8_e4m3fn.

    Returns `(q, scales)`: `q` has x's shape; `scales` is fp32 `[..., ceil(K / group_size)]` with
    `x ~= q * scales`. With `col_major_scales=True` the scales are MN-major with M padded to a multiple
    of 4 (DeepGEMM's TMA-aligned layout); values are identical either way.
    """
    return _ops.quantize_per_token_group(x, group_size, ue8m0, col_major_scales)


def dequantize_per_token_group(
    q: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    return _ops.dequantize_per_token_group(q, scales, group_size, out_dtype)


def quantize_per_block(
    w: torch.Tensor, block_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `block_size`² blocks of the last two dims; returns `(q, scale_inv)` (HF convention)."""
    return _ops.quantize_per_block(w, block_size, ue8m0)


def dequantize_per_block(
    q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    return _ops.dequantize_per_block(q, scale_inv, block_size, out_dtype)


def _out(out: torch.Tensor | None, shape, like: torch.Tensor, dtype: torch.dtype, zero: bool = False):
    if out is not None:
        return out
    alloc = torch.zeros if zero else torch.empty
    return alloc(shape, dtype=dtype, device=like.device)


def fp8_gemm_nt(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`out[m, n] = Σ_kb (A[m, kb]·B[n, kb]) · sa[m, kb] · sb[n // 128, kb]` (SPEC §3), bf16 or fp32 out.

    a: e4m3 `[M, K]`, sa: fp32 `[M, ceil(K/128)]` (row- or column-major), b: e4m3 `[N, K]`,
    sb: fp32 `[ceil(N/128), ceil(K/128)]`.
    """
    out = _out(out, (a.shape[0], b.shape[0]), a, out_dtype)
    _ops.fp8_gemm_nt(a, sa, b, sb, out)
    return out


def m_grouped_fp8_gemm_nt_contiguous(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    m_indices: torch.Tensor,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Row r of `a [ΣM, K]` is multiplied by group `m_indices[r]` of `b [G, N, K]`; `-1` rows give zeros."""
    out = _out(out, (a.shape[0], b.shape[1]), a, out_dtype)
    _ops.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, out)
    return out


def m_grouped_fp8_gemm_nt_masked(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Group g computes rows `[0, masked_m[g])` of `a [G, M_max, K]`; other rows of `out` are untouched
    (zeros when `out` is allocated here). `expected_m` is a hint for the kernel configuration."""
    out = _out(out, (a.shape[0], a.shape[1], b.shape[1]), a, out_dtype, zero=True)
    _ops.m_grouped_fp8_gemm_nt_masked(
        a, sa, b, sb, masked_m, a.shape[1] if expected_m is None else expected_m, out
    )
    return out


def fp8_gemm_wgrad_nt(
    a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`out += A·Bᵀ` in fp32, 1x128 scales on both operands: sa `[M, ceil(K/128)]`, sb `[N, ceil(K/128)]`."""
    out = _out(out, (a.shape[0], b.shape[0]), a, torch.float32, zero=True)
    _ops.fp8_gemm_wgrad_nt(a, sa, b, sb, out)
    return out


def k_grouped_fp8_gemm_wgrad_nt(
    a: torch.Tensor,
    sa: torch.Tensor,
    b: torch.Tensor,
    sb: torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE weight gradient: `out[g] += A_g·B_gᵀ` where group g owns K columns `[Σ_{j<g} ks[j], +ks[g])` of
    `a [M, ΣK]` and `b [N, ΣK]`; its scales are columns `[Σ_{j<g} ceil(ks[j]/128), ...)` of sa and sb."""
    ks = [int(k) for k in (ks.tolist() if isinstance(ks, torch.Tensor) else ks)]
    out = _out(out, (len(ks), a.shape[0], b.shape[0]), a, torch.float32, zero=True)
    _ops.k_grouped_fp8_gemm_wgrad_nt(a, sa, b, sb, ks, out)
    return out


def get_mla_decode_metadata(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_sm_parts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV schedule for `mla_decode` over requests of lengths `cache_seqlens` (int32 [b]):
    `(tile_scheduler_metadata int32 [parts, 8], num_splits int32 [b + 1])`, on cache_seqlens' device.

    `num_q_tokens_per_head_k` is s_q * h_q / h_kv (the query rows packed per KV head). Parts default to the
    device's workers: SMs / (h_kv * ceil(rows / 64)) on a GPU, ATen threads on a CPU; `num_sm_parts` sets
    them (any value gives the same attention result). Reuse the schedule across layers of one decode step.
    """
    return _ops.get_mla_decode_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    tile_scheduler_metadata: torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent cache (SPEC §4, FlashMLA semantics).

    q `[b, s_q, h_q, d_qk]`; kv_cache `[pages, 64, h_kv, d_qk]` in q's dtype, or the packed FP8 layout
    `uint8 [pages, 64, h_kv, mla_fp8_token_bytes(d_qk, head_dim_v)]` (see `quantize_mla_kv_fp8`); V is the
    first `head_dim_v` columns of K. block_table int32 `[b, max_pages]`, cache_seqlens int32 `[b]`.
    Returns `(out [b, s_q, h_q, head_dim_v] in q's dtype, lse fp32 [b, h_q, s_q])`, natural-log lse; a
    query that sees no key gets out 0, lse +inf. The schedule is computed when not given.
    """
    return _ops.mla_decode(
        q,
        kv_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        softmax_scale,
        causal,
        tile_scheduler_metadata,
        num_splits,
    )


def quantize_mla_kv_fp8(kv: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """Pack latent KV rows `kv [..., d_qk]` into the FP8 cache layout `uint8 [..., mla_fp8_token_bytes]`:
    the first `head_dim_v` values as e4m3 in 1 x 128 groups with fp32 scales (SPEC §2), the rope rest as
    bf16. Bit-identical to `dsv3.ops.reference.quantize_mla_kv_fp8`."""
    if not 0 < head_dim_v <= kv.shape[-1]:
        raise ValueError(f"quantize_mla_kv_fp8: head_dim_v must be in [1, {kv.shape[-1]}], got {head_dim_v}")
    q, s = quantize_per_token_group(kv[..., :head_dim_v].contiguous(), 128)
    rope = kv[..., head_dim_v:].to(torch.bfloat16).contiguous()
    return torch.cat([q.view(torch.uint8), s.view(torch.uint8), rope.view(torch.uint8)], dim=-1)


def store_mla_kv(
    kv_cache: torch.Tensor, kv: torch.Tensor, slots: torch.Tensor, head_dim_v: int | None = None
) -> None:
    """Write token rows `kv [n, h_kv, d_qk]` into the paged cache at flat `slots` (int [n], slot = page * 64
    + offset), quantizing them when the cache is the packed FP8 layout (then `head_dim_v` is required)."""
    pages, page_size, h_kv = kv_cache.shape[:3]
    if kv.dim() != 3 or kv.shape[1] != h_kv:
        raise ValueError(f"store_mla_kv: kv must be [n, h_kv={h_kv}, d_qk], got shape {tuple(kv.shape)}")
    if slots.shape != (kv.shape[0],):
        raise ValueError(f"store_mla_kv: slots must have shape [n={kv.shape[0]}], got {tuple(slots.shape)}")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= pages * page_size):
        raise ValueError(f"store_mla_kv: slots must be in [0, {pages * page_size}), got {slots.tolist()[:8]}")
    if kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        if head_dim_v is None:
            raise ValueError("store_mla_kv: head_dim_v is required for an FP8 cache")
        rows = quantize_mla_kv_fp8(kv, head_dim_v).view(kv_cache.dtype)
    else:
        rows = kv.to(kv_cache.dtype)
    if rows.shape[-1] != kv_cache.shape[-1]:
        raise ValueError(
            f"store_mla_kv: kv rows have {rows.shape[-1]} values/bytes per head, "
            f"the cache has {kv_cache.shape[-1]}"
        )
    slots = slots.to(device=kv_cache.device, dtype=torch.long)
    if kv_cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernels: copy the bytes
        kv_cache, rows = kv_cache.view(torch.uint8), rows.view(torch.uint8)
    kv_cache.view(pages * page_size, h_kv, -1).index_copy_(0, slots, rows)


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    top_k: int = 8,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's MoE router (SPEC §5) on fp32 router logits `[T, E]` (x·Wᵀ) and the fp32
    `e_score_correction_bias [E]` (None: zeros). Returns `(topk_idx int64 [T, top_k], topk_weights fp32
    [T, top_k])`, each token's experts best first (biased score descending, ties to the lower index).
    The semantics, NaN handling and the differences from transformers: `dsv3.ops.reference.moe_route`."""
    return _ops.moe_route(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)

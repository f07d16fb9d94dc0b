"""dsv3's functional ops. Each is a `torch.ops.dsv3.*` custom op with CPU, CUDA and Meta kernels; these
wrappers add torch-style conveniences (allocated outputs, optional `out=`). Arguments are validated in the
op's C++ entry, which raises ValueError/TypeError naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _C  # noqa: F401  (registers torch.ops.dsv3)
from .reference import calc_diff, ceil_div

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

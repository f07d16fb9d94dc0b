"""DeepGEMM's Python API (the v1 names and the v2 ones) over dsv3.ops, so code written for DeepGEMM runs
unchanged, on CPU tensors too.

Argument adaptation only: the `(fp8 tensor, fp32 scales)` pairs are unpacked, DeepGEMM's flat k-grouped
buffers are laid out as dsv3's `[M, ΣK]` operands, and v2's `D = C + A @ B` is honoured. Arguments that only
steer DeepGEMM's kernel selection or JIT (`compiled_dims`, `disable_ue8m0_cast`, `expected_m`) are accepted
and ignored. Scale tensors may be row-major or in the column-major TMA layout, as DeepGEMM accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..ops.reference import ceil_div

__all__ = [
    # v2 names
    "fp8_gemm_nt",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_nt_contiguous",
    # v1 names
    "gemm_fp8_fp8_bf16_nt",
    "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous",
    "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
    "wgrad_gemm_fp8_fp8_fp32_nt",
    "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt",
    # helpers
    "align",
    "calc_diff",
    "ceil_div",
    "ceil_to_ue8m0",
    "get_col_major_tma_aligned_tensor",
    "get_m_alignment_for_contiguous_layout",
    "get_mk_alignment_for_contiguous_layout",
    "get_mn_major_tma_aligned_tensor",
    "get_num_sms",
    "get_tma_aligned_size",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "set_num_sms",
]

FP8Pair = tuple[torch.Tensor, torch.Tensor]
Recipe = tuple[int, int, int]

_BLOCK_SCALED_RECIPE = (1, 128, 128)  # SM90 default: 1x128 activations, 128x128 weight blocks
_PER_ROW_RECIPE = (1, 1, 128)  # 1x128 scales on both operands (DeepGEMM's "1D1D" wgrad kernel)
_TMA_ALIGNMENT_BYTES = 16

calc_diff = ops.calc_diff


# --------------------------------------------------------------------------------------------------
# Helpers


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group's segment in the contiguous grouped layout (DeepGEMM: always 128).
    dsv3's CPU kernels accept any grouping; aligned segments are what the GPU kernels expect."""
    return 128


get_mk_alignment_for_contiguous_layout = get_m_alignment_for_contiguous_layout  # the v2 name

_num_sms: int | None = None


def _device_sm_count() -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def set_num_sms(num_sms: int) -> None:
    """Record the SM budget for the GEMMs (DeepGEMM's knob). dsv3's kernels size their launches themselves,
    so the value is only kept for `get_num_sms`; on a GPU it must not exceed the device's SM count."""
    global _num_sms
    limit = _device_sm_count()
    if num_sms <= 0 or (limit is not None and num_sms > limit):
        raise ValueError(f"set_num_sms: num_sms must be in [1, {limit or 'inf'}], got {num_sms}")
    _num_sms = int(num_sms)


def get_num_sms() -> int:
    """The value given to `set_num_sms`; if none was, the SM count of the current GPU, or on a machine
    without a GPU the number of CPU threads the kernels run on (`torch.get_num_threads()`)."""
    if _num_sms is not None:
        return _num_sms
    return _device_sm_count() or torch.get_num_threads()


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """`x` rounded up so that `x * element_size` bytes is a multiple of 16 (TMA's address alignment)."""
    if element_size <= 0 or _TMA_ALIGNMENT_BYTES % element_size != 0:
        raise ValueError(f"get_tma_aligned_size: element_size must divide 16, got {element_size}")
    return align(x, _TMA_ALIGNMENT_BYTES // element_size)


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """`x` (`[m, k]` or `[b, m, k]`, usually the LHS scales) with the same values stored MN-major, `m`
    padded to the TMA alignment: strides `(1, aligned_m)` or `(aligned_m * k, 1, aligned_m)`. Returns `x`
    itself when it already has that layout, else a copy."""
    if x.dim() not in (2, 3):
        raise ValueError(
            f"get_col_major_tma_aligned_tensor: x must be 2-D or 3-D, got shape {tuple(x.shape)}"
        )
    m, k = x.shape[-2:]
    aligned_m = get_tma_aligned_size(m, x.element_size())
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    if x3.stride()[1:] == (1, aligned_m) and (x3.size(0) == 1 or x3.stride(0) == aligned_m * k):
        return x
    storage = torch.zeros(x3.size(0), k, aligned_m, dtype=x.dtype, device=x.device)
    aligned = storage.transpose(1, 2)[:, :m, :]
    aligned.copy_(x3)
    return aligned.squeeze(0) if x.dim() == 2 else aligned


get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor  # the v2 name


def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """|x| rounded up to a power of two that UE8M0 holds (2^-126 .. 2^127), elementwise, in fp32."""
    bits = x.abs().float().view(torch.int32)  # sign bit clear: bits = biased exponent << 23 | mantissa
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def per_token_cast_to_fp8(
    x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128, use_packed_ue8m0: bool = False
) -> FP8Pair:
    """`(x_fp8, sf)` for 1 x `gran_k` groups, `sf = max(amax, 1e-4) / 448` fp32 `[m, ceil(k / gran_k)]`
    (row-major), `x ≈ x_fp8 * sf`: `dsv3.ops.quantize_per_token_group`. The scales are DeepGEMM's bit for bit;
    a value of `x_fp8` may differ by one fp8 step where DeepGEMM's `x * (1 / sf)` and dsv3's `x / sf` round
    differently (v1's `x * (448 / amax)` likewise)."""
    if use_packed_ue8m0:
        raise ValueError(
            "per_token_cast_to_fp8: use_packed_ue8m0 (SM100 packed scales) is not supported by dsv3"
        )
    return ops.quantize_per_token_group(x, gran_k, use_ue8m0)


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False, gran_k: int = 128) -> FP8Pair:
    """`(x_fp8, sf)` for `gran_k`² blocks, `sf` fp32 `[ceil(m / gran_k), ceil(k / gran_k)]` with
    `x ≈ x_fp8 * sf`: `dsv3.ops.quantize_per_block` (same rounding note as `per_token_cast_to_fp8`)."""
    return ops.quantize_per_block(x, gran_k, use_ue8m0)


# --------------------------------------------------------------------------------------------------
# Argument adaptation


def _pair(x: FP8Pair, name: str) -> FP8Pair:
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise TypeError(
            f"{name} must be a (float8_e4m3fn tensor, float32 scales) pair, got {type(x).__name__}"
        )
    return x[0], x[1]


def _per_row_b_scales(recipe: Recipe | None, op: str) -> bool:
    """True for the (1, 1, 128) recipe (B scaled per row, like A), False for the default block-scaled one."""
    recipe = None if recipe is None else tuple(recipe)
    if recipe in (None, _BLOCK_SCALED_RECIPE, _PER_ROW_RECIPE):
        return recipe == _PER_ROW_RECIPE
    raise ValueError(f"{op}: recipe must be None, {_BLOCK_SCALED_RECIPE} or {_PER_ROW_RECIPE}, got {recipe}")


def _load_c(d: torch.Tensor, c: torch.Tensor | None) -> None:
    """Prepare `d` for an accumulating kernel computing `D = C + A·Bᵀ`."""
    if c is None:
        d.zero_()
    elif c is not d:
        d.copy_(c)


def _mn_major_scales(scales: torch.Tensor, mn: int, k: int) -> torch.Tensor:
    """1x128 scales given as `[mn, ceil(k/128)]` or, as DeepGEMM's wgrad also takes them, `[ceil(k/128), mn]`.
    A square tensor is read as the transposed form when stored row-major, as DeepGEMM does."""
    kb = ceil_div(k, 128)
    if tuple(scales.shape) == (kb, mn) and (kb != mn or scales.stride(-1) == 1):
        return scales.t()
    return scales


def _k_grouped_operand(flat: torch.Tensor, ks: Sequence[int], rows: int, name: str) -> torch.Tensor:
    """DeepGEMM stores group g of a k-grouped operand as a row-major `[rows, ks[g]]` block, the blocks back to
    back in one flat buffer; dsv3 takes the groups side by side as the columns of one `[rows, ΣK]` matrix."""
    if any(k < 0 for k in ks):
        raise ValueError(f"{name}: ks must be non-negative, got {list(ks)}")
    flat = flat.reshape(-1)
    if flat.numel() != rows * sum(ks):
        raise ValueError(f"{name} must hold rows * sum(ks) = {rows * sum(ks)} elements, got {flat.numel()}")
    if not ks:
        return flat.view(rows, 0)
    blocks = flat.split([rows * k for k in ks])
    return torch.cat([block.view(rows, k) for block, k in zip(blocks, ks, strict=True)], dim=1)


# --------------------------------------------------------------------------------------------------
# v2 API


def fp8_gemm_nt(
    a: FP8Pair,
    b: FP8Pair,
    d: torch.Tensor,
    c: torch.Tensor | None = None,
    recipe: Recipe | None = None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
) -> None:
    """`D = C + A @ Bᵀ` into `d` (bf16 or fp32). `a = (fp8 [m, k], sfa fp32 [m, ceil(k/128)])`,
    `b = (fp8 [n, k], sfb fp32 [ceil(n/128), ceil(k/128)])`; with `recipe=(1, 1, 128)` sfb is per row,
    `[n, ceil(k/128)]`, and `d` must be fp32. A `c is d` with fp32 `d` accumulates in place; otherwise the
    fp32 product is added to `c` and rounded once into `d`."""
    (qa, sa), (qb, sb) = _pair(a, "a"), _pair(b, "b")
    if _per_row_b_scales(recipe, "fp8_gemm_nt"):
        _load_c(d, c)
        ops.fp8_gemm_wgrad_nt(qa, sa, qb, sb, out=d)
    elif c is None:
        ops.fp8_gemm_nt(qa, sa, qb, sb, out=d)
    else:
        product = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32)
        if c is d and d.dtype == torch.float32:
            d.add_(product)
        else:
            d.copy_(c.float() + product)


def m_grouped_fp8_gemm_nt_contiguous(
    a: FP8Pair,
    b: FP8Pair,
    d: torch.Tensor,
    m_indices: torch.Tensor | None = None,
    recipe: Recipe | None = None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
    use_psum_layout: bool = False,
    *,
    grouped_layout: torch.Tensor | None = None,
) -> None:
    """Row r of `a = (fp8 [Σm, k], sfa)` times group `m_indices[r]` of `b = (fp8 [G, n, k], sfb [G, ...])`
    into `d [Σm, n]`; `-1` rows come out zero. The index tensor may be passed as `m_indices` (v1, v2.0) or
    `grouped_layout` (v2 HEAD)."""
    if (m_indices is None) == (grouped_layout is None):
        raise TypeError("m_grouped_fp8_gemm_nt_contiguous: pass exactly one of m_indices and grouped_layout")
    if use_psum_layout:
        raise ValueError("m_grouped_fp8_gemm_nt_contiguous: use_psum_layout=True is not supported by dsv3")
    if _per_row_b_scales(recipe, "m_grouped_fp8_gemm_nt_contiguous"):
        raise ValueError("m_grouped_fp8_gemm_nt_contiguous: recipe (1, 1, 128) is not supported by dsv3")
    (qa, sa), (qb, sb) = _pair(a, "a"), _pair(b, "b")
    indices = m_indices if m_indices is not None else grouped_layout
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, indices, out=d)


def m_grouped_fp8_gemm_nt_masked(
    a: FP8Pair,
    b: FP8Pair,
    d: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
    recipe: Recipe | None = None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
) -> None:
    """Group g computes rows `[0, masked_m[g])` of `a = (fp8 [G, m_max, k], sfa [G, m_max, ...])` against
    `b = (fp8 [G, n, k], sfb)` into `d [G, m_max, n]`; the other rows of `d` are left untouched."""
    if _per_row_b_scales(recipe, "m_grouped_fp8_gemm_nt_masked"):
        raise ValueError("m_grouped_fp8_gemm_nt_masked: recipe (1, 1, 128) is not supported by dsv3")
    (qa, sa), (qb, sb) = _pair(a, "a"), _pair(b, "b")
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, expected_m, out=d)


def k_grouped_fp8_gemm_nt_contiguous(
    a: FP8Pair,
    b: FP8Pair,
    d: torch.Tensor,
    ks_cpu: Sequence[int],
    grouped_layout: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    recipe: Recipe = _PER_ROW_RECIPE,
    compiled_dims: str = "mn",
    use_psum_layout: bool = False,
) -> None:
    """MoE weight gradient, `D[g] = C[g] + A_g @ B_gᵀ` with fp32 `d [G, m, n]`. As in DeepGEMM (SM90,
    K-major): `a[0]` is flat, group g's `[m, ks_cpu[g]]` row-major block after the previous groups' ones;
    `a[1]` is fp32 `[m, Σ ceil(ks/128)]`; likewise `b` with n. `grouped_layout` (the sizes on the device) is
    not needed: the sizes are read from `ks_cpu`, which here need not be multiples of 128."""
    op = "k_grouped_fp8_gemm_nt_contiguous"
    if not _per_row_b_scales(recipe, op):
        raise ValueError(f"{op}: recipe must be {_PER_ROW_RECIPE}, got {recipe}")
    if use_psum_layout:
        raise ValueError(f"{op}: use_psum_layout=True is not supported by dsv3")
    (qa, sa), (qb, sb) = _pair(a, "a"), _pair(b, "b")
    ks = [int(k) for k in ks_cpu]
    _, m, n = d.shape
    qa, qb = _k_grouped_operand(qa, ks, m, f"{op}: a"), _k_grouped_operand(qb, ks, n, f"{op}: b")
    _load_c(d, c)
    ops.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks, out=d)


# --------------------------------------------------------------------------------------------------
# v1 API


def gemm_fp8_fp8_bf16_nt(lhs: FP8Pair, rhs: FP8Pair, out: torch.Tensor) -> None:
    """`out = lhs @ rhsᵀ`: lhs `(fp8 [m, k], fp32 [m, ceil(k/128)])`, rhs `(fp8 [n, k], fp32 [ceil(n/128),
    ceil(k/128)])`, out bf16 `[m, n]`."""
    fp8_gemm_nt(lhs, rhs, out)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(
    lhs: FP8Pair, rhs: FP8Pair, out: torch.Tensor, m_indices: torch.Tensor
) -> None:
    m_grouped_fp8_gemm_nt_contiguous(lhs, rhs, out, m_indices)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(
    lhs: FP8Pair, rhs: FP8Pair, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int
) -> None:
    m_grouped_fp8_gemm_nt_masked(lhs, rhs, out, masked_m, expected_m)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs: FP8Pair, rhs: FP8Pair, out: torch.Tensor) -> None:
    """`out += lhs @ rhsᵀ` in fp32 with 1x128 scales on both operands, given as `[mn, ceil(k/128)]` (either
    layout) or `[ceil(k/128), mn]`."""
    (qa, sa), (qb, sb) = _pair(lhs, "lhs"), _pair(rhs, "rhs")
    k = qa.shape[-1]
    sa, sb = _mn_major_scales(sa, qa.shape[0], k), _mn_major_scales(sb, qb.shape[0], k)
    ops.fp8_gemm_wgrad_nt(qa, sa, qb, sb, out=out)


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(
    lhs: FP8Pair, rhs: FP8Pair, out: torch.Tensor, batch_sizes: Sequence[int]
) -> None:
    """`out[g] += lhs_g @ rhs_gᵀ`, fp32 `out [G, m, n]`: lhs is `(flat fp8 holding the row-major [m, k_g]
    blocks back to back, fp32 scales [Σ ceil(k_g/128), m])`, rhs likewise with n; `batch_sizes` lists the
    k_g."""
    op = "k_grouped_wgrad_gemm_fp8_fp8_fp32_nt"
    (qa, sa), (qb, sb) = _pair(lhs, "lhs"), _pair(rhs, "rhs")
    ks = [int(k) for k in batch_sizes]
    _, m, n = out.shape
    qa, qb = _k_grouped_operand(qa, ks, m, f"{op}: lhs"), _k_grouped_operand(qb, ks, n, f"{op}: rhs")
    ops.k_grouped_fp8_gemm_wgrad_nt(qa, sa.t(), qb, sb.t(), ks, out=out)

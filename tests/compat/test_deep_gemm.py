"""dsv3.compat.deep_gemm, called the way DeepGEMM's own tests call DeepGEMM (cast with the per-token/per-block
helpers, move the LHS scales into the TMA layout, GEMM into a preallocated output, `calc_diff < 0.001` against
the bf16 product), on CPU tensors: every v1 and v2 name, and the helpers' values and strides."""

from __future__ import annotations

import inspect
import random

import pytest
import torch

from dsv3 import ops
from dsv3.compat import deep_gemm
from dsv3.compat.deep_gemm import (
    calc_diff,
    ceil_div,
    get_col_major_tma_aligned_tensor,
    get_m_alignment_for_contiguous_layout,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

FP8 = torch.float8_e4m3fn
MAX_DIFF = 0.001  # DeepGEMM's bound for FP8 x FP8 against the unquantized product


def bf16_randn(*shape) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.bfloat16)


def construct(m: int, k: int, n: int):
    x, y = bf16_randn(m, k), bf16_randn(n, k)
    x_fp8, y_fp8 = per_token_cast_to_fp8(x), per_block_cast_to_fp8(y)
    x_fp8 = (x_fp8[0], get_col_major_tma_aligned_tensor(x_fp8[1]))
    return x_fp8, y_fp8, torch.empty((m, n), dtype=torch.bfloat16), x @ y.t()


def cast_groups(x: torch.Tensor, cast):
    """Cast each group of a [G, rows, k] tensor separately into preallocated fp8 + scales."""
    num_groups, rows, k = x.shape
    scale_rows = rows if cast is per_token_cast_to_fp8 else ceil_div(rows, 128)
    x_fp8 = (torch.empty_like(x, dtype=FP8), torch.empty((num_groups, scale_rows, ceil_div(k, 128))))
    for i in range(num_groups):
        x_fp8[0][i], x_fp8[1][i] = cast(x[i])
    return x_fp8


# --------------------------------------------------------------------------------------------------
# Dense

GEMM_SHAPES = [(1, 7168, 2112), (64, 1536, 576), (128, 512, 256), (3, 2048, 7168)]


@pytest.mark.parametrize("gemm", ["gemm_fp8_fp8_bf16_nt", "fp8_gemm_nt"])
@pytest.mark.parametrize("m, k, n", GEMM_SHAPES)
def test_gemm(gemm, m, k, n):
    x_fp8, y_fp8, out, ref_out = construct(m, k, n)
    getattr(deep_gemm, gemm)(x_fp8, y_fp8, out)
    assert calc_diff(out, ref_out) < MAX_DIFF


@pytest.mark.parametrize("c_is_d", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_nt_adds_c(out_dtype, c_is_d):
    """v2 convention `D = C + A @ B`: accumulation in place when `c is d`, else `d = c + A @ B`."""
    m, k, n = 64, 512, 256
    x, y = bf16_randn(m, k), bf16_randn(n, k)
    c = (torch.randn((m, n)) * 32).to(out_dtype)
    d = c if c_is_d else torch.empty((m, n), dtype=out_dtype)
    ref_d = c.float() + x.float() @ y.float().t()
    x_fp8, y_fp8 = per_token_cast_to_fp8(x), per_block_cast_to_fp8(y)
    product = ops.fp8_gemm_nt(*x_fp8, *y_fp8, out_dtype=torch.float32)
    expected = (c.float() + product).to(out_dtype)  # exactly one rounding into d's dtype
    deep_gemm.fp8_gemm_nt(x_fp8, y_fp8, d, c=c)
    assert calc_diff(d, ref_d) < MAX_DIFF
    assert torch.equal(d, expected)


@pytest.mark.parametrize("with_c", [True, False])
def test_fp8_gemm_nt_per_row_recipe(with_c):
    """recipe (1, 1, 128): 1x128 scales on B too (DeepGEMM's 1D1D kernel), fp32 D = C + A @ B."""
    m, k, n = 64, 640, 192
    x, y = bf16_randn(m, k), bf16_randn(n, k)
    c = torch.randn((m, n)) * 32 if with_c else None
    d = torch.full((m, n), float("nan"))
    deep_gemm.fp8_gemm_nt(per_token_cast_to_fp8(x), per_token_cast_to_fp8(y), d, c=c, recipe=(1, 1, 128))
    ref_d = x.float() @ y.float().t() + (c if with_c else 0)
    assert calc_diff(d, ref_d) < MAX_DIFF


# --------------------------------------------------------------------------------------------------
# Grouped


def construct_contiguous_grouped(num_groups: int, expected_m_per_group: int, k: int, n: int):
    """Segments aligned to 128 rows, the rows past each group's real size marked -1 (DeepGEMM HEAD's
    layout)."""
    alignment = get_m_alignment_for_contiguous_layout()
    actual_ms = [int(expected_m_per_group * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    aligned_ms = [ceil_div(m, alignment) * alignment for m in actual_ms]
    m = sum(aligned_ms)
    x, y = bf16_randn(m, k), bf16_randn(num_groups, n, k)
    m_indices = torch.empty(m, dtype=torch.int32)
    ref_out = torch.zeros((m, n), dtype=torch.bfloat16)
    start = 0
    for i, (actual_m, aligned_m) in enumerate(zip(actual_ms, aligned_ms, strict=True)):
        m_indices[start : start + actual_m] = i
        m_indices[start + actual_m : start + aligned_m] = -1
        ref_out[start : start + actual_m] = x[start : start + actual_m] @ y[i].t()
        start += aligned_m
    x_fp8 = per_token_cast_to_fp8(x)
    y_fp8 = cast_groups(y, per_block_cast_to_fp8)
    return m, x_fp8, y_fp8, m_indices, torch.empty((m, n), dtype=torch.bfloat16), ref_out


CONTIGUOUS_CALLS = {
    "v1": lambda a, b, d, idx: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, b, d, idx),
    "v2": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, idx),
    "v2-grouped_layout": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
        a, b, d, grouped_layout=idx
    ),
    "v2.0-m_indices": lambda a, b, d, idx: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices=idx),
}


@pytest.mark.parametrize("call", CONTIGUOUS_CALLS)
def test_m_grouped_gemm_contiguous(call):
    m, x_fp8, y_fp8, m_indices, out, ref_out = construct_contiguous_grouped(3, 128, 512, 256)
    CONTIGUOUS_CALLS[call](x_fp8, y_fp8, out, m_indices)
    assert not out[m_indices == -1].any()
    assert calc_diff(out, ref_out) < MAX_DIFF


@pytest.mark.parametrize("gemm", ["m_grouped_gemm_fp8_fp8_bf16_nt_masked", "m_grouped_fp8_gemm_nt_masked"])
def test_m_grouped_gemm_masked(gemm):
    num_groups, max_m, k, n = 2, 64, 512, 256
    x, y = bf16_randn(num_groups, max_m, k), bf16_randn(num_groups, n, k)
    ref_out = torch.einsum("gmk,gnk->gmn", x, y)
    x_fp8, y_fp8 = cast_groups(x, per_token_cast_to_fp8), cast_groups(y, per_block_cast_to_fp8)
    x_fp8 = (x_fp8[0], get_col_major_tma_aligned_tensor(x_fp8[1]))
    for _ in range(3):
        masked_m = torch.tensor([random.randint(1, max_m) for _ in range(num_groups)], dtype=torch.int32)
        out = torch.full((num_groups, max_m, n), 7.0, dtype=torch.bfloat16)
        getattr(deep_gemm, gemm)(x_fp8, y_fp8, out, masked_m, 32)
        for j in range(num_groups):
            valid = masked_m[j].item()
            assert calc_diff(out[j, :valid], ref_out[j, :valid]) < MAX_DIFF
            assert (out[j, valid:] == 7.0).all()


# --------------------------------------------------------------------------------------------------
# Weight gradients


@pytest.mark.parametrize("scales_transposed", [False, True])
def test_wgrad_gemm(scales_transposed):
    m, k, n = 64, 1000, 192
    x, y = bf16_randn(m, k), bf16_randn(n, k)
    residual = torch.randn((m, n)) * 10
    out, ref_out = residual.clone(), residual + x.float() @ y.float().t()
    x_fp8, y_fp8 = per_token_cast_to_fp8(x), per_token_cast_to_fp8(y)
    if scales_transposed:  # DeepGEMM also takes [ceil(k/128), mn] scales (the k-grouped form)
        x_fp8, y_fp8 = (x_fp8[0], x_fp8[1].t().contiguous()), (y_fp8[0], y_fp8[1].t().contiguous())
    deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(x_fp8, y_fp8, out)
    assert calc_diff(out, ref_out) < MAX_DIFF


def construct_k_grouped(m: int, n: int, k_sizes: list[int]):
    """Flat fp8 buffers holding each group's row-major [m, k_g] (and [n, k_g]) block back to back, scales
    [Σ ceil(k_g/128), mn] (DeepGEMM v1's k-grouped wgrad inputs), and the per-group fp32 references."""
    xs = [bf16_randn(m, k) for k in k_sizes]
    ys = [bf16_randn(n, k) for k in k_sizes]
    ref_out = torch.stack([x.float() @ y.float().t() for x, y in zip(xs, ys, strict=True)])

    def flat_cast(chunks):
        casts = [per_token_cast_to_fp8(chunk) for chunk in chunks]
        return torch.cat([q.flatten() for q, _ in casts]), torch.cat([s.t() for _, s in casts])

    return flat_cast(xs), flat_cast(ys), ref_out


@pytest.mark.parametrize("k_sizes", [[256, 384, 128], [512, 0, 200]], ids=str)
def test_k_grouped_wgrad_gemm(k_sizes):
    m, n = 64, 192
    x_fp8, y_fp8, ref_out = construct_k_grouped(m, n, k_sizes)
    residual = torch.randn((len(k_sizes), m, n))
    out = residual.clone()
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(x_fp8, y_fp8, out, k_sizes)
    for i, k in enumerate(k_sizes):
        if k:
            assert calc_diff(out[i], residual[i] + ref_out[i]) < MAX_DIFF
        else:
            assert torch.equal(out[i], residual[i])


@pytest.mark.parametrize("c_is_d", [True, False])
@pytest.mark.parametrize("ks", [[256, 384, 128], [384, 0, 128]], ids=str)
def test_k_grouped_fp8_gemm_nt_contiguous(ks, c_is_d):
    """v2 (SM90, K-major): same flat operands, scales [mn, Σ ceil(k/128)], `d = c + Σ_g A_g B_gᵀ`."""
    m, n = 64, 192
    (a, sfa_t), (b, sfb_t), ref_prod = construct_k_grouped(m, n, ks)
    c = torch.randn((len(ks), m, n)) * 32
    d = c if c_is_d else torch.empty_like(c)
    ref_d = c + ref_prod
    grouped_layout = torch.tensor(ks, dtype=torch.int32)
    deep_gemm.k_grouped_fp8_gemm_nt_contiguous((a, sfa_t.T), (b, sfb_t.T), d, ks, grouped_layout, c)
    assert calc_diff(d, ref_d) < MAX_DIFF


# --------------------------------------------------------------------------------------------------
# Helpers


def test_alignment_helpers():
    assert get_m_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == 128
    assert [ceil_div(x, 128) for x in (0, 1, 128, 129)] == [0, 1, 1, 2]
    assert deep_gemm.align(129, 128) == 256


@pytest.mark.parametrize(
    "x, element_size, expected", [(1, 4, 4), (4, 4, 4), (129, 4, 132), (3, 2, 8), (17, 1, 32), (0, 4, 0)]
)
def test_get_tma_aligned_size(x, element_size, expected):
    assert deep_gemm.get_tma_aligned_size(x, element_size) == expected


@pytest.mark.parametrize("shape", [(1, 3), (3, 2), (4, 1), (129, 56), (2, 5, 3), (3, 8, 2)], ids=str)
def test_get_col_major_tma_aligned_tensor(shape):
    x = torch.randn(shape)
    aligned = get_col_major_tma_aligned_tensor(x)
    m, k = shape[-2:]
    aligned_m = ceil_div(m, 4) * 4
    expected_strides = (1, aligned_m) if len(shape) == 2 else (aligned_m * k, 1, aligned_m)
    assert aligned.shape == x.shape and aligned.stride() == expected_strides
    assert torch.equal(aligned, x)
    assert get_col_major_tma_aligned_tensor(aligned) is aligned  # already in the layout: no copy


@pytest.mark.parametrize("shape", [(5, 200), (2, 7, 300)], ids=str)
def test_tma_layout_of_quantize_ops_is_accepted_as_is(shape):
    _, scales = ops.quantize_per_token_group(torch.randn(shape), col_major_scales=True)
    assert get_col_major_tma_aligned_tensor(scales) is scales


def test_num_sms(monkeypatch):
    monkeypatch.setattr(deep_gemm, "_num_sms", None)
    default = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None
    assert deep_gemm.get_num_sms() == (default or torch.get_num_threads())
    deep_gemm.set_num_sms(1)
    assert deep_gemm.get_num_sms() == 1
    with pytest.raises(ValueError, match="num_sms"):
        deep_gemm.set_num_sms(0)


def test_calc_diff():
    x = torch.randn(100, dtype=torch.float64)
    assert calc_diff(x, x) == 0
    assert abs(calc_diff(x, -x) - 2) < 1e-12
    assert abs(calc_diff(x, x * 1.01) - 1 + 2 * 1.01 / (1 + 1.01**2)) < 1e-12


def test_ceil_to_ue8m0():
    s = torch.tensor([1.0, 1.5, 0.75, 3e-9, 0.0, -0.3, 2.0**-130, float("inf"), 2.0**127 * 1.5])
    expected = torch.tensor([1.0, 2.0, 1.0, 2.0**-28, 2.0**-126, 0.5, 2.0**-126, 2.0**127, 2.0**127])
    assert torch.equal(deep_gemm.ceil_to_ue8m0(s), expected)


def deep_gemm_casts(x: torch.Tensor, sf_rows: int, use_ue8m0: bool):
    """DeepGEMM's cast written out: groups of 128 rows by 128 columns (rows 1 for the per-token cast),
    sf = max(amax, 1e-4) / 448 (optionally rounded up to a power of two), fp8 = x * (1 / sf)."""
    m, k = x.shape
    padded = torch.zeros(ceil_div(m, sf_rows) * sf_rows, ceil_div(k, 128) * 128)
    padded[:m, :k] = x.float()
    blocks = padded.view(padded.shape[0] // sf_rows, sf_rows, -1, 128)
    sf = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / 448
    sf = deep_gemm.ceil_to_ue8m0(sf) if use_ue8m0 else sf
    x_fp8 = (blocks * (1.0 / sf)).to(FP8).view_as(padded)[:m, :k]
    return x_fp8, sf.view(blocks.shape[0], blocks.shape[2])


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("cast, sf_rows", [(per_token_cast_to_fp8, 1), (per_block_cast_to_fp8, 128)])
def test_casts_match_deep_gemm(cast, sf_rows, use_ue8m0):
    """Scales bit for bit; fp8 values at most one step apart (x / sf vs x * (1 / sf)), and rarely."""
    x = bf16_randn(300, 1000) * 3
    x_fp8, sf = cast(x, use_ue8m0=use_ue8m0)
    ref_fp8, ref_sf = deep_gemm_casts(x, sf_rows, use_ue8m0)
    assert torch.equal(sf, ref_sf)
    codes, ref_codes = x_fp8.view(torch.uint8).int(), ref_fp8.view(torch.uint8).int()
    magnitude_step = ((codes & 0x7F) - (ref_codes & 0x7F)).abs()
    same_sign = ((codes ^ ref_codes) & 0x80 == 0) | (codes & 0x7F == 0) | (ref_codes & 0x7F == 0)
    assert (magnitude_step <= 1).all() and same_sign.all()
    assert (codes != ref_codes).float().mean() < 0.01


def unsupported_calls():
    x_fp8, y_fp8, out, _ = construct(4, 256, 128)
    y3 = (y_fp8[0][None], y_fp8[1][None])
    idx = torch.zeros(4, dtype=torch.int32)
    contiguous = deep_gemm.m_grouped_fp8_gemm_nt_contiguous
    return {
        "not a pair": (TypeError, lambda: deep_gemm.fp8_gemm_nt(x_fp8[0], y_fp8, out)),
        "unknown recipe": (ValueError, lambda: deep_gemm.fp8_gemm_nt(x_fp8, y_fp8, out, recipe=(1, 64, 64))),
        "no m_indices": (TypeError, lambda: contiguous(x_fp8, y3, out)),
        "two m_indices": (TypeError, lambda: contiguous(x_fp8, y3, out, idx, grouped_layout=idx)),
        "psum layout": (ValueError, lambda: contiguous(x_fp8, y3, out, idx, use_psum_layout=True)),
        "packed ue8m0": (
            ValueError,
            lambda: per_token_cast_to_fp8(torch.randn(4, 256), True, use_packed_ue8m0=True),
        ),
        "tma size": (ValueError, lambda: deep_gemm.get_tma_aligned_size(4, 3)),
        "3-D only": (ValueError, lambda: get_col_major_tma_aligned_tensor(torch.randn(2, 2, 2, 2))),
    }


@pytest.mark.parametrize("name", unsupported_calls())
def test_unsupported_arguments_raise(name):
    exc, call = unsupported_calls()[name]
    with pytest.raises(exc):
        call()


def test_api_signatures_match_deep_gemm():
    def params(name):
        return list(inspect.signature(getattr(deep_gemm, name)).parameters)

    v2 = ["a", "b", "d", "c", "recipe", "compiled_dims", "disable_ue8m0_cast"]
    assert params("fp8_gemm_nt") == v2
    assert params("m_grouped_fp8_gemm_nt_masked")[:5] == ["a", "b", "d", "masked_m", "expected_m"]
    assert params("k_grouped_fp8_gemm_nt_contiguous")[:7] == [
        "a",
        "b",
        "d",
        "ks_cpu",
        "grouped_layout",
        "c",
        "recipe",
    ]
    assert params("gemm_fp8_fp8_bf16_nt") == ["lhs", "rhs", "out"]
    assert params("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous") == ["lhs", "rhs", "out", "m_indices"]
    assert params("m_grouped_gemm_fp8_fp8_bf16_nt_masked") == ["lhs", "rhs", "out", "masked_m", "expected_m"]
    assert params("wgrad_gemm_fp8_fp8_fp32_nt") == ["lhs", "rhs", "out"]
    assert params("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt") == ["lhs", "rhs", "out", "batch_sizes"]
    assert all(callable(getattr(deep_gemm, name)) for name in deep_gemm.__all__)

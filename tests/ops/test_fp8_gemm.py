"""FP8 block-scaled GEMM ops (SPEC §3) on both CPU code paths against the float64 reference
(dsv3.ops.reference), plus DeepGEMM's calc_diff against the unquantized product: dense (odd and V3 shapes,
scale layouts, UE8M0), grouped contiguous and masked, wgrad and k-grouped wgrad, NaN containment, `out=`
handling and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel

from dsv3 import ops
from dsv3.ops import reference
from dsv3.ops.reference import V3_GEMM_SHAPES

BF16, FP32 = torch.bfloat16, torch.float32
OUT_DTYPES = [BF16, FP32]
SENTINEL = -12345.0  # written into `out` beforehand where a kernel must not write

# Tolerances. The kernels sum each 128-wide K block in fp32 and the scaled blocks in fp32, in an order of
# their own; the reference evaluates the same formula in float64. fp32 rounding errors scale with the terms
# summed, not with the (possibly cancelling) result, so one element's relative error is unbounded; SPEC §3's
# 1e-5 is therefore relative to the output's scale: |D - ref| <= 1e-5 * max|ref| over the whole output.
# (Measured: ~1e-7 .. 6e-7 on both CPU paths, K up to 16384.)
FP32_RTOL = 1e-5
# A bf16 output adds one rounding to 8 significant bits: at most 2^-8 of each element.
BF16_ROUNDING = 2.0**-8
# DeepGEMM's acceptance bound for FP8 x FP8 against the unquantized product.
MAX_CALC_DIFF = 1e-3

# Odd shapes: M, N, K from these lists in a covering array (each M with every N once; every (M, K) and (N, K)
# pair occurs too) rather than the full product, which would cost 5x the kernel time.
ODD_M, ODD_N, ODD_K = [0, 1, 3, 127, 129], [576, 2112, 320, 7], [128, 200, 7, 1000]
ODD_SHAPES = [(m, n, ODD_K[(i + j) % 4]) for i, m in enumerate(ODD_M) for j, n in enumerate(ODD_N)]


def check_output(out: torch.Tensor, ref: torch.Tensor) -> None:
    rounding = BF16_ROUNDING if out.dtype == BF16 else 0.0
    assert_close_rel(out, ref, FP32_RTOL, elem_rtol=rounding)


def act(x: torch.Tensor, col_major: bool = False, ue8m0: bool = False):
    return ops.quantize_per_token_group(x, ue8m0=ue8m0, col_major_scales=col_major)


def weight(w: torch.Tensor, ue8m0: bool = False):
    return ops.quantize_per_block(w, ue8m0=ue8m0)


def randn(*shape) -> torch.Tensor:
    return torch.randn(shape, dtype=BF16)


def sentinel_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=dtype)


def reference_in_n_chunks(qa, sa, qb, sb, chunk: int = 2048) -> torch.Tensor:
    """reference.fp8_gemm_nt over 128-aligned row blocks of B, to keep its float64 temporaries small."""
    parts = [
        reference.fp8_gemm_nt(qa, sa, qb[n0 : n0 + chunk], sb[n0 // 128 : (n0 + chunk) // 128])
        for n0 in range(0, qb.shape[0], chunk)
    ]
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------
# Dense


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("m, n, k", ODD_SHAPES)
def test_fp8_gemm_nt_odd_shapes(cpu_path, m, n, k, out_dtype):
    (qa, sa), (qb, sb) = act(randn(m, k)), weight(randn(n, k))
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    check_output(out, reference.fp8_gemm_nt(qa, sa, qb, sb))


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("col_major", [False, True])
@pytest.mark.parametrize("m, n, k", [(129, 320, 1000), (3, 576, 256)])
def test_fp8_gemm_nt_scale_layouts(cpu_path, m, n, k, col_major, ue8m0):
    x, w = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = act(x, col_major, ue8m0), weight(w, ue8m0)
    assert sa.is_contiguous() != col_major
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=FP32)
    check_output(out, reference.fp8_gemm_nt(qa, sa, qb, sb))
    assert ops.calc_diff(out, x.float() @ w.float().t()) < MAX_CALC_DIFF


@pytest.fixture(scope="module", params=V3_GEMM_SHAPES, ids=lambda nk: f"n{nk[0]}-k{nk[1]}")
def v3_case(request):
    """Three activation rows and one weight of a DeepSeek-V3 shape, quantized, with the float64 reference and
    the unquantized product; built once per shape for all the tests that use it."""
    n, k = request.param
    x, w = randn(3, k), randn(n, k)
    (qa, sa), (qb, sb) = act(x), weight(w)
    return qa, sa, qb, sb, reference_in_n_chunks(qa, sa, qb, sb), (x @ w.t()).float()


@pytest.mark.parametrize("m", [1, 3])
def test_fp8_gemm_nt_v3_shapes(cpu_path, v3_case, m):
    qa, sa, qb, sb, ref, unquantized = v3_case
    out = ops.fp8_gemm_nt(qa[:m], sa[:m], qb, sb, out_dtype=FP32)
    check_output(out, ref[:m])
    assert ops.calc_diff(out, unquantized[:m]) < MAX_CALC_DIFF


def test_fp8_gemm_nt_nan_stays_in_its_row_and_column(cpu_path):
    x, w = randn(6, 300), randn(260, 300)
    x[1, 5] = float("nan")  # row 1 through its scale
    x[3, 290] = float("inf")  # row 3: inf / inf = NaN, and 0 * inf
    (qa, sa), (qb, sb) = act(x), weight(w)
    qa.view(torch.uint8)[4, 130] = 0x7F  # a NaN fp8 value in row 4 of A
    qb.view(torch.uint8)[200, 17] = 0x7F  # and one in row 200 of B: column 200 of D
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=FP32)
    expected_nan = torch.zeros(6, 260, dtype=torch.bool)
    expected_nan[[1, 3, 4]] = True
    expected_nan[:, 200] = True
    assert torch.equal(torch.isnan(out), expected_nan)
    check_output(out, reference.fp8_gemm_nt(qa, sa, qb, sb))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_fp8_gemm_nt_writes_only_into_out(cpu_path, out_dtype):
    (qa, sa), (qb, sb) = act(randn(5, 200)), weight(randn(130, 200))
    allocated = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=out_dtype)
    buffer = sentinel_like((5, 160), out_dtype)
    out = buffer[:, 10:140]  # rows padded to 160 elements: K-major but not contiguous
    assert ops.fp8_gemm_nt(qa, sa, qb, sb, out=out) is out
    assert torch.equal(out, allocated)
    assert (buffer[:, :10] == SENTINEL).all() and (buffer[:, 140:] == SENTINEL).all()


def padded_rows(t: torch.Tensor, pad: int = 20) -> torch.Tensor:
    """The same values in a view whose rows are `pad` elements longer: K-major, not contiguous."""
    storage = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype)
    storage[:, pad // 2 : pad // 2 + t.shape[1]] = t
    return storage[:, pad // 2 : pad // 2 + t.shape[1]]


def test_fp8_gemm_nt_strided_operands(cpu_path):
    """Operands with padded rows and B scales stored transposed give the contiguous operands' result."""
    (qa, sa), (qb, sb) = act(randn(5, 300)), weight(randn(130, 300))
    expected = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=FP32)
    sb_transposed = sb.t().contiguous().t()
    got = ops.fp8_gemm_nt(padded_rows(qa), sa, padded_rows(qb), sb_transposed, out_dtype=FP32)
    assert torch.equal(got, expected)


def test_fp8_gemm_nt_empty_k_gives_zeros(cpu_path):
    (qa, sa), (qb, sb) = act(randn(3, 0)), weight(randn(7, 0))
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out=sentinel_like((3, 7), FP32))
    assert torch.equal(out, torch.zeros(3, 7))


def test_torch_compile_matches_eager(cpu_path):
    def quantize_and_gemm(x, qb, sb):
        qa, sa = ops.quantize_per_token_group(x)
        return ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=FP32)

    compiled = torch.compile(quantize_and_gemm, backend="aot_eager", fullgraph=True)
    x, (qb, sb) = randn(9, 300), weight(randn(200, 300))
    torch.testing.assert_close(compiled(x, qb, sb), quantize_and_gemm(x, qb, sb), rtol=0, atol=0)


def test_torch_compile_every_op_matches_eager():
    """Every op traces through its Meta kernel (fullgraph: no graph break) and runs the same kernels."""

    def all_ops(x, w):
        qa, sa = ops.quantize_per_token_group(x, col_major_scales=True)
        qb, sb = ops.quantize_per_block(w)
        qa3, sa3 = ops.quantize_per_token_group(x.view(2, 3, -1))
        qw, sw = ops.quantize_per_token_group(w[0])
        m_indices = torch.tensor([0, 1, -1, 1, 0, 0], dtype=torch.int32)
        masked_m = torch.tensor([3, 1], dtype=torch.int32)
        return (
            ops.dequantize_per_token_group(qa, sa),
            ops.dequantize_per_block(qb, sb),
            ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, m_indices),
            ops.m_grouped_fp8_gemm_nt_masked(qa3, sa3, qb, sb, masked_m, expected_m=2),
            ops.fp8_gemm_wgrad_nt(qa, sa, qw, sw),
            ops.k_grouped_fp8_gemm_wgrad_nt(qa[:, :256], sa[:, :2], qw[:, :256], sw[:, :2], [128, 128]),
        )

    compiled = torch.compile(all_ops, backend="aot_eager", fullgraph=True)
    x, w = randn(6, 300), randn(2, 130, 300)
    for got, expected in zip(compiled(x, w), all_ops(x, w), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Grouped: contiguous (MoE prefill) and masked (MoE decode)

GROUPS, GROUP_N, GROUP_K = 4, 320, 200


def aligned_m_indices() -> torch.Tensor:
    """DeepGEMM's layout: each group's rows in one segment, padded with -1 rows to a multiple of 128;
    group 2 is empty."""
    alignment = 128
    parts = []
    for g, rows in enumerate([70, 129, 0, 5]):
        padded = reference.ceil_div(rows, alignment) * alignment
        parts += [torch.full((rows,), g), torch.full((padded - rows,), -1)]
    return torch.cat(parts).int()


def random_m_indices() -> torch.Tensor:
    """Rows in random order: unsorted runs of every length, -1 rows scattered, and group 3 empty."""
    return torch.randint(-1, GROUPS - 1, (300,), dtype=torch.int32)


@pytest.mark.parametrize("layout", [aligned_m_indices, random_m_indices], ids=["aligned", "random"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_m_grouped_contiguous(cpu_path, out_dtype, layout):
    m_indices = layout()
    (qa, sa), (qb, sb) = act(randn(len(m_indices), GROUP_K)), weight(randn(GROUPS, GROUP_N, GROUP_K))
    out = sentinel_like((len(m_indices), GROUP_N), out_dtype)  # -1 rows must be overwritten with zeros
    ops.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, m_indices, out=out)
    ref = reference.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, m_indices)
    check_output(out, ref)
    assert not out[m_indices == -1].any()


@pytest.mark.parametrize("rows", [0, 3])
def test_m_grouped_contiguous_without_work(cpu_path, rows):
    """No rows at all, or only -1 rows: the output is all zeros."""
    (qa, sa), (qb, sb) = act(randn(rows, GROUP_K)), weight(randn(GROUPS, GROUP_N, GROUP_K))
    m_indices = torch.full((rows,), -1, dtype=torch.int32)
    out = ops.m_grouped_fp8_gemm_nt_contiguous(
        qa, sa, qb, sb, m_indices, out=sentinel_like((rows, GROUP_N), BF16)
    )
    assert not out.any()


M_MAX = 65


@pytest.mark.parametrize("col_major", [False, True])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_m_grouped_masked(cpu_path, out_dtype, col_major):
    masked_m = torch.tensor([0, M_MAX, 1, int(torch.randint(2, M_MAX, ()))], dtype=torch.int32)
    (qa, sa), (qb, sb) = (
        act(randn(GROUPS, M_MAX, GROUP_K), col_major),
        weight(randn(GROUPS, GROUP_N, GROUP_K)),
    )
    out = sentinel_like((GROUPS, M_MAX, GROUP_N), out_dtype)
    ref = reference.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, out.double())
    ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, expected_m=32, out=out)
    valid = torch.arange(M_MAX)[None, :] < masked_m[:, None]
    check_output(out[valid], ref[valid])
    assert (out[~valid] == SENTINEL).all()


def test_m_grouped_masked_allocated_out_is_zero_past_masked_m(cpu_path):
    masked_m = torch.tensor([3, 0, 64, 17], dtype=torch.int32)
    (qa, sa), (qb, sb) = act(randn(GROUPS, M_MAX, GROUP_K)), weight(randn(GROUPS, GROUP_N, GROUP_K))
    out = ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, out_dtype=FP32)
    zeros = torch.zeros(GROUPS, M_MAX, GROUP_N, dtype=torch.float64)
    check_output(out, reference.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, zeros))


def test_m_grouped_masked_nan_stays_in_its_request(cpu_path):
    x = randn(GROUPS, M_MAX, GROUP_K)
    x[1, 2, 7] = float("nan")
    masked_m = torch.full((GROUPS,), M_MAX, dtype=torch.int32)
    (qa, sa), (qb, sb) = act(x), weight(randn(GROUPS, GROUP_N, GROUP_K))
    out = ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, out_dtype=FP32)
    expected_nan = torch.zeros(GROUPS, M_MAX, GROUP_N, dtype=torch.bool)
    expected_nan[1, 2] = True
    assert torch.equal(torch.isnan(out), expected_nan)


# --------------------------------------------------------------------------------------------------
# Weight gradients: 1x128 scales on both operands, fp32 out accumulated into


@pytest.mark.parametrize("prefilled", [True, False], ids=["accumulate", "allocated"])
@pytest.mark.parametrize("col_major", [False, True])
@pytest.mark.parametrize("m, n, k", [(129, 320, 1000), (7, 576, 200), (3, 7, 7), (0, 7, 128), (5, 3, 0)])
def test_fp8_gemm_wgrad_nt(cpu_path, m, n, k, col_major, prefilled):
    (qa, sa), (qb, sb) = act(randn(m, k), col_major), act(randn(n, k), col_major)
    before = torch.randn(m, n) * 10 if prefilled else torch.zeros(m, n)
    out = ops.fp8_gemm_wgrad_nt(qa, sa, qb, sb, out=before.clone() if prefilled else None)
    check_output(out, reference.fp8_gemm_wgrad_nt(qa, sa, qb, sb, before.double()))


def quantize_k_grouped(x: torch.Tensor, ks: list[int]):
    """1x128 quantization restarting at each group's first column: scales `[rows, Σ ceil(ks/128)]`."""
    parts = [act(chunk) for chunk in x.split(ks, dim=1)] if ks else [act(x)]
    return torch.cat([q for q, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)


@pytest.mark.parametrize("ks_type", [list, torch.tensor], ids=["list", "tensor"])
@pytest.mark.parametrize("ks", [[0, 200, 128, 7, 300], [256, 1], [0, 0], [], [1000]], ids=str)
def test_k_grouped_fp8_gemm_wgrad_nt(cpu_path, ks, ks_type):
    m, n = 65, 130
    (qa, sa), (qb, sb) = quantize_k_grouped(randn(m, sum(ks)), ks), quantize_k_grouped(randn(n, sum(ks)), ks)
    before = torch.randn(len(ks), m, n) * 10
    out = ops.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks_type(ks), out=before.clone())
    check_output(out, reference.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks, before.double()))


def test_k_grouped_fp8_gemm_wgrad_nt_allocated_out(cpu_path):
    ks = [130, 0, 70]
    (qa, sa), (qb, sb) = quantize_k_grouped(randn(9, 200), ks), quantize_k_grouped(randn(12, 200), ks)
    out = ops.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks)
    zeros = torch.zeros(3, 9, 12, dtype=torch.float64)
    check_output(out, reference.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks, zeros))
    assert not out[1].any()

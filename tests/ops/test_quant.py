"""FP8 quantization ops (SPEC §2) against dsv3.ops.reference: bit-exact fp8 values and scales, the scale
layouts, UE8M0 scales, NaN/Inf containment, saturation and round-trip error bounds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3 import ops
from dsv3.ops import reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [0, 1, 3, 127, 129]
KS = [7, 128, 200, 1000]
FP8_MAX = 448.0
# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself, a subnormal
# one (|q| < 2^-6) by at most half the subnormal spacing 2^-9.
FP8_REL_ROUNDING = 2.0**-4
FP8_SUBNORMAL_ROUNDING = 2.0**-10


def random_input(shape, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Normal data whose magnitude varies per row over 1e-3 .. 1e3, so groups see very different scales."""
    x = torch.randn(shape, generator=generator)
    if x.dim() >= 2:
        x = x * 10 ** (torch.rand(*shape[:-1], 1, generator=generator) * 6 - 3)
    return x.to(dtype)


def fp8_bytes(q: torch.Tensor) -> torch.Tensor:
    """The raw e4m3 codes, every NaN folded to 0x7F (the sign of a NaN carries no meaning)."""
    return torch.where(torch.isnan(q.float()), 0x7F, q.view(torch.uint8).int())


def assert_quant_equal(got, want) -> None:
    (q, s), (rq, rs) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == rq.shape
    assert torch.equal(fp8_bytes(q), fp8_bytes(rq)), "fp8 values differ from the reference"
    torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True)


def is_power_of_two(s: torch.Tensor) -> torch.Tensor:
    mantissa, _ = torch.frexp(s)
    return mantissa == 0.5


# --------------------------------------------------------------------------------------------------
# Per-token groups


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_matches_reference(cpu_path, dtype, rows, k, group_size):
    x = random_input((rows, k), dtype)
    got = ops.quantize_per_token_group(x, group_size)
    assert got[1].shape == (rows, reference.ceil_div(k, group_size))
    assert_quant_equal(got, reference.quantize_per_token_group(x, group_size))


@pytest.mark.parametrize("shape", [(200,), (7,), (2, 3, 200), (2, 1, 3, 129), (0, 5, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_any_rank(cpu_path, dtype, shape):
    x = random_input(shape, dtype)
    got = ops.quantize_per_token_group(x)
    assert got[1].shape == (*shape[:-1], reference.ceil_div(shape[-1], 128))
    assert_quant_equal(got, reference.quantize_per_token_group(x))


@pytest.mark.parametrize("shape", [(129, 1000), (3, 200), (2, 5, 300), (1, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_ue8m0(cpu_path, dtype, shape):
    x = random_input(shape, dtype)
    q, s = ops.quantize_per_token_group(x, ue8m0=True)
    assert_quant_equal((q, s), reference.quantize_per_token_group(x, ue8m0=True))
    plain = reference.quantize_per_token_group(x)[1]  # max(amax, 1e-4) / 448
    assert is_power_of_two(s).all()
    assert (s >= plain).all() and (s < 2 * plain).all()


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize(
    "shape", [(1, 200), (3, 7), (5, 1000), (129, 300), (2, 3, 200), (4, 5, 128)], ids=str
)
def test_per_token_group_col_major_scales(cpu_path, shape, group_size):
    x = random_input(shape, torch.bfloat16)
    q, s = ops.quantize_per_token_group(x, group_size, col_major_scales=True)
    m, kb = shape[-2], reference.ceil_div(shape[-1], group_size)
    m_pad = reference.ceil_div(m, 4) * 4
    expected_strides = (1, m_pad) if len(shape) == 2 else (kb * m_pad, 1, m_pad)
    assert s.shape == (*shape[:-1], kb) and s.stride() == expected_strides
    assert_quant_equal((q, s), reference.quantize_per_token_group(x, group_size))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_nan_inf_stay_in_their_group(cpu_path, dtype):
    x = random_input((5, 300), dtype)
    poisoned = x.clone()
    poisoned[1, 130] = float("nan")
    poisoned[3, 5] = float("inf")
    q, s = ops.quantize_per_token_group(poisoned)
    assert_quant_equal((q, s), reference.quantize_per_token_group(poisoned))
    clean_q, clean_s = ops.quantize_per_token_group(x)
    touched = torch.zeros_like(s, dtype=torch.bool)
    touched[1, 1] = touched[3, 0] = True
    assert torch.isnan(s[1, 1]) and torch.isinf(s[3, 0])
    torch.testing.assert_close(s[~touched], clean_s[~touched], rtol=0, atol=0)
    group_of_column = torch.arange(300) // 128
    untouched_q = ~touched[:, group_of_column]
    assert torch.equal(q.view(torch.uint8)[untouched_q], clean_q.view(torch.uint8)[untouched_q])


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_zeros_use_the_amax_floor(cpu_path, dtype):
    x = torch.zeros(3, 200, dtype=dtype)
    q, s = ops.quantize_per_token_group(x)
    assert torch.equal(s, torch.full_like(s, torch.tensor(1e-4) / 448))
    assert not q.float().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(cpu_path, dtype):
    x = random_input((300, 5), dtype).t()
    assert_quant_equal(ops.quantize_per_token_group(x), reference.quantize_per_token_group(x))
    assert_quant_equal(ops.quantize_per_block(x), reference.quantize_per_block(x))


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_saturates_at_448(cpu_path, dtype, ue8m0):
    big = torch.finfo(dtype).max
    x = torch.cat([random_input((4, 256), dtype), torch.full((1, 256), big, dtype=dtype)])
    q, _ = ops.quantize_per_token_group(x, ue8m0=ue8m0)
    group_max = q.float().abs().unflatten(-1, (2, 128)).amax(-1)
    assert (group_max <= FP8_MAX).all()
    if not ue8m0:  # the group's largest element lands on the top of the fp8 range
        assert (group_max == FP8_MAX).all()
    else:  # s < 2 amax / 448: the largest element keeps at least half the range
        assert (group_max >= FP8_MAX / 2).all()


def assert_round_trip_error_bounded(x: torch.Tensor, deq: torch.Tensor, s_per_element: torch.Tensor) -> None:
    err = (x.float() - deq).abs()
    bound = (FP8_REL_ROUNDING * x.float().abs() + FP8_SUBNORMAL_ROUNDING * s_per_element) * (1 + 1e-6)
    assert (err <= bound).all(), f"worst excess {float((err - bound).max()):.3e}"


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_group_round_trip(cpu_path, dtype, group_size, ue8m0):
    x = random_input((129, 1000), dtype)
    q, s = ops.quantize_per_token_group(x, group_size, ue8m0=ue8m0)
    deq = ops.dequantize_per_token_group(q, s, group_size, out_dtype=torch.float32)
    assert_round_trip_error_bounded(x, deq, s.repeat_interleave(group_size, -1)[:, :1000])


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, col_major", [((256,), False), ((3, 200), False), ((129, 7), True), ((2, 5, 300), True)], ids=str
)
def test_dequantize_per_token_group_matches_reference(cpu_path, shape, col_major, out_dtype):
    q, s = ops.quantize_per_token_group(random_input(shape), 64, col_major_scales=col_major)
    got = ops.dequantize_per_token_group(q, s, 64, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, reference.dequantize_per_token_group(q, s, 64, out_dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Per-block (weights)

BLOCK_SHAPES = [(1, 7), (3, 1000), (129, 200), (256, 384), (300, 130), (2, 130, 200), (3, 0, 128)]


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_block_matches_reference(cpu_path, dtype, shape, block_size, ue8m0):
    w = random_input(shape, dtype)
    q, s = ops.quantize_per_block(w, block_size, ue8m0)
    n, k = shape[-2:]
    assert s.shape == (*shape[:-2], reference.ceil_div(n, block_size), reference.ceil_div(k, block_size))
    assert_quant_equal((q, s), reference.quantize_per_block(w, block_size, ue8m0))
    if ue8m0:
        assert is_power_of_two(s).all()


def test_per_block_nan_stays_in_its_block(cpu_path):
    w = random_input((300, 260))
    poisoned = w.clone()
    poisoned[130, 200] = float("nan")  # block (1, 1)
    q, s = ops.quantize_per_block(poisoned)
    clean_q, clean_s = ops.quantize_per_block(w)
    assert_quant_equal((q, s), reference.quantize_per_block(poisoned))
    touched = torch.zeros_like(s, dtype=torch.bool)
    touched[1, 1] = True
    assert torch.isnan(s[1, 1])
    torch.testing.assert_close(s[~touched], clean_s[~touched], rtol=0, atol=0)
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[128:256, 128:256] = False
    assert torch.equal(q.view(torch.uint8)[outside], clean_q.view(torch.uint8)[outside])


def test_per_block_edge_blocks_pad_with_zeros(cpu_path):
    """A partial edge block's amax only sees its real elements (the zero padding never raises it)."""
    w = torch.full((130, 130), -3.0)
    q, s = ops.quantize_per_block(w)
    assert torch.equal(s, torch.full_like(s, 3.0 / 448))
    assert (q.float() == -FP8_MAX).all()


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_block_round_trip(cpu_path, dtype, ue8m0):
    w = random_input((300, 260), dtype)
    q, s = ops.quantize_per_block(w, ue8m0=ue8m0)
    deq = ops.dequantize_per_block(q, s, out_dtype=torch.float32)
    torch.testing.assert_close(
        deq, reference.dequantize_per_block(q, s, out_dtype=torch.float32), rtol=0, atol=0
    )
    s_per_element = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    assert_round_trip_error_bounded(w, deq, s_per_element)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(129, 200), (2, 130, 7)], ids=str)
def test_dequantize_per_block_matches_reference(cpu_path, shape, out_dtype):
    q, s = ops.quantize_per_block(random_input(shape), 64)
    got = ops.dequantize_per_block(q, s, 64, out_dtype=out_dtype)
    torch.testing.assert_close(got, reference.dequantize_per_block(q, s, 64, out_dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Properties over random shapes


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(0, 9), max_size=2),
    k=st.integers(1, 300),
    group_size=st.sampled_from([16, 64, 100, 128]),
    dtype=st.sampled_from(DTYPES),
    ue8m0=st.booleans(),
    col_major=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_token_group_property(lead, k, group_size, dtype, ue8m0, col_major, seed):
    shape = (*lead, k)
    col_major = col_major and len(shape) >= 2
    x = random_input(shape, dtype, torch.Generator().manual_seed(seed))
    q, s = ops.quantize_per_token_group(x, group_size, ue8m0, col_major)
    assert_quant_equal((q, s), reference.quantize_per_token_group(x, group_size, ue8m0))
    deq = ops.dequantize_per_token_group(q, s, group_size, out_dtype=torch.float32)
    s_per_element = s.repeat_interleave(group_size, -1)[..., :k]
    assert_round_trip_error_bounded(x, deq, s_per_element)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    batch=st.lists(st.integers(1, 3), max_size=1),
    n=st.integers(0, 300),
    k=st.integers(0, 300),
    block_size=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from(DTYPES),
    ue8m0=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_block_property(batch, n, k, block_size, dtype, ue8m0, seed):
    w = random_input((*batch, n, k), dtype, torch.Generator().manual_seed(seed))
    q, s = ops.quantize_per_block(w, block_size, ue8m0)
    assert_quant_equal((q, s), reference.quantize_per_block(w, block_size, ue8m0))
    deq = ops.dequantize_per_block(q, s, block_size, out_dtype=torch.float32)
    s_per_element = s.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :k]
    assert_round_trip_error_bounded(w, deq, s_per_element)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 2), (33, 200), (128, 1024), (96, 2432), (7, 129)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_transposed_input_matches_contiguous(cpu_path, dtype, shape, ue8m0):
    """A transposed contiguous matrix (Wgrad's token-major operand, t.t()) is quantized from tiles of its
    source rows: codes and scales bit-identical to quantizing the contiguous copy, NaN and inf included."""
    k, rows = shape
    t = (torch.randn(k, rows) * torch.logspace(-3, 3, rows)).to(dtype)
    t[0, 0], t[-1, -1] = float("nan"), float("inf")
    x = t.t()
    assert x.stride() == (1, rows)
    for col_major in (False, True):
        kw = dict(ue8m0=ue8m0, col_major_scales=col_major)
        q, s = ops.quantize_per_token_group(x, 128, **kw)
        q_ref, s_ref = ops.quantize_per_token_group(x.contiguous(), 128, **kw)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(s.nan_to_num(nan=-1.0), s_ref.nan_to_num(nan=-1.0))
        assert s.stride() == s_ref.stride()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group_size", [32, 128, 200])
@pytest.mark.parametrize("shape", [(5, 3), (63, 17), (64, 33), (65, 47), (129, 31), (300, 96), (257, 530)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_input_edges(cpu_path, dtype, shape, group_size, threads):
    """The transposed path's edges: strips of 16 or 32 output rows (the width depends on the task count, so
    on the thread count) cut by the end of the matrix, groups cut into 64-row chunks and by the end of T,
    groups over 128 rows, bands of strips, and special values in inner lanes; the codes and scales are those
    of the contiguous copy and of the reference."""
    k, rows = shape
    t = (torch.randn(k, rows) * torch.logspace(-3, 3, rows)).to(dtype)
    t[k // 2, rows // 2] = float("nan")
    if dtype == torch.float32:  # a signalling NaN with a payload: the scales still get the one quiet NaN
        t.view(torch.int32)[k // 2, rows // 2] = 0x7F800001
    t[k - 1, rows - 1] = -float("inf")
    t[:, 0] = 0.0
    x = t.t()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, s = ops.quantize_per_token_group(x, group_size)
    finally:
        torch.set_num_threads(previous)
    q_ref, s_ref = ops.quantize_per_token_group(x.contiguous(), group_size)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))  # NaN bits included
    assert_quant_equal((q, s), reference.quantize_per_token_group(x, group_size))
    assert torch.isnan(s[rows // 2, (k // 2) // group_size])
    assert s[0].eq(torch.tensor(1e-4) / 448).all()

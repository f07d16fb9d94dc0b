"""The sm_90a FP8 quantization kernels (csrc/cuda/quant.cu) against the CPU kernels and dsv3.ops.reference:
bit-exact fp8 codes, scales and dequantized values, on both scale layouts, UE8M0, bf16/fp16/fp32, odd K, odd
group/block sizes, batched inputs, unaligned pointers (the single-element path), NaN/Inf and empty tensors."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ops
from dsv3.ops import reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OUT_DTYPES = DTYPES
# (ue8m0, col_major_scales)
VARIANTS = [(False, False), (False, True), (True, True)]
TOKEN_SHAPES = [
    (0, 128),
    (1, 7),
    (1, 7168),
    (3, 200),
    (3, 1000),
    (129, 128),
    (129, 300),
    (2, 3, 200),
    (3, 129, 256),
    (2, 1, 3, 129),
]
BLOCK_SHAPES = [(1, 1), (7, 7), (128, 128), (129, 300), (300, 129), (3, 200, 136), (2, 1, 1000)]


def random_input(shape, dtype) -> torch.Tensor:
    """Normal data with a per-row magnitude between 1e-3 and 1e3, on the CPU."""
    x = torch.randn(shape)
    if x.dim() >= 2:
        x = x * 10 ** (torch.rand(*shape[:-1], 1) * 6 - 3)
    return x.to(dtype)


def fp8_bytes(q: torch.Tensor) -> torch.Tensor:
    """Raw e4m3 codes on the CPU, every NaN folded to 0x7F (CPU division may hand back a negative NaN)."""
    q = q.cpu()
    return torch.where(torch.isnan(q.float()), 0x7F, q.view(torch.uint8).int())


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same values bit for bit (NaN payloads aside), shapes and dtypes."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if got.dtype == torch.float8_e4m3fn:
        assert torch.equal(fp8_bytes(got), fp8_bytes(want)), "fp8 codes differ"
    else:
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def check_quant(cuda_result, cpu_result, ref_result) -> None:
    for got, cpu, ref in zip(cuda_result, cpu_result, ref_result, strict=True):
        assert_bitwise(got, ref)
        assert_bitwise(cpu, ref)


def check_token_group_quant(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False, col_major: bool = False
):
    """Quantizes the CPU tensor x on the GPU and on the CPU; checks both against the reference, and the GPU
    scales' layout against the CPU's. Returns the GPU (q, scales)."""
    x_gpu = x.cuda()
    q, s = ops.quantize_per_token_group(x_gpu, group_size, ue8m0, col_major)
    torch.cuda.synchronize()
    cpu = ops.quantize_per_token_group(x, group_size, ue8m0, col_major)
    check_quant((q, s), cpu, reference.quantize_per_token_group(x, group_size, ue8m0))
    assert q.device == s.device == x_gpu.device
    if s.numel():
        assert s.stride() == cpu[1].stride()
    if col_major and s.numel():
        m, kb = s.shape[-2:]
        m_pad = reference.ceil_div(m, 4) * 4
        storage = s.as_strided((*s.shape[:-2], kb, m_pad), (*s.stride()[:-2], m_pad, 1))
        assert not storage[..., m:].any(), "padding rows of the TMA-aligned scales must stay zero"
    return q, s


def check_block_quant(w: torch.Tensor, block_size: int = 128, ue8m0: bool = False):
    q, s = ops.quantize_per_block(w.cuda(), block_size, ue8m0)
    torch.cuda.synchronize()
    check_quant(
        (q, s),
        ops.quantize_per_block(w, block_size, ue8m0),
        reference.quantize_per_block(w, block_size, ue8m0),
    )
    return q, s


# ------------------------------------------------------------------------------------------------------------
# Per-token groups


@pytest.mark.parametrize("ue8m0,col_major", VARIANTS, ids=["plain", "col_major", "ue8m0_col_major"])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_group(dtype, shape, group_size, ue8m0, col_major):
    if col_major and len(shape) < 2:
        pytest.skip("col-major scales need a 2-D input")
    check_token_group_quant(random_input(shape, dtype), group_size, ue8m0, col_major)


# 1 and 7: one lane per group on the element path; 96/100: partial teams; 1024: 32 lanes of 4 vectors;
# 4096: vectors past the register cache, read again.
@pytest.mark.parametrize("group_size", [1, 7, 96, 100, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_per_token_group_any_group_size(dtype, group_size):
    check_token_group_quant(random_input((5, 5000), dtype), group_size)
    check_token_group_quant(random_input((3, 4, 1000), dtype), group_size, ue8m0=True, col_major=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_group_unaligned_pointer(dtype):
    """A contiguous view one element into its storage cannot take 16-byte loads: the element path."""
    x = random_input((3 * 1024 + 1,), dtype)
    q, s = ops.quantize_per_token_group(x.cuda()[1:].view(3, 1024))
    view = x[1:].view(3, 1024)
    check_quant((q, s), ops.quantize_per_token_group(view), reference.quantize_per_token_group(view))


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token_group_nan_inf(dtype, ue8m0):
    x = random_input((6, 300), dtype)
    x[0] = float("nan")  # a whole NaN row
    x[2, 130] = float("nan")  # one NaN: its group only
    x[3, 5] = float("inf")
    x[4, 250] = -float("inf")
    q, s = check_token_group_quant(x, ue8m0=ue8m0, col_major=True)
    assert torch.isnan(s[0]).all() and torch.isnan(s[2, 1]) and not torch.isnan(s[2, [0, 2]]).any()
    assert torch.isinf(s[3, 0]) and torch.isinf(s[4, 1])


@pytest.mark.parametrize("shape", [(0, 128), (3, 0), (0, 5, 128), (2, 0, 7)], ids=str)
def test_quantize_per_token_group_empty(shape):
    check_token_group_quant(random_input(shape, torch.bfloat16))
    if len(shape) >= 2:
        check_token_group_quant(random_input(shape, torch.bfloat16), col_major=True)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("group_size", [32, 128, 100])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1000), (129, 300), (2, 3, 200), (0, 128)], ids=str)
@pytest.mark.parametrize("col_major", [False, True])
def test_dequantize_per_token_group(shape, group_size, out_dtype, col_major):
    x = random_input(shape, torch.float32)
    x[..., :1, :3] = float("nan")  # a NaN scale in the first group of the first row
    q, s = ops.quantize_per_token_group(x, group_size, col_major_scales=col_major)
    got = ops.dequantize_per_token_group(q.cuda(), s.cuda(), group_size, out_dtype)
    assert_bitwise(got, reference.dequantize_per_token_group(q, s, group_size, out_dtype))
    assert_bitwise(ops.dequantize_per_token_group(q, s, group_size, out_dtype), got.cpu())


def test_dequantize_per_token_group_unaligned_output_path():
    """K = 7: rows do not start on 16-byte boundaries, the single-element path."""
    q, s = ops.quantize_per_token_group(random_input((33, 7), torch.float32), 4)
    for out_dtype in OUT_DTYPES:
        got = ops.dequantize_per_token_group(q.cuda(), s.cuda(), 4, out_dtype)
        assert_bitwise(got, reference.dequantize_per_token_group(q, s, 4, out_dtype))


def test_quantize_on_a_side_stream():
    x = random_input((129, 1000), torch.bfloat16).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q, s = ops.quantize_per_token_group(x)
        w_q, w_s = ops.quantize_per_block(x)
    stream.synchronize()
    check_quant((q, s), ops.quantize_per_token_group(x.cpu()), reference.quantize_per_token_group(x.cpu()))
    check_quant((w_q, w_s), ops.quantize_per_block(x.cpu()), reference.quantize_per_block(x.cpu()))


# ------------------------------------------------------------------------------------------------------------
# Per-block


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_block(dtype, shape, block_size, ue8m0):
    check_block_quant(random_input(shape, dtype), block_size, ue8m0)


# 7/100: partial vectors of a row and CTAs under 256 threads; 4096 over K = 3000: more vectors per row than
# threads in the CTA.
@pytest.mark.parametrize("block_size", [2, 7, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_per_block_any_block_size(dtype, block_size):
    check_block_quant(random_input((2, 5, 3000), dtype), block_size)
    check_block_quant(random_input((300, 136), dtype), block_size, ue8m0=True)


@pytest.mark.slow
def test_quantize_per_block_more_blocks_than_the_grid():
    """1.1M blocks of 1 x 1: the grid is capped at 2^20 CTAs and the kernel loops over the rest."""
    check_block_quant(random_input((1100, 1000), torch.bfloat16), 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_block_unaligned_pointer(dtype):
    w = random_input((256 * 384 + 1,), dtype)
    q, s = ops.quantize_per_block(w.cuda()[1:].view(256, 384))
    view = w[1:].view(256, 384)
    check_quant((q, s), ops.quantize_per_block(view), reference.quantize_per_block(view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_block_nan_inf(dtype):
    w = random_input((300, 400), dtype)
    w[5, 7] = float("nan")
    w[200, 300] = float("inf")
    _, s = check_block_quant(w)
    assert torch.isnan(s[0, 0]) and torch.isinf(s[1, 2]) and torch.isfinite(s[1:, :2]).all()


@pytest.mark.parametrize("shape", [(0, 128), (3, 0), (0, 5, 7), (2, 0, 9)], ids=str)
def test_quantize_per_block_empty(shape):
    check_block_quant(random_input(shape, torch.float32))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("shape", [(1, 1), (129, 300), (3, 200, 136), (0, 7)], ids=str)
def test_dequantize_per_block(shape, block_size, out_dtype):
    w = random_input(shape, torch.float32)
    if w.numel():
        w.view(-1)[0] = float("nan")
    q, s = ops.quantize_per_block(w, block_size)
    got = ops.dequantize_per_block(q.cuda(), s.cuda(), block_size, out_dtype)
    assert_bitwise(got, reference.dequantize_per_block(q, s, block_size, out_dtype))
    assert_bitwise(ops.dequantize_per_block(q, s, block_size, out_dtype), got.cpu())


# ------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 sizes


@pytest.mark.slow
def test_v3_shapes_round_trip():
    """An activation [1024, 7168] and an expert weight [2048, 7168]: bitwise equal to the CPU kernels."""
    x = random_input((1024, 7168), torch.bfloat16)
    for ue8m0 in (False, True):
        q, s = check_token_group_quant(x, ue8m0=ue8m0, col_major=True)
        assert_bitwise(ops.dequantize_per_token_group(q, s), ops.dequantize_per_token_group(q.cpu(), s.cpu()))
    w = random_input((2048, 7168), torch.bfloat16)
    q, s = check_block_quant(w)
    assert_bitwise(ops.dequantize_per_block(q, s), ops.dequantize_per_block(q.cpu(), s.cpu()))

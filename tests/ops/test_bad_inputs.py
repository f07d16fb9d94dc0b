"""Bad arguments to every op raise ValueError/TypeError whose message names the argument (SPEC §9): wrong
dtype, device, rank, shapes, strides, overlapping outputs, out-of-range indices and counts. The structural
checks also run in the Meta kernels that torch.compile traces through."""

from __future__ import annotations

import re

import pytest
import torch

from dsv3 import ops

BF16, FP32, I32 = torch.bfloat16, torch.float32, torch.int32
M, N, K, G = 4, 256, 256, 2


def act(*shape):
    return ops.quantize_per_token_group(torch.randn(shape))


def weight(*shape):
    return ops.quantize_per_block(torch.randn(shape))


def dense_args():
    (a, sa), (b, sb) = act(M, K), weight(N, K)
    return dict(a=a, sa=sa, b=b, sb=sb, out=torch.empty(M, N, dtype=BF16))


def contiguous_args():
    (a, sa), (b, sb) = act(M, K), weight(G, N, K)
    m_indices = torch.tensor([0, -1, 1, 1], dtype=I32)
    return dict(a=a, sa=sa, b=b, sb=sb, m_indices=m_indices, out=torch.empty(M, N, dtype=BF16))


def masked_args():
    (a, sa), (b, sb) = act(G, M, K), weight(G, N, K)
    masked_m = torch.tensor([M, 1], dtype=I32)
    return dict(a=a, sa=sa, b=b, sb=sb, masked_m=masked_m, expected_m=M, out=torch.empty(G, M, N, dtype=BF16))


def wgrad_args():
    (a, sa), (b, sb) = act(M, K), act(N, K)
    return dict(a=a, sa=sa, b=b, sb=sb, out=torch.zeros(M, N))


def k_grouped_args():
    (a, sa), (b, sb) = act(M, K), act(N, K)  # two groups of 128 columns: scales [rows, 2] either way
    return dict(a=a, sa=sa, b=b, sb=sb, ks=[128, 128], out=torch.zeros(2, M, N))


def dequantize_token_args():
    q, scales = act(M, K)
    return dict(q=q, scales=scales, group_size=128, out_dtype=BF16)


def dequantize_block_args():
    q, scale_inv = weight(N, K)
    return dict(q=q, scale_inv=scale_inv, block_size=128, out_dtype=BF16)


VALID_ARGS = {
    "quantize_per_token_group": lambda: dict(x=torch.randn(M, K), group_size=128),
    "dequantize_per_token_group": dequantize_token_args,
    "quantize_per_block": lambda: dict(w=torch.randn(N, K), block_size=128),
    "dequantize_per_block": dequantize_block_args,
    "fp8_gemm_nt": dense_args,
    "m_grouped_fp8_gemm_nt_contiguous": contiguous_args,
    "m_grouped_fp8_gemm_nt_masked": masked_args,
    "fp8_gemm_wgrad_nt": wgrad_args,
    "k_grouped_fp8_gemm_wgrad_nt": k_grouped_args,
}


# Mutations: each turns one valid argument into a bad one.
def to(dtype):
    return lambda t: t.to(dtype)


def to_meta(t):
    return t.to("meta")


def add_dim(t):
    return t.unsqueeze(0)


def drop_dim(t):
    return t[0]


def transposed_storage(t):
    """Same shape and values, but stored transposed: not K-major."""
    return t.mT.contiguous().mT


def one_short(t):
    """One fewer element along the last dim."""
    return t[..., :-1].contiguous()


def one_row_short(t):
    return t[:-1].contiguous()


def overlapping_rows(t):
    return t[..., :1, :].expand(t.shape)


def set_first(value):
    def mutate(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return mutate


def replace(value):
    return lambda _: value


def case(op, arg, mutate, exc=ValueError, meta=True):
    """`meta`: the check is structural (no tensor values), so the Meta kernel makes it too."""
    name = getattr(mutate, "__name__", "mutate")
    return pytest.param(op, arg, mutate, exc, meta, id=f"{op}-{arg}-{name}")


GEMM_CASES = [
    case("fp8_gemm_nt", "a", to(BF16), TypeError),
    case("fp8_gemm_nt", "b", to(FP32), TypeError),
    case("fp8_gemm_nt", "sa", to(torch.float64), TypeError),
    case("fp8_gemm_nt", "out", to(torch.float16), TypeError),
    case("fp8_gemm_nt", "b", to_meta, meta=False),
    case("fp8_gemm_nt", "sa", to_meta, meta=False),
    case("fp8_gemm_nt", "sb", to_meta, meta=False),
    case("fp8_gemm_nt", "out", to_meta, meta=False),
    case("fp8_gemm_nt", "a", add_dim),
    case("fp8_gemm_nt", "b", drop_dim),
    case("fp8_gemm_nt", "b", one_short),  # K differs from a's
    case("fp8_gemm_nt", "sa", one_short),
    case("fp8_gemm_nt", "sa", add_dim),
    case("fp8_gemm_nt", "sb", one_row_short),
    case("fp8_gemm_nt", "out", one_short),
    case("fp8_gemm_nt", "a", transposed_storage),
    case("fp8_gemm_nt", "b", transposed_storage),
    case("fp8_gemm_nt", "out", transposed_storage),
    case("fp8_gemm_nt", "out", overlapping_rows),
    case("m_grouped_fp8_gemm_nt_contiguous", "m_indices", to(torch.int64), TypeError),
    case("m_grouped_fp8_gemm_nt_contiguous", "m_indices", to_meta, meta=False),
    case("m_grouped_fp8_gemm_nt_contiguous", "m_indices", one_short),
    case("m_grouped_fp8_gemm_nt_contiguous", "m_indices", set_first(G), meta=False),
    case("m_grouped_fp8_gemm_nt_contiguous", "m_indices", set_first(-2), meta=False),
    case("m_grouped_fp8_gemm_nt_contiguous", "b", drop_dim),
    case("m_grouped_fp8_gemm_nt_contiguous", "b", transposed_storage),
    case("m_grouped_fp8_gemm_nt_contiguous", "sb", drop_dim),
    case("m_grouped_fp8_gemm_nt_contiguous", "sa", one_row_short),
    case("m_grouped_fp8_gemm_nt_contiguous", "out", overlapping_rows),
    case("m_grouped_fp8_gemm_nt_masked", "masked_m", set_first(M + 1), meta=False),
    case("m_grouped_fp8_gemm_nt_masked", "masked_m", set_first(-1), meta=False),
    case("m_grouped_fp8_gemm_nt_masked", "masked_m", to(torch.int64), TypeError),
    case("m_grouped_fp8_gemm_nt_masked", "masked_m", one_short),
    case("m_grouped_fp8_gemm_nt_masked", "expected_m", replace(-1)),
    case("m_grouped_fp8_gemm_nt_masked", "a", drop_dim),
    case("m_grouped_fp8_gemm_nt_masked", "b", one_row_short),  # G differs from a's
    case("m_grouped_fp8_gemm_nt_masked", "sa", one_short),
    case("m_grouped_fp8_gemm_nt_masked", "sb", to_meta, meta=False),
    case("m_grouped_fp8_gemm_nt_masked", "out", overlapping_rows),
    case("fp8_gemm_wgrad_nt", "out", to(BF16), TypeError),
    case("fp8_gemm_wgrad_nt", "out", to_meta, meta=False),
    case("fp8_gemm_wgrad_nt", "sb", replace(torch.ones(N // 128, K // 128))),  # block scales: 1x128 needed
    case("fp8_gemm_wgrad_nt", "a", transposed_storage),
    case("fp8_gemm_wgrad_nt", "b", one_short),
    case("k_grouped_fp8_gemm_wgrad_nt", "ks", replace([128, 127])),
    case("k_grouped_fp8_gemm_wgrad_nt", "ks", replace([384, -128])),
    case("k_grouped_fp8_gemm_wgrad_nt", "sa", one_short),
    case("k_grouped_fp8_gemm_wgrad_nt", "out", drop_dim),
    case("k_grouped_fp8_gemm_wgrad_nt", "out", to(BF16), TypeError),
]

QUANT_CASES = [
    case("quantize_per_token_group", "x", to(torch.int32), TypeError),
    case("quantize_per_token_group", "x", to(torch.float64), TypeError),
    case("quantize_per_token_group", "group_size", replace(0)),
    case("quantize_per_token_group", "group_size", replace(-128)),
    case("dequantize_per_token_group", "q", to(FP32), TypeError),
    case("dequantize_per_token_group", "scales", one_short),
    case("dequantize_per_token_group", "scales", to(BF16), TypeError),
    case("dequantize_per_token_group", "scales", to_meta, meta=False),
    case("dequantize_per_token_group", "group_size", replace(0)),
    case("dequantize_per_token_group", "out_dtype", replace(torch.int32), TypeError),
    case("quantize_per_block", "w", to(torch.int64), TypeError),
    case("quantize_per_block", "w", drop_dim),
    case("quantize_per_block", "block_size", replace(0)),
    case("dequantize_per_block", "q", to(BF16), TypeError),
    case("dequantize_per_block", "scale_inv", one_row_short),
    case("dequantize_per_block", "block_size", replace(-1)),
    case("dequantize_per_block", "out_dtype", replace(torch.float8_e4m3fn), TypeError),
]

CASES = GEMM_CASES + QUANT_CASES


def raises_naming(exc, op: str, arg: str):
    return pytest.raises(exc, match=rf"{op}: {re.escape(arg)} must")


@pytest.mark.parametrize("op", VALID_ARGS)
def test_valid_arguments_pass(op):
    getattr(ops, op)(**VALID_ARGS[op]())


@pytest.mark.parametrize("op, arg, mutate, exc, meta", CASES)
def test_bad_argument_is_named(op, arg, mutate, exc, meta):
    args = VALID_ARGS[op]()
    args[arg] = mutate(args[arg])
    with raises_naming(exc, op, arg):
        getattr(ops, op)(**args)


def on_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("op, arg, mutate, exc, meta", [c for c in CASES if c.values[-1]])
def test_meta_kernel_rejects_it_too(op, arg, mutate, exc, meta):
    args = {name: on_meta(value) for name, value in VALID_ARGS[op]().items()}
    args[arg] = on_meta(mutate(args[arg]))
    with raises_naming(exc, op, arg):
        getattr(ops, op)(**args)


def test_col_major_scales_need_2d_input():
    with raises_naming(ValueError, "quantize_per_token_group", "x"):
        ops.quantize_per_token_group(torch.randn(K), col_major_scales=True)


@pytest.mark.parametrize("path", ["bogus", "AVX512", ""])
def test_set_cpu_path_rejects_unknown_path(path):
    with pytest.raises(ValueError, match="set_cpu_path: path must be"):
        torch.ops.dsv3.set_cpu_path(path)
    assert torch.ops.dsv3.cpu_path() in ("portable", "avx512")

"""The sm_90a FP8 GEMM kernels (csrc/cuda/fp8_gemm.cu) against the CPU kernels, dsv3.ops.reference and the
unquantized product (calc_diff < 1e-3, SPEC §3), at the V3 shapes: outputs poisoned beforehand, random
m_indices with -1 blocks, masked rows untouched, wgrad accumulation, and the same calls through the fallback
(DSV3_GEMM_FALLBACK=1) for an A/B check."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3 import ops
from dsv3.ops import reference
from dsv3.ops.reference import V3_GEMM_SHAPES

POISON = float("nan")
MAX_DIFF = 1e-3  # calc_diff vs the unquantized product
KERNEL_VS_REFERENCE = 1e-5  # calc_diff vs the float64 evaluation of the same quantized formula


@pytest.fixture(params=["kernel", "fallback"])
def path(request, monkeypatch):
    """Every test runs on the WGMMA kernels and, for the A/B check, on the dequantize + cuBLAS fallback."""
    if request.param == "fallback":
        monkeypatch.setenv("DSV3_GEMM_FALLBACK", "1")
    else:
        monkeypatch.delenv("DSV3_GEMM_FALLBACK", raising=False)
    return request.param


def randn(*shape) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.bfloat16, device="cuda")


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(reference.calc_diff(x, y))


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype, device="cuda")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 64, 128, 4096])
@pytest.mark.parametrize(("n", "k"), V3_GEMM_SHAPES)
def test_fp8_gemm_nt_v3(path, n, k, m, out_dtype):
    torch.manual_seed(m + n + k)
    x, w = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = (
        ops.quantize_per_token_group(x, col_major_scales=m % 2 == 0),
        ops.quantize_per_block(w),
    )
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out=poisoned((m, n), out_dtype))
    assert not out.isnan().any()
    assert diff(out, x.float() @ w.float().t()) < MAX_DIFF
    assert diff(out, reference.fp8_gemm_nt(qa, sa, qb, sb)) < KERNEL_VS_REFERENCE
    if m <= 128:  # the CPU kernel, on the same quantized operands
        cpu = ops.fp8_gemm_nt(qa.cpu(), sa.cpu(), qb.cpu(), sb.cpu(), out_dtype=out_dtype)
        assert diff(out.cpu(), cpu) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize(("m", "n", "k"), [(3, 40, 16), (129, 200, 336), (300, 8, 1040), (65, 136, 7168)])
def test_fp8_gemm_nt_tails(path, m, n, k):
    """M, N and K tails (K % 128 != 0 is zero-filled by TMA), and tiles straddling two B-scale blocks."""
    torch.manual_seed(0)
    x, w = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out=poisoned((m, n), torch.bfloat16))
    assert diff(out, reference.fp8_gemm_nt(qa, sa, qb, sb)) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize(("m", "n", "k"), [(129, 200, 336), (64, 16, 128), (300, 136, 1040)])
def test_fp8_gemm_nt_strided_bf16_out(path, m, n, k):
    """A bf16 output that is a view into a wider, taller buffer: the TMA store (a box clipped at the view's
    edges, its row stride the buffer's) writes the view only; the padding columns and rows stay poisoned."""
    torch.manual_seed(1)
    x, w = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    buffer = poisoned((m + 1, n + 24), torch.bfloat16)
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out=buffer[:m, :n])
    assert buffer[:m, n:].isnan().all() and buffer[m:].isnan().all()
    assert diff(out, reference.fp8_gemm_nt(qa, sa, qb, sb)) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize(("m", "n", "k"), [(1100, 1024, 640), (1100, 512, 1040), (4096, 4096, 7168)])
def test_fp8_gemm_nt_cluster(path, m, n, k):
    """Dense GEMMs the plan runs on 2-CTA clusters (A multicast to both CTAs), with M, N and K tails."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert json.loads(torch.ops.dsv3.sm90_gemm_plan("dense", m, n, k, 1, sms))["cluster_size"] == 2
    torch.manual_seed(2)
    x, w = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    out = ops.fp8_gemm_nt(qa, sa, qb, sb, out=poisoned((m, n), torch.bfloat16))
    assert not out.isnan().any()
    assert diff(out, reference.fp8_gemm_nt(qa, sa, qb, sb)) < KERNEL_VS_REFERENCE


def contiguous_layout(groups: int, rows_per_group: int, generator: torch.Generator) -> torch.Tensor:
    """m_indices of 128-aligned segments of random length, padding blocks marked -1."""
    parts = []
    for g in torch.randperm(groups, generator=generator).tolist():
        rows = int(rows_per_group * (0.7 + 0.6 * torch.rand(1, generator=generator)))
        blocks = (rows + 127) // 128
        parts += [torch.full((blocks * 128,), g, dtype=torch.int32)]
        if torch.rand(1, generator=generator) < 0.5:
            parts += [torch.full((128,), -1, dtype=torch.int32)]
    return torch.cat(parts).cuda()


@pytest.mark.parametrize(("groups", "rows_per_group"), [(4, 1024), (8, 512)])
@pytest.mark.parametrize(("n", "k"), [(4096, 7168), (7168, 2048)])
def test_m_grouped_contiguous(path, groups, rows_per_group, n, k):
    gen = torch.Generator().manual_seed(groups * n)
    m_indices = contiguous_layout(groups, rows_per_group, gen)
    x, w = randn(m_indices.numel(), k), randn(groups, n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    out = ops.m_grouped_fp8_gemm_nt_contiguous(
        qa, sa, qb, sb, m_indices, out=poisoned((x.shape[0], n), torch.bfloat16)
    )
    skipped = m_indices < 0
    assert (out[skipped] == 0).all()
    want = reference.m_grouped_fp8_gemm_nt_contiguous(qa, sa, qb, sb, m_indices)
    assert diff(out[~skipped], want[~skipped]) < KERNEL_VS_REFERENCE
    exact = torch.einsum("mk,mnk->mn", x[~skipped].float(), w[m_indices[~skipped].long()].float())
    assert diff(out[~skipped], exact) < MAX_DIFF


@pytest.mark.parametrize(("groups", "m_max", "expected_m"), [(1, 1024, 512), (4, 256, 128), (6, 64, 20)])
@pytest.mark.parametrize(("n", "k"), [(4096, 7168), (7168, 2048)])
def test_m_grouped_masked(path, groups, m_max, expected_m, n, k):
    torch.manual_seed(groups + n)
    masked_m = torch.randint(0, m_max + 1, (groups,), dtype=torch.int32).cuda()
    x, w = randn(groups, m_max, k), randn(groups, n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    out0 = poisoned((groups, m_max, n), torch.bfloat16)
    out = ops.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, expected_m, out=out0.clone())
    for g, rows in enumerate(masked_m.tolist()):
        assert out[g, rows:].isnan().all()  # untouched
        if rows:
            assert diff(out[g, :rows], x[g, :rows].float() @ w[g].float().t()) < MAX_DIFF
    want = reference.m_grouped_fp8_gemm_nt_masked(qa, sa, qb, sb, masked_m, out0)
    valid = ~want.isnan()
    assert diff(out[valid], want[valid]) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize("k", [4096, 1040])
@pytest.mark.parametrize(("m", "n"), [(2112, 7168), (576, 7168), (7168, 2048), (4096, 7168)])
def test_fp8_gemm_wgrad_accumulates(path, m, n, k):
    torch.manual_seed(m + n + k)
    x, y = randn(m, k), randn(n, k)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_token_group(y)
    before = torch.randn(m, n, device="cuda")
    out = ops.fp8_gemm_wgrad_nt(qa, sa, qb, sb, out=before.clone())
    assert diff(out - before, x.float() @ y.float().t()) < MAX_DIFF
    assert diff(out, reference.fp8_gemm_wgrad_nt(qa, sa, qb, sb, before)) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize(("m", "n", "ks"), [(7168, 4096, [4096, 0, 2048, 1024]), (2048, 7168, [1024] * 8)])
def test_k_grouped_wgrad(path, m, n, ks):
    torch.manual_seed(len(ks))
    x, y = randn(m, sum(ks)), randn(n, sum(ks))
    parts = [
        (ops.quantize_per_token_group(x[:, o : o + k]), ops.quantize_per_token_group(y[:, o : o + k]))
        for o, k in zip([sum(ks[:i]) for i in range(len(ks))], ks, strict=True)
    ]
    qa = torch.cat([p[0][0] for p in parts], 1)
    sa = torch.cat([p[0][1] for p in parts], 1)
    qb = torch.cat([p[1][0] for p in parts], 1)
    sb = torch.cat([p[1][1] for p in parts], 1)
    before = torch.randn(len(ks), m, n, device="cuda")
    out = ops.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks, out=before.clone())
    assert diff(out, reference.k_grouped_fp8_gemm_wgrad_nt(qa, sa, qb, sb, ks, before)) < KERNEL_VS_REFERENCE


def test_fallback_and_kernel_agree():
    """A/B: the same call through the kernel and through DSV3_GEMM_FALLBACK=1 (bf16 rounding apart)."""
    torch.manual_seed(1)
    x, w = randn(4096, 7168), randn(2112, 7168)
    (qa, sa), (qb, sb) = ops.quantize_per_token_group(x), ops.quantize_per_block(w)
    kernel = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_GEMM_FALLBACK", "1")
        fallback = ops.fp8_gemm_nt(qa, sa, qb, sb, out_dtype=torch.float32)
    assert diff(kernel, fallback) < KERNEL_VS_REFERENCE

"""The sm_90a MLA decode kernels (csrc/cuda/mla_decode.cu) against dsv3.ops.reference and the CPU op, on a
FlashMLA-like grid (random page permutation, NaN in every slot past a request's length, garbage in unused
block-table entries, zero lengths, causal MTP tokens) with FlashMLA's tolerances (SPEC §4); the schedule
against the CPU's, split independence, the FP8 cache, the ATen fallback (DSV3_MLA_FALLBACK=1) and bad block
tables."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsv3 import ops
from dsv3.ops import reference

D_QK, D_V, PAGE = 576, 512, 64
UNUSED_PAGE = 2147480000  # what FlashMLA's tests put in unused block-table entries


def check_allclose(
    name: str, x: torch.Tensor, ref: torch.Tensor, abs_tol: float, rel_tol: float, cos_tol=None
):
    """FlashMLA's check: +-inf/NaN at the same positions; every finite element within abs_tol or rel_tol;
    optionally the cosine diff (1 - 2 sum(xy) / sum(x^2 + y^2)) over the finite elements <= cos_tol."""
    assert x.shape == ref.shape, (name, x.shape, ref.shape)
    x, ref = x.double().cpu(), ref.double().cpu()
    for what, fn in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = fn(x) != fn(ref)
        assert not bad.any(), f"{name}: {what} positions differ at {bad.nonzero()[:8].tolist()}"
    finite = torch.isfinite(ref)
    x, ref = x[finite], ref[finite]
    if ref.numel() == 0:
        return
    err = (x - ref).abs()
    ok = (err < abs_tol) | (err / ref.abs().clamp_min(1e-30) < rel_tol)
    worst = int(err.argmax())
    assert ok.all(), (
        f"{name}: {int((~ok).sum())} elements off, worst {float(x[worst])} vs {float(ref[worst])}"
    )
    if cos_tol is not None:
        assert reference.calc_diff(x, ref) <= cos_tol, (name, reference.calc_diff(x, ref))


def check_out_lse(out, lse, out_ref, lse_ref):
    check_allclose("out", out, out_ref, 8e-4, 2.01 / 128, 5e-6)
    check_allclose("lse", lse, lse_ref, 1e-6, 8.01 / 65536)


def make_case(b, s_q, s_k, h_q, h_kv, varlen, dtype=torch.bfloat16, zero_lens=False, seed=0):
    """q, a paged cache with pages in random order, block_table and cache_seqlens as FlashMLA's tests build
    them; every cache slot past a request's length is NaN and unused block-table entries are garbage."""
    torch.manual_seed(seed)
    lens = [max(int(torch.empty(1).normal_(s_k, s_k / 2)), s_q) if varlen else s_k for _ in range(b)]
    if zero_lens:
        lens = [0 if i % 2 == 0 else n for i, n in enumerate(lens)]
    pages_per_req = max(1, math.ceil(max(lens) / PAGE))
    num_blocks = b * pages_per_req
    block_table = torch.randperm(num_blocks, device="cuda").view(b, pages_per_req).int()
    kv = (torch.randn(num_blocks, PAGE, h_kv, D_QK, device="cuda") / 10).clamp(-1, 1).to(dtype)
    q = (torch.randn(b, s_q, h_q, D_QK, device="cuda") / 10).clamp(-1, 1).to(dtype)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    pos = torch.arange(pages_per_req * PAGE, device="cuda")
    slot = block_table.long()[:, pos // PAGE] * PAGE + pos % PAGE  # [b, pages * 64] flat cache slots
    unused = pos.unsqueeze(0) >= cache_seqlens.unsqueeze(1)
    kv.view(num_blocks * PAGE, h_kv, D_QK)[slot[unused]] = float("nan")
    used_pages = (cache_seqlens.unsqueeze(1) + PAGE - 1) // PAGE
    block_table[torch.arange(pages_per_req, device="cuda").unsqueeze(0) >= used_pages] = UNUSED_PAGE
    return q, kv, block_table, cache_seqlens


# A deterministic seventh of FlashMLA's dense-decode grid (b, s_q, s_k, h_q, h_kv, varlen, causal), every
# value of each axis present; h_q must be a multiple of h_kv.
GRID = [
    c
    for i, c in enumerate(
        itertools.product(
            [1, 2, 6, 64], [1, 2, 4], [20, 140, 4096], [1, 16, 64, 128], [1, 2], [False, True], [False, True]
        )
    )
    if c[3] % c[4] == 0 and i % 7 == 0 and not (c[0] == 64 and c[2] == 4096 and c[3] >= 64)
]


@pytest.mark.parametrize(("b", "s_q", "s_k", "h_q", "h_kv", "varlen", "causal"), GRID)
def test_mla_decode_grid(b, s_q, s_k, h_q, h_kv, varlen, causal):
    q, kv, block_table, lens = make_case(b, s_q, s_k, h_q, h_kv, varlen, seed=b + s_q + s_k + h_q)
    out, lse = ops.mla_decode(q, kv, block_table, lens, D_V, causal=causal)
    out_ref, lse_ref = reference.mla_decode(q, kv, block_table, lens, D_V, causal=causal)
    check_out_lse(out, lse, out_ref, lse_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("s_q", "causal"), [(1, False), (2, True), (4, True)])
def test_mla_decode_zero_lengths_vs_cpu(dtype, s_q, causal):
    """Half the requests empty (out 0, lse +inf), on both devices; causal rows that see no key too."""
    q, kv, block_table, lens = make_case(6, s_q, 140, 16, 1, True, dtype=dtype, zero_lens=True, seed=s_q)
    lens[1] = 1  # with s_q > 1 and causal, its first tokens see no key
    out, lse = ops.mla_decode(q, kv, block_table, lens, D_V, causal=causal)
    out_ref, lse_ref = reference.mla_decode(q, kv, block_table, lens, D_V, causal=causal)
    check_out_lse(out, lse, out_ref, lse_ref)
    assert torch.isposinf(lse[0]).all() and (out[0] == 0).all()
    out_cpu, lse_cpu = ops.mla_decode(q.cpu(), kv.cpu(), block_table.cpu(), lens.cpu(), D_V, causal=causal)
    check_out_lse(out.cpu(), lse.cpu(), out_cpu, lse_cpu)


@pytest.mark.parametrize("parts", [1, 7, 132, 300])
def test_mla_metadata_matches_cpu(parts):
    torch.manual_seed(parts)
    lens = torch.randint(0, 5000, (37,), dtype=torch.int32)
    lens[::5] = 0
    meta, splits = ops.get_mla_decode_metadata(lens.cuda(), 128, 1, parts)
    meta_cpu, splits_cpu = ops.get_mla_decode_metadata(lens, 128, 1, parts)
    meta_ref, splits_ref = reference.get_mla_decode_metadata(lens, 128, 1, parts)
    assert torch.equal(meta.cpu(), meta_cpu) and torch.equal(splits.cpu(), splits_cpu)
    assert torch.equal(meta_cpu, meta_ref) and torch.equal(splits_cpu, splits_ref)


def test_mla_metadata_default_parts():
    lens = torch.full((128,), 4096, dtype=torch.int32, device="cuda")
    meta, splits = ops.get_mla_decode_metadata(lens, 128, 1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert meta.shape == (max(1, sms // 2), 8) and splits.shape == (129,)


@pytest.mark.parametrize("causal", [False, True])
def test_mla_decode_split_independence(causal):
    """The same result, up to fp32 summation order, whatever the schedule: 1 part (no split), many parts
    (long requests split across up to ~20 parts and merged by the combine kernel), the default."""
    q, kv, block_table, lens = make_case(4, 2, 4096, 64, 1, True, seed=11)
    results = []
    for parts in (1, 80, None):
        meta = ops.get_mla_decode_metadata(lens, 2 * 64, 1, parts) if parts else (None, None)
        results.append(ops.mla_decode(q, kv, block_table, lens, D_V, None, causal, *meta))
    out_ref, lse_ref = reference.mla_decode(q, kv, block_table, lens, D_V, causal=causal)
    for out, lse in results:
        check_out_lse(out, lse, out_ref, lse_ref)
        check_allclose("out vs 1 part", out, results[0][0], 8e-4, 2.01 / 128, 5e-6)


@pytest.mark.parametrize(
    ("b", "s_q", "s_k", "h_q", "causal"), [(2, 1, 140, 128, False), (6, 2, 4096, 64, True)]
)
def test_mla_decode_fp8_kv(b, s_q, s_k, h_q, causal):
    """Packed FP8 cache (bf16 queries): vs the reference on the same packed cache; unused slots are 0xFF
    bytes (NaN codes, NaN scales, NaN rope)."""
    q, kv, block_table, lens = make_case(b, s_q, s_k, h_q, 1, True, seed=s_k)
    packed = ops.quantize_mla_kv_fp8(kv.nan_to_num(0.0), D_V)
    packed[kv.isnan().any(-1)] = 0xFF  # exactly the slots make_case poisoned
    for cache in (packed, packed.view(torch.float8_e4m3fn)):
        out, lse = ops.mla_decode(q, cache, block_table, lens, D_V, causal=causal)
        out_ref, lse_ref = reference.mla_decode(q, packed, block_table, lens, D_V, causal=causal)
        check_out_lse(out, lse, out_ref, lse_ref)


@pytest.mark.parametrize("case", ["v3", "fp8", "fp32_q", "small_dims"])
def test_mla_decode_fallback(case, monkeypatch):
    """The ATen fallback: forced for V3 shapes (A/B against the kernel), and taken on its own for fp32
    queries and head dims the kernel does not serve."""
    q, kv, block_table, lens = make_case(6, 2, 140, 16, 2, True, seed=5)
    d_v = D_V
    if case == "fp8":
        q, kv = q[:, :, :8], ops.quantize_mla_kv_fp8(kv[:, :, :1].nan_to_num(0.0), D_V)
    elif case == "fp32_q":
        q, kv = q.float(), kv.float()
    elif case == "small_dims":
        q, kv, d_v = q[..., :96].contiguous(), kv[..., :96].contiguous(), 64
    kernel = ops.mla_decode(q, kv, block_table, lens, d_v, causal=True)
    monkeypatch.setenv("DSV3_MLA_FALLBACK", "1")
    out, lse = ops.mla_decode(q, kv, block_table, lens, d_v, causal=True)
    out_ref, lse_ref = reference.mla_decode(q, kv, block_table, lens, d_v, causal=True)
    check_out_lse(out, lse, out_ref, lse_ref)
    check_out_lse(*kernel, out_ref, lse_ref)


def test_mla_decode_strided_q():
    """q with arbitrary strides (a slice of a larger tensor), last dim contiguous."""
    q, kv, block_table, lens = make_case(2, 2, 140, 32, 1, False, seed=3)
    wide = torch.zeros(2, 2, 64, D_QK + 64, dtype=q.dtype, device="cuda")
    wide[:, :, ::2, :D_QK] = q
    q_view = wide[:, :, ::2, :D_QK]
    out, lse = ops.mla_decode(q_view, kv, block_table, lens, D_V, causal=True)
    check_out_lse(out, lse, *reference.mla_decode(q, kv, block_table, lens, D_V, causal=True))


@pytest.mark.parametrize("bad", [-1, "num_blocks", UNUSED_PAGE])
def test_mla_decode_bad_block_table(bad):
    q, kv, block_table, lens = make_case(2, 1, 140, 16, 1, False, seed=1)
    block_table[1, 1] = kv.shape[0] if bad == "num_blocks" else bad
    with pytest.raises(ValueError, match="block_table"):
        ops.mla_decode(q, kv, block_table, lens, D_V)


def test_mla_decode_length_past_block_table():
    q, kv, block_table, lens = make_case(2, 1, 140, 16, 1, False, seed=2)
    lens[0] = block_table.shape[1] * PAGE + 1
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.mla_decode(q, kv, block_table, lens, D_V)

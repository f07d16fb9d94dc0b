"""MLA decode (SPEC §4) on both CPU code paths against the fp32 reference (dsv3.ops.reference), in FlashMLA's
test harness: random page permutations with unused block-table entries set to garbage, NaN in every cache slot
no request may read, normal-distributed lengths with zeros, causal MTP rows, GQA, V3 and tiny-model head dims,
and FlashMLA's tolerances. Plus the split-KV schedule, NaN containment, the FP8 KV cache and torch.compile."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from helpers import assert_mla_close

from dsv3 import ops
from dsv3.ops import reference
from dsv3.ops.reference import ceil_div

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
FP8 = torch.float8_e4m3fn
PAGE = 64
UNUSED_PAGE = 2147480000  # FlashMLA's marker for block-table entries past a request's pages
V3 = (576, 512)  # d_qk, head_dim_v

# FlashMLA's dense-decode tolerances (SPEC §4): an element passes within abs or rel; cosine diff for out.
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536)


def check(out, lse, ref_out, ref_lse) -> None:
    assert not out.isnan().any(), "NaN in out: a poisoned cache slot was read"
    assert_mla_close(out, ref_out, **OUT_TOL)
    assert_mla_close(lse, ref_lse, **LSE_TOL)
    no_key = lse.isinf().transpose(1, 2)  # [b, s_q, h_q]
    assert (out[no_key] == 0).all(), "a query without keys must give out = 0"


# --------------------------------------------------------------------------------------------------
# FlashMLA-style test data


def seqlens(b: int, s_q: int, s_k: int, varlen: bool, zero_len: bool = False) -> torch.Tensor:
    """Lengths s_k, or FlashMLA's `max(normalvariate(s_k, s_k / 2), s_q)`; zero_len zeroes about half."""
    lens = [max(int(random.normalvariate(s_k, s_k / 2)), s_q) if varlen else s_k for _ in range(b)]
    if zero_len:
        lens = [0 if random.random() < 0.5 else n for n in lens]
    return torch.tensor(lens, dtype=torch.int32)


def paged_cache(lens: torch.Tensor, h_kv: int, d_qk: int, dtype, spare_pages: int = 3, spare_cols: int = 1):
    """A cache with each request's pages at random places and a few pages no request uses, every slot a
    request may not read set to NaN, and block-table entries past each request's pages set to UNUSED_PAGE.
    Returns (kv_cache [pages, 64, h_kv, d_qk], block_table, readable: bool [pages * 64])."""
    pages = [ceil_div(int(n), PAGE) for n in lens]
    num_blocks = sum(pages) + spare_pages
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    block_table = torch.full((len(pages), max(pages, default=0) + spare_cols), UNUSED_PAGE, dtype=torch.int32)
    readable = torch.zeros(num_blocks * PAGE, dtype=torch.bool)
    start = 0
    for i, (n, length) in enumerate(zip(pages, lens.tolist(), strict=True)):
        ids = perm[start : start + n]
        start += n
        block_table[i, :n] = ids
        readable[(ids.long()[:, None] * PAGE + torch.arange(PAGE)).flatten()[:length]] = True
    kv = torch.randn(num_blocks, PAGE, h_kv, d_qk).to(dtype)
    kv.view(-1, h_kv, d_qk)[~readable] = float("nan")
    return kv, block_table, readable


def make_case(b, s_q, s_k, h_q, h_kv, d_qk, varlen=True, zero_len=False, dtype=BF16):
    lens = seqlens(b, s_q, s_k, varlen, zero_len)
    kv, block_table, _ = paged_cache(lens, h_kv, d_qk, dtype)
    q = torch.randn(b, s_q, h_q, d_qk).to(dtype)
    return q, kv, block_table, lens


def seed_for(key: str) -> None:
    """Module-scoped fixtures run before the per-test seed: seed them from their own key."""
    seed = zlib.crc32(key.encode())
    torch.manual_seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------------------------------
# FlashMLA's grid, a representative subset: every b, s_q, s_k, h_q and h_kv value of its HEAD harness
# appears, with V3's 576/512 for most cases, the tiny presets' head dims and fp16/fp32 for a few.

# (b, s_q, s_k, h_q, h_kv, (d_qk, d_v), varlen, zero_len, causal, dtype)
GRID = [
    (1, 1, 20, 1, 1, V3, False, False, False, BF16),
    (1, 4, 4096, 16, 1, V3, False, False, True, BF16),
    (2, 1, 4096, 64, 1, V3, True, False, False, BF16),
    (2, 2, 140, 128, 2, V3, True, False, True, BF16),
    (2, 2, 4096, 128, 1, V3, True, False, True, BF16),
    (6, 2, 140, 16, 1, V3, True, True, True, BF16),
    (6, 4, 20, 3, 1, V3, True, False, True, BF16),
    (6, 1, 4096, 16, 2, V3, True, True, False, BF16),
    (64, 1, 140, 16, 1, V3, True, True, False, BF16),
    (64, 2, 20, 64, 2, V3, True, False, True, BF16),
    (64, 4, 140, 1, 1, V3, False, False, True, BF16),
    (2, 2, 140, 16, 1, V3, True, False, True, FP16),
    (6, 1, 140, 64, 2, V3, True, True, False, FP32),
    (6, 2, 140, 3, 1, (64, 48), True, False, True, BF16),
    (64, 4, 20, 16, 2, (40, 24), True, True, True, BF16),
    (2, 1, 4096, 64, 2, (192, 128), True, False, False, BF16),
    (6, 2, 140, 128, 1, (192, 128), True, True, True, FP32),
]


def grid_id(c) -> str:
    b, s_q, s_k, h_q, h_kv, (d_qk, d_v), varlen, zero_len, causal, dtype = c
    flags = "-varlen" * varlen + "-zeros" * zero_len + "-causal" * causal
    return f"b{b}-sq{s_q}-sk{s_k}-hq{h_q}-hkv{h_kv}-d{d_qk}x{d_v}{flags}-{str(dtype)[6:]}"


@pytest.fixture(scope="module", params=GRID, ids=grid_id)
def grid_case(request):
    """Inputs and reference of one grid case, built once for both CPU paths."""
    b, s_q, s_k, h_q, h_kv, (d_qk, d_v), varlen, zero_len, causal, dtype = request.param
    seed_for(grid_id(request.param))
    q, kv, block_table, lens = make_case(b, s_q, s_k, h_q, h_kv, d_qk, varlen, zero_len, dtype)
    args = (q, kv, block_table, lens, d_v)
    return args, causal, reference.mla_decode(*args, causal=causal)


def test_mla_decode_grid(cpu_path, grid_case):
    args, causal, (ref_out, ref_lse) = grid_case
    q, d_v = args[0], args[-1]
    out, lse = ops.mla_decode(*args, causal=causal)
    assert out.shape == (*q.shape[:3], d_v) and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == FP32
    check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("d_qk, d_v", [V3, (64, 48)])
def test_rows_without_keys(cpu_path, d_qk, d_v):
    """Causal MTP rows where s_k < s_q: token i sees keys 0 .. s_k - s_q + i, none when that is negative;
    an empty request sees none at all. Such rows give out exactly 0 and lse +inf."""
    s_q, h_q = 4, 8
    lens = torch.tensor([0, 1, 2, 3, 4, 65], dtype=torch.int32)
    kv, block_table, _ = paged_cache(lens, 1, d_qk, BF16)
    q = torch.randn(len(lens), s_q, h_q, d_qk, dtype=BF16)
    out, lse = ops.mla_decode(q, kv, block_table, lens, d_v, causal=True)
    seen = torch.tensor([[n - s_q + i + 1 > 0 for i in range(s_q)] for n in lens.tolist()])  # [b, s_q]
    assert torch.equal(lse.isposinf(), ~seen[:, None, :].expand_as(lse))
    check(out, lse, *reference.mla_decode(q, kv, block_table, lens, d_v, causal=True))


def test_softmax_scale(cpu_path):
    q, kv, block_table, lens = make_case(3, 2, 140, 16, 1, 576)
    default = ops.mla_decode(q, kv, block_table, lens, 512)
    explicit = ops.mla_decode(q, kv, block_table, lens, 512, softmax_scale=576**-0.5)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    out, lse = ops.mla_decode(q, kv, block_table, lens, 512, softmax_scale=0.3)
    check(out, lse, *reference.mla_decode(q, kv, block_table, lens, 512, softmax_scale=0.3))
    assert not torch.allclose(lse, default[1])


def test_causal_is_ignored_for_one_query_token(cpu_path):
    q, kv, block_table, lens = make_case(4, 1, 140, 16, 1, 576)
    plain = ops.mla_decode(q, kv, block_table, lens, 512)
    causal = ops.mla_decode(q, kv, block_table, lens, 512, causal=True)
    assert torch.equal(plain[0], causal[0]) and torch.equal(plain[1], causal[1])


def test_gqa_packing_equals_one_kv_head_at_a_time(cpu_path):
    """h_kv = 2: KV head j serves query heads [j * h_q / h_kv, (j + 1) * h_q / h_kv), exactly as separate
    calls (with the same schedule) compute them."""
    h_q, h_kv, s_q = 6, 2, 2
    q, kv, block_table, lens = make_case(3, s_q, 300, h_q, h_kv, 576)
    meta = ops.get_mla_decode_metadata(lens, s_q * h_q // h_kv, h_kv, num_sm_parts=3)
    out, lse = ops.mla_decode(
        q, kv, block_table, lens, 512, causal=True, tile_scheduler_metadata=meta[0], num_splits=meta[1]
    )
    g = h_q // h_kv
    for j in range(h_kv):
        heads = slice(j * g, (j + 1) * g)
        o_j, l_j = ops.mla_decode(
            q[:, :, heads],
            kv[:, :, j : j + 1],
            block_table,
            lens,
            512,
            causal=True,
            tile_scheduler_metadata=meta[0],
            num_splits=meta[1],
        )
        assert torch.equal(out[:, :, heads], o_j) and torch.equal(lse[:, heads], l_j)


def test_strided_q_and_kv_cache(cpu_path):
    """q a slice of a bigger tensor (every other head, an offset in the head dim) and kv_cache a view that
    skips a KV head and pads its rows: the same result as contiguous copies."""
    b, s_q, h_q, h_kv, d_qk, d_v = 3, 2, 8, 2, 64, 48
    lens = seqlens(b, s_q, 150, varlen=True)
    kv, block_table, _ = paged_cache(lens, h_kv, d_qk, BF16)
    kv_big = torch.randn(kv.shape[0], PAGE, h_kv + 1, d_qk + 16, dtype=BF16)
    kv_big[:, :, 1:, 8 : 8 + d_qk] = kv
    kv_view = kv_big[:, :, 1:, 8 : 8 + d_qk]
    q_big = torch.randn(b, s_q, 2 * h_q, d_qk + 32, dtype=BF16)
    q_view = q_big[:, :, ::2, 16 : 16 + d_qk]
    assert not q_view.is_contiguous() and not kv_view.is_contiguous()
    strided = ops.mla_decode(q_view, kv_view, block_table, lens, d_v, causal=True)
    dense = ops.mla_decode(q_view.contiguous(), kv, block_table, lens, d_v, causal=True)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])
    check(*strided, *reference.mla_decode(q_view, kv_view, block_table, lens, d_v, causal=True))


@pytest.mark.parametrize("b, s_q, h_q", [(0, 1, 16), (0, 2, 128), (3, 0, 16), (3, 1, 0)])
def test_empty_problems(cpu_path, b, s_q, h_q):
    lens = torch.full((b,), 70, dtype=torch.int32)
    kv, block_table, _ = paged_cache(lens, 1, 576, BF16)
    q = torch.randn(b, s_q, h_q, 576, dtype=BF16)
    meta = ops.get_mla_decode_metadata(lens, max(s_q * h_q, 1), 1)
    for kwargs in ({}, dict(tile_scheduler_metadata=meta[0], num_splits=meta[1])):
        out, lse = ops.mla_decode(q, kv, block_table, lens, 512, causal=True, **kwargs)
        assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)


# --------------------------------------------------------------------------------------------------
# The split-KV schedule


def walk_schedule(meta: torch.Tensor, num_splits: torch.Tensor, lens: torch.Tensor) -> None:
    """The parts, in order, cover every block of every request exactly once, in order; request i's slices
    carry split indices 0, 1, ... and num_splits[i + 1] - num_splits[i] of them; empty requests get one."""
    blocks = [ceil_div(max(int(n), 0), PAGE) for n in lens.tolist()]
    slices: list[list[tuple[int, int, int]]] = [[] for _ in blocks]  # per request: (split, first, last)
    for begin_req, begin_block, end_req, end_block, begin_split, *pad in meta.tolist():
        assert pad == [0, 0, 0]
        for r in range(begin_req, end_req + 1):
            first = begin_block if r == begin_req else 0
            last = end_block if r == end_req else blocks[r]
            slices[r].append((begin_split if r == begin_req else 0, first, last))
    ns = num_splits.tolist()
    assert ns[0] == 0 and ns[-1] <= len(blocks) + meta.shape[0]
    for r, parts in enumerate(slices):
        assert [s for s, _, _ in parts] == list(range(len(parts))), (r, parts)
        covered = [blk for _, first, last in parts for blk in range(first, last)]
        assert covered == list(range(blocks[r])), (r, parts)
        assert ns[r + 1] - ns[r] == len(parts) >= 1, (r, parts, ns)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64, 132, 1000])
@pytest.mark.parametrize("b", [1, 5, 64])
def test_metadata_matches_mirror(b, parts):
    lens = seqlens(b, 1, random.choice([20, 700, 4096]), varlen=True, zero_len=b > 1)
    meta, num_splits = ops.get_mla_decode_metadata(lens, 16, 1, num_sm_parts=parts)
    ref_meta, ref_splits = reference.get_mla_decode_metadata(lens, 16, 1, parts)
    assert torch.equal(meta, ref_meta) and torch.equal(num_splits, ref_splits)
    assert meta.shape == (parts, 8) and num_splits.shape == (b + 1,) and meta.dtype == torch.int32
    walk_schedule(meta, num_splits, lens)


@pytest.mark.parametrize("lens", [[], [0], [0, 0, 0], [1], [64], [65, 0, 4096], [10**6]])
@pytest.mark.parametrize("parts", [1, 2, 33])
def test_metadata_corner_lengths(lens, parts):
    lens = torch.tensor(lens, dtype=torch.int32)
    meta, num_splits = ops.get_mla_decode_metadata(lens, 1, 1, num_sm_parts=parts)
    ref = reference.get_mla_decode_metadata(lens, 1, 1, parts)
    assert torch.equal(meta, ref[0]) and torch.equal(num_splits, ref[1])
    walk_schedule(meta, num_splits, lens)


@pytest.mark.parametrize("rows, h_kv", [(1, 1), (64, 1), (65, 1), (128, 2), (512, 1)])
def test_metadata_default_parts(rows, h_kv):
    """Without num_sm_parts: one part per ATen thread left after (KV head, 64-row tile) pairs, at least 1."""
    lens = seqlens(8, 1, 500, varlen=True)
    meta, _ = ops.get_mla_decode_metadata(lens, rows, h_kv)
    assert meta.shape[0] == max(1, torch.get_num_threads() // (h_kv * ceil_div(rows, 64)))


def split_case(dtype):
    """Long and short requests (one empty) so that many part counts split them differently."""
    lens = torch.tensor([1000, 3, 0, 2500, 130], dtype=torch.int32)
    kv, block_table, _ = paged_cache(lens, 1, 576, dtype)
    q = torch.randn(len(lens), 2, 16, 576).to(dtype)
    return q, kv, block_table, lens


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_result_does_not_depend_on_the_split(cpu_path, dtype):
    """num_sm_parts only changes where requests are cut and the order of the combine's fp32 sums: fp32
    results agree to fp32 rounding, bf16 ones to one bf16 rounding step; all match the reference."""
    q, kv, block_table, lens = split_case(dtype)
    ref = reference.mla_decode(q, kv, block_table, lens, 512, causal=True)
    base_out, base_lse = ops.mla_decode(q, kv, block_table, lens, 512, causal=True)
    for parts in [1, 2, 5, 33, 132]:
        meta, num_splits = ops.get_mla_decode_metadata(lens, 2 * 16, 1, num_sm_parts=parts)
        if parts >= 5:
            assert num_splits[-1] > len(lens), "the case should split some request"
        out, lse = ops.mla_decode(
            q, kv, block_table, lens, 512, causal=True, tile_scheduler_metadata=meta, num_splits=num_splits
        )
        check(out, lse, *ref)
        torch.testing.assert_close(lse, base_lse, rtol=2e-6, atol=0)
        if dtype == FP32:
            torch.testing.assert_close(out, base_out, rtol=1e-5, atol=1e-6)
        else:
            # Each side rounds to bf16 an fp32 value that differs from the other's by fp32 rounding relative
            # to the summed terms (measured: up to 1 bf16 ulp, and ~1e-7 absolute on outputs that cancel
            # to ~1e-6 whose ulp is smaller).
            torch.testing.assert_close(out.float(), base_out.float(), rtol=2.0**-7, atol=1e-5)


def test_stale_schedule_is_rejected():
    q, kv, block_table, lens = split_case(BF16)
    meta, num_splits = ops.get_mla_decode_metadata(lens, 32, 1, num_sm_parts=5)
    shorter = lens.clone()
    shorter[0] -= 64  # one page less: a schedule for other lengths
    with pytest.raises(ValueError, match="tile_scheduler_metadata"):
        ops.mla_decode(q, kv, block_table, shorter, 512, tile_scheduler_metadata=meta, num_splits=num_splits)


# --------------------------------------------------------------------------------------------------
# NaN stays where it is (SPEC §9)


@pytest.mark.parametrize("parts", [1, 33])
def test_nan_query_row_stays_in_its_row(cpu_path, parts):
    q, kv, block_table, lens = split_case(BF16)
    meta = ops.get_mla_decode_metadata(lens, 32, 1, num_sm_parts=parts)
    clean = ops.mla_decode(q, kv, block_table, lens, 512, tile_scheduler_metadata=meta[0], num_splits=meta[1])
    q[0, 1, 5, 7] = float("nan")  # request 0 (split over several parts when parts = 33)
    q[4, 0, 2, 100] = float("nan")
    out, lse = ops.mla_decode(
        q, kv, block_table, lens, 512, tile_scheduler_metadata=meta[0], num_splits=meta[1]
    )
    nan_rows = torch.zeros(5, 2, 16, dtype=torch.bool)
    nan_rows[0, 1, 5] = nan_rows[4, 0, 2] = True
    assert torch.equal(out.isnan().all(-1), nan_rows) and torch.equal(out.isnan().any(-1), nan_rows)
    assert torch.equal(lse.isnan(), nan_rows.transpose(1, 2))
    assert torch.equal(out[~nan_rows], clean[0][~nan_rows])
    assert torch.equal(lse[~nan_rows.transpose(1, 2)], clean[1][~nan_rows.transpose(1, 2)])


@pytest.mark.parametrize("parts", [1, 33])
def test_nan_in_one_request_kv_stays_in_that_request(cpu_path, parts):
    q, kv, block_table, lens = split_case(BF16)
    meta = ops.get_mla_decode_metadata(lens, 32, 1, num_sm_parts=parts)
    clean = ops.mla_decode(q, kv, block_table, lens, 512, tile_scheduler_metadata=meta[0], num_splits=meta[1])
    kv[block_table[3, 20], 5, 0, 300] = float("nan")  # a readable slot of request 3, seen by every row
    out, lse = ops.mla_decode(
        q, kv, block_table, lens, 512, tile_scheduler_metadata=meta[0], num_splits=meta[1]
    )
    assert out[3].isnan().all() and lse[3].isnan().all()
    others = [0, 1, 2, 4]
    assert torch.equal(out[others], clean[0][others]) and torch.equal(lse[others], clean[1][others])


# --------------------------------------------------------------------------------------------------
# FP8 KV cache (656 bytes per token for 576/512)


@pytest.mark.parametrize(
    "shape, d_v", [((3, 64, 2, 576), 512), ((70, 64), 48), ((5, 40), 24), ((2, 192), 128)]
)
def test_quantize_mla_kv_fp8_matches_reference(shape, d_v):
    kv = (torch.randn(shape) * torch.rand(shape[-1]).pow(4) * 30).to(BF16)  # mixed column scales
    packed = ops.quantize_mla_kv_fp8(kv, d_v)
    assert packed.dtype == torch.uint8 and packed.shape == (
        *shape[:-1],
        ops.mla_fp8_token_bytes(shape[-1], d_v),
    )
    assert torch.equal(packed, reference.quantize_mla_kv_fp8(kv, d_v))
    back = ops.dequantize_mla_kv_fp8(packed, shape[-1], d_v)
    assert back.dtype == FP32 and back.shape == kv.shape
    assert torch.equal(back[..., d_v:], kv[..., d_v:].float())  # rope kept in bf16
    # e4m3 keeps 4 significant bits (half an ulp: 2^-4 relative); subnormals step by 2^-9 of the group scale
    x = kv[..., :d_v].float().unflatten(-1, (-1, min(d_v, 128)))
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    err = (back[..., :d_v].unflatten(-1, x.shape[-2:]) - x).abs()
    assert (err <= x.abs() * (2.0**-4 + 1e-6) + scale * 2.0**-10).all()
    assert ops.calc_diff(back, kv.float()) < 2e-3


def test_fp8_token_bytes():
    assert ops.mla_fp8_token_bytes(576, 512) == 656
    assert ops.mla_fp8_token_bytes(64, 48) == 48 + 4 + 32


def fp8_case(d_qk, d_v, cache_dtype, via_store: bool):
    """A bf16 paged cache and its packed FP8 copy (quantized at once, or token by token through
    store_mla_kv); unreadable slots hold 0xFF bytes (NaN e4m3, NaN scales, NaN rope)."""
    b, s_q, h_q, h_kv = 4, 2, 16, 1
    lens = seqlens(b, s_q, 200, varlen=True, zero_len=False)
    kv, block_table, readable = paged_cache(lens, h_kv, d_qk, BF16)
    token_bytes = ops.mla_fp8_token_bytes(d_qk, d_v)
    packed = torch.full((kv.shape[0], PAGE, h_kv, token_bytes), 0xFF, dtype=torch.uint8).view(cache_dtype)
    slots = readable.nonzero().flatten()
    rows = kv.view(-1, h_kv, d_qk)[slots]
    if via_store:
        ops.store_mla_kv(packed, rows, slots, head_dim_v=d_v)
    else:
        packed.view(torch.uint8).view(-1, h_kv, token_bytes)[slots] = ops.quantize_mla_kv_fp8(rows, d_v)
    q = torch.randn(b, s_q, h_q, d_qk, dtype=BF16)
    return q, kv, packed, block_table, lens


@pytest.mark.parametrize("via_store", [False, True], ids=["quantize", "store_mla_kv"])
@pytest.mark.parametrize("cache_dtype", [torch.uint8, FP8])
@pytest.mark.parametrize("d_qk, d_v", [V3, (64, 48)])
def test_mla_decode_fp8_cache(cpu_path, d_qk, d_v, cache_dtype, via_store):
    """The kernel dequantizes the same e4m3 · scale values (exact in fp32) that the reference attends over,
    so SPEC §4's tolerances hold; against the bf16 cache only FP8 rounding separates them."""
    q, kv, packed, block_table, lens = fp8_case(d_qk, d_v, cache_dtype, via_store)
    out, lse = ops.mla_decode(q, packed, block_table, lens, d_v, causal=True)
    check(out, lse, *reference.mla_decode(q, packed, block_table, lens, d_v, causal=True))
    deq = ops.dequantize_mla_kv_fp8(packed, d_qk, d_v)
    check(out, lse, *reference.mla_decode(q, deq, block_table, lens, d_v, causal=True))
    bf16_out, bf16_lse = ops.mla_decode(q, kv, block_table, lens, d_v, causal=True)
    assert ops.calc_diff(out, bf16_out) < 1e-3 and ops.calc_diff(lse, bf16_lse) < 1e-5


def test_store_mla_kv_equals_quantizing_the_cache():
    seed_for("fp8 cache")
    _, _, packed_a, *_ = fp8_case(576, 512, torch.uint8, via_store=False)
    seed_for("fp8 cache")
    _, _, packed_b, *_ = fp8_case(576, 512, torch.uint8, via_store=True)
    assert torch.equal(packed_a, packed_b)


# --------------------------------------------------------------------------------------------------
# torch.compile


def test_torch_compile_with_metadata(cpu_path):
    """The Meta kernel lets torch.compile trace a decode step without a graph break."""

    def step(q, kv, block_table, lens, meta, num_splits):
        out, lse = ops.mla_decode(
            q, kv, block_table, lens, 48, causal=True, tile_scheduler_metadata=meta, num_splits=num_splits
        )
        return out.float() * 2, lse

    q, kv, block_table, lens = make_case(3, 2, 200, 8, 1, 64)
    meta, num_splits = ops.get_mla_decode_metadata(lens, 16, 1, num_sm_parts=4)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, kv, block_table, lens, meta, num_splits)
    want = step(q, kv, block_table, lens, meta, num_splits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

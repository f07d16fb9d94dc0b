"""Bad arguments to the MLA decode ops raise ValueError/TypeError whose message names the argument (SPEC §9):
dtypes, devices, ranks, head dims, page size, block-table and length contents within the used pages, and
schedules that do not belong to the lengths. Garbage in block-table entries no request uses is fine. The
structural checks also run in the Meta kernel that torch.compile traces through."""

from __future__ import annotations

import re

import pytest
import torch

from dsv3 import ops

BF16, I32, I64 = torch.bfloat16, torch.int32, torch.int64
UNUSED = 2147480000
D_QK, D_V, PAGES = 64, 48, 8


def decode_args(fp8: bool = False, with_schedule: bool = False):
    """Three requests (70, 0 and 130 tokens) over 8 pages; block-table entries past each request's pages are
    garbage."""
    lens = torch.tensor([70, 0, 130], dtype=I32)
    block_table = torch.tensor([[5, 1, UNUSED, -7], [UNUSED, -1, 99, UNUSED], [2, 7, 0, UNUSED]], dtype=I32)
    kv = torch.randn(PAGES, 64, 1, D_QK, dtype=BF16)
    if fp8:
        kv = ops.quantize_mla_kv_fp8(kv, D_V)
    args = dict(
        q=torch.randn(3, 2, 4, D_QK, dtype=BF16),
        kv_cache=kv,
        block_table=block_table,
        cache_seqlens=lens,
        head_dim_v=D_V,
    )
    if with_schedule:
        meta, num_splits = ops.get_mla_decode_metadata(lens, 2 * 4, 1, num_sm_parts=3)
        args.update(tile_scheduler_metadata=meta, num_splits=num_splits)
    return args


VALID_ARGS = {
    "mla_decode": decode_args,
    "mla_decode fp8": lambda: decode_args(fp8=True),
    "mla_decode schedule": lambda: decode_args(with_schedule=True),
    "get_mla_decode_metadata": lambda: dict(
        cache_seqlens=torch.tensor([70, 0, 130], dtype=I32), num_q_tokens_per_head_k=8, num_heads_k=1
    ),
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


def one_short(t):
    return t[..., :-1].contiguous()


def one_row_short(t):
    return t[:-1].contiguous()


def half_pages(t):
    """Pages of 32 tokens."""
    return t[:, :32].contiguous()


def three_kv_heads(t):
    return t.expand(-1, -1, 3, -1).contiguous()


def transposed_storage(t):
    """Same shape and values, the last two dims stored transposed: not contiguous in the last dim."""
    return t.mT.contiguous().mT


def set_at(index, value):
    def mutate(t):
        t = t.clone()
        t[index] = value
        return t

    mutate.__name__ = f"set{list(index) if isinstance(index, tuple) else [index]}={value}"
    return mutate


def replace(value):
    def mutate(_):
        return value

    mutate.__name__ = f"={value}"
    return mutate


def strided_last_dim(t):
    """Same shape and values, every other element of a bigger tensor's last dim."""
    return torch.stack([t, t], dim=-1)[..., 0]


def case(op, arg, mutate, exc=ValueError, meta=True, match=None):
    """`meta`: the check is structural (no tensor values), so the Meta kernel makes it too. `match`: the
    message when it is not "<arg> must"."""
    name = getattr(mutate, "__name__", "mutate")
    return pytest.param(op, arg, mutate, exc, meta, match, id=f"{op}-{arg}-{name}".replace(" ", "-"))


DECODE_CASES = [
    case("mla_decode", "q", to(torch.int32), TypeError),
    case("mla_decode", "q", to(torch.float64), TypeError),
    case("mla_decode", "q", add_dim),
    case("mla_decode", "q", drop_dim),
    case("mla_decode", "q", transposed_storage),
    case("mla_decode", "q", strided_last_dim),
    case("mla_decode", "kv_cache", to(torch.float32), TypeError),  # not q's dtype
    case("mla_decode", "kv_cache", to(torch.int32), TypeError),
    case("mla_decode", "kv_cache", to_meta, meta=False),
    case("mla_decode", "kv_cache", drop_dim),
    case("mla_decode", "kv_cache", one_short),  # last dim differs from q's d_qk
    case("mla_decode", "kv_cache", half_pages),
    case("mla_decode", "kv_cache", strided_last_dim),
    case("mla_decode", "kv_cache", three_kv_heads, match="q's head count h_q = 4 must be a multiple of"),
    case("mla_decode", "head_dim_v", replace(0)),
    case("mla_decode", "head_dim_v", replace(D_QK + 1)),
    case("mla_decode", "softmax_scale", replace(float("inf"))),
    case("mla_decode", "softmax_scale", replace(float("nan"))),
    case("mla_decode", "block_table", to(I64), TypeError),
    case("mla_decode", "block_table", to_meta, meta=False),
    case("mla_decode", "block_table", drop_dim),
    case("mla_decode", "block_table", one_row_short),
    case("mla_decode", "block_table", transposed_storage),
    case(
        "mla_decode",
        "block_table",
        set_at((0, 1), PAGES),
        meta=False,
        match=re.escape("block_table[0, 1] = 8"),
    ),
    case(
        "mla_decode", "block_table", set_at((2, 2), -1), meta=False, match=re.escape("block_table[2, 2] = -1")
    ),
    case(
        "mla_decode", "block_table", set_at((2, 0), UNUSED), meta=False, match=re.escape("block_table[2, 0]")
    ),
    case("mla_decode", "cache_seqlens", to(I64), TypeError),
    case("mla_decode", "cache_seqlens", to_meta, meta=False),
    case("mla_decode", "cache_seqlens", one_short),
    case("mla_decode", "cache_seqlens", add_dim),
    case("mla_decode", "cache_seqlens", set_at(1, -1), meta=False),
    case(
        "mla_decode",
        "cache_seqlens",
        set_at(0, 4 * 64 + 1),
        meta=False,
        match=re.escape("cache_seqlens[0] = 257"),
    ),
    case("mla_decode fp8", "kv_cache", one_short),  # 83 bytes per token instead of 48 + 4 + 32
    case("mla_decode fp8", "head_dim_v", replace(D_V - 16), match="kv_cache must have last dim 100 "),
    case(
        "mla_decode schedule",
        "num_splits",
        replace(None),
        match="tile_scheduler_metadata and num_splits must",
    ),
    case(
        "mla_decode schedule", "tile_scheduler_metadata", replace(None), match="tile_scheduler_metadata and"
    ),
    case("mla_decode schedule", "tile_scheduler_metadata", to(I64), TypeError),
    case("mla_decode schedule", "tile_scheduler_metadata", one_short),
    case("mla_decode schedule", "tile_scheduler_metadata", drop_dim),
    case("mla_decode schedule", "tile_scheduler_metadata", to_meta, meta=False),
    case("mla_decode schedule", "tile_scheduler_metadata", transposed_storage),
    case("mla_decode schedule", "num_splits", to(I64), TypeError),
    case("mla_decode schedule", "num_splits", one_short),
    case("mla_decode schedule", "num_splits", to_meta, meta=False),
]

STALE = "tile_scheduler_metadata and num_splits are not a schedule for these cache_seqlens"
SCHEDULE_CONTENT_CASES = [
    # A schedule for other lengths (request 2 shorter or empty), or edited.
    case("mla_decode schedule", "cache_seqlens", set_at(2, 64), meta=False, match=STALE),
    case("mla_decode schedule", "cache_seqlens", set_at(2, 0), meta=False, match=STALE),
    case("mla_decode schedule", "num_splits", set_at(-1, 4), meta=False, match=STALE),
    case("mla_decode schedule", "num_splits", set_at(0, 1), meta=False, match=STALE),
    case("mla_decode schedule", "tile_scheduler_metadata", set_at((0, 0), 1), meta=False, match=STALE),
    case("mla_decode schedule", "tile_scheduler_metadata", set_at((-1, 2), 7), meta=False, match=STALE),
    case("mla_decode schedule", "tile_scheduler_metadata", set_at((0, 3), 9), meta=False, match=STALE),
]

METADATA_CASES = [
    case("get_mla_decode_metadata", "cache_seqlens", to(I64), TypeError),
    case("get_mla_decode_metadata", "cache_seqlens", to(torch.float32), TypeError),
    case("get_mla_decode_metadata", "cache_seqlens", add_dim),
    case("get_mla_decode_metadata", "num_q_tokens_per_head_k", replace(0)),
    case("get_mla_decode_metadata", "num_heads_k", replace(-1)),
    case("get_mla_decode_metadata", "num_sm_parts", replace(0)),
    case("get_mla_decode_metadata", "num_sm_parts", replace(2**20 + 1)),
]

CASES = DECODE_CASES + SCHEDULE_CONTENT_CASES + METADATA_CASES


def raises_naming(exc, op: str, arg: str, match: str | None):
    return pytest.raises(exc, match=rf"{op.split()[0]}: " + (match or rf"{re.escape(arg)} must"))


def call(op: str, args: dict):
    return getattr(ops, op.split()[0])(**args)


@pytest.mark.parametrize("op", VALID_ARGS)
def test_valid_arguments_pass(op):
    """Including garbage (huge, negative, out-of-range) block-table entries past every request's pages."""
    call(op, VALID_ARGS[op]())


@pytest.mark.parametrize("op, arg, mutate, exc, meta, match", CASES)
def test_bad_argument_is_named(op, arg, mutate, exc, meta, match):
    args = VALID_ARGS[op]()
    args[arg] = mutate(args.get(arg))
    with raises_naming(exc, op, arg, match):
        call(op, args)


def on_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("op, arg, mutate, exc, meta, match", [c for c in CASES if c.values[4]])
def test_meta_kernel_rejects_it_too(op, arg, mutate, exc, meta, match):
    args = {name: on_meta(value) for name, value in VALID_ARGS[op]().items()}
    args[arg] = on_meta(mutate(args.get(arg)))
    with raises_naming(exc, op, arg, match):
        call(op, args)


def test_garbage_in_unused_entries_does_not_change_the_result():
    args = decode_args()
    out, lse = ops.mla_decode(**args)
    for garbage in (-(2**31), 2**31 - 1, PAGES, -1):
        bt = args["block_table"].clone()
        bt[0, 2:] = garbage
        bt[1] = garbage
        bt[2, 3] = garbage
        other = ops.mla_decode(**{**args, "block_table": bt})
        assert torch.equal(out, other[0]) and torch.equal(lse, other[1])

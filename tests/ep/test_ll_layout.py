"""Host logic of the nvshmem backend's low-latency kernels, on CPU: the buffer layout (Python mirror vs the
C++ header through torch.ops.dsv3.ep_ll_layout), the send phase's FP8 cast, and the packing order."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3.ops as ops
from dsv3.ep.backends import nvshmem as nv

GEOMETRIES = [  # (T, hidden, num_ranks, num_experts)
    (128, 7168, 8, 288),  # DeepEP's low-latency test
    (128, 7168, 16, 256),
    (1, 128, 1, 1),
    (3, 384, 3, 9),  # odd everything
    (256, 4096, 32, 256),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_python_layout_matches_the_kernels_layout(geometry):
    assert nv.ll_layout(*geometry) == json.loads(torch.ops.dsv3.ep_ll_layout(*geometry))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_layout_regions_are_aligned_disjoint_and_large_enough(geometry):
    T, H, R, E = geometry
    layout = nv.ll_layout(*geometry)
    L = E // R
    dmsg, cmsg = layout["dispatch_msg_bytes"], layout["combine_msg_bytes"]
    assert dmsg % 16 == 0 and dmsg >= 16 + max(2 * H, H + H // 128 * 4) and cmsg == 2 * H
    needs = {  # region -> bytes it must hold
        "dispatch_count": 4 * L * R,
        "dispatch_arrival": 8 * L * R,
        "combine_arrival": 8 * E,
        "done": 4 * (L + 1),
        "send": max(T * dmsg, L * R * T * cmsg),
        "recv": E * T * max(dmsg, cmsg),
    }
    order = ["dispatch_count", "dispatch_arrival", "combine_arrival", "done", "send", "recv"]
    halves = layout["halves"]
    assert halves[0]["dispatch_count"] == 0 and halves[1]["dispatch_count"] == halves[0]["end"]
    for half in halves:
        starts = [half[name] for name in order] + [half["end"]]
        assert all(s % nv.LL_ALIGN == 0 for s in starts)
        for name, start, next_start in zip(order, starts, starts[1:], strict=False):
            assert next_start - start >= needs[name], name
        assert half["send_bytes"] >= needs["send"] and half["recv_bytes"] >= needs["recv"]
        assert half["end"] - half["dispatch_count"] == halves[0]["end"]  # both halves the same size
    assert layout["total_bytes"] == halves[1]["end"] == nv.low_latency_size_hint(*geometry)


def test_size_hint_scales_with_tokens_and_experts():
    base = nv.low_latency_size_hint(64, 1024, 4, 16)
    assert nv.low_latency_size_hint(128, 1024, 4, 16) > base
    assert nv.low_latency_size_hint(64, 1024, 4, 32) > base


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 128, 2, 4), "num_max_dispatch_tokens_per_rank"),
        ((8, 100, 2, 4), "hidden"),
        ((8, 128, 0, 4), "num_ranks"),
        ((8, 128, 3, 4), "num_experts"),
    ],
)
def test_bad_geometry_raises_value_error_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        nv.ll_layout(*args)
    with pytest.raises(ValueError, match=match):
        torch.ops.dsv3.ep_ll_layout(*args)


# ---- FP8 cast of the send phase ------------------------------------------------------------------------


def _tokens(n: int, hidden: int) -> torch.Tensor:
    x = torch.randn(n, hidden) * torch.logspace(-3, 3, n).unsqueeze(1)
    x[0] = 0  # amax below the 1e-4 floor
    x[1, :128] = 1e-6
    x[2, 5] = 1e5  # one huge value in a group
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("hidden", [128, 384, 1024])
def test_fp8_cast_matches_quantize_per_token_group(hidden, round_scale):
    x = _tokens(9, hidden)
    q, s = nv.ll_fp8_cast_reference(x, round_scale=round_scale)
    q_ref, s_ref = ops.quantize_per_token_group(x, 128, ue8m0=round_scale)
    assert s.shape == (9, hidden // 128) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    if round_scale:
        mantissa, _ = torch.frexp(s)
        assert torch.all(mantissa == 0.5)  # powers of two


def test_fp8_cast_keeps_nan_in_its_group_only():
    x = _tokens(4, 256)
    x[3, 130] = float("nan")
    q, s = nv.ll_fp8_cast_reference(x)
    assert torch.isnan(s[3, 1]) and not torch.isnan(s[3, 0]) and not torch.isnan(s[:3]).any()
    assert torch.isnan(q[3, 128:].float()).all() and not torch.isnan(q[3, :128].float()).any()


def test_ceil_pow2_is_exact_just_above_a_power_of_two():
    s = torch.tensor([2.0**-12, 2.0**-12 * (1 + 2.0**-23), 3.0, 0.75])
    assert nv._ceil_pow2(s).tolist() == [2.0**-12, 2.0**-11, 4.0, 1.0]


def test_ue8m0_packing_holds_the_exponents_lowest_group_first():
    s = torch.tensor([[2.0**-7, 2.0**-3, 1.0, 2.0**5, 2.0**-20, 0.5, 4.0, 2.0**-1]])
    packed = nv.ll_pack_ue8m0(s)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    exps = [(int(p) >> (8 * j)) & 0xFF for p in packed[0] for j in range(4)]
    assert [2.0 ** (e - 127) for e in exps] == s[0].tolist()
    with pytest.raises(ValueError, match="scales"):
        nv.ll_pack_ue8m0(torch.ones(1, 6))


# ---- packing order ----------------------------------------------------------------------------------------


def _routing(num_ranks: int, num_experts: int, k: int, max_tokens: int) -> list[torch.Tensor]:
    """Per source rank: topk_idx [n_s, k] without repeats in a row, with some -1 entries."""
    out = []
    for _ in range(num_ranks):
        n = int(torch.randint(0, max_tokens + 1, ()))
        idx = (
            torch.stack([torch.randperm(num_experts)[:k] for _ in range(n)])
            if n
            else torch.empty(0, k).long()
        )
        idx[torch.rand(idx.shape) < 0.15] = -1
        out.append(idx)
    return out


def test_send_slots_count_earlier_entries_of_the_same_expert():
    topk = torch.tensor([[3, 1, -1], [1, 3, 0], [-1, -1, -1], [1, 1, 2]])
    slot, count = nv.ll_send_slots(topk, 4)
    assert slot.tolist() == [[0, 0, -1], [1, 1, 0], [-1, -1, -1], [2, 3, 0]]
    assert count.tolist() == [1, 4, 1, 2]
    with pytest.raises(ValueError, match="topk_idx"):
        nv.ll_send_slots(torch.tensor([[4]]), 4)


@pytest.mark.parametrize("num_ranks, num_experts, k", [(4, 16, 4), (3, 9, 2), (1, 4, 4), (8, 64, 8)])
def test_packing_follows_the_contract_order(num_ranks, num_experts, k):
    T, L = 12, num_experts // num_ranks
    routing = _routing(num_ranks, num_experts, k, T)
    slots = [nv.ll_send_slots(idx, num_experts) for idx in routing]
    for rank in range(num_ranks):
        counts = torch.stack([c[rank * L : (rank + 1) * L] for _, c in slots])  # [src, L]
        recv_count, layout_range, begin = nv.ll_recv_layout(counts)
        src_info = torch.full((L, num_ranks * T), -1, dtype=torch.int32)
        src_rank = torch.full((L, num_ranks * T), -1, dtype=torch.int32)
        for s, (idx, (slot, _)) in enumerate(zip(routing, slots, strict=True)):
            for t, j in (idx >= 0).nonzero().tolist():
                e = int(idx[t, j])
                if e // L == rank:
                    row = int(begin[e % L, s] + slot[t, j])
                    assert src_info[e % L, row] == -1  # every (token, k) gets a row of its own
                    src_info[e % L, row], src_rank[e % L, row] = t, s
        for le in range(L):
            e = rank * L + le
            expected = [
                (s, t) for s, idx in enumerate(routing) for t in range(idx.shape[0]) if (idx[t] == e).any()
            ]
            n_e = int(recv_count[le])
            assert n_e == len(expected)
            assert (
                list(zip(src_rank[le, :n_e].tolist(), src_info[le, :n_e].tolist(), strict=True)) == expected
            )
            assert (src_info[le, n_e:] == -1).all()
            for s in range(num_ranks):
                lr = int(layout_range[le, s])
                assert lr & 0xFFFFFFFF == counts[s, le] and lr >> 32 == int(counts[:s, le].sum())

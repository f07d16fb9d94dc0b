"""Host logic of the nvshmem backend's internode kernels, on CPU: the buffer layout (Python mirror vs the C++
header through torch.ops.dsv3.ep_internode_layout), the RDMA size hint, and the handle arithmetic the kernels
use (torch.ops.dsv3.ep_internode_plan replays their queue order with the header's functions;
ep_internode_combine_pairs replays the combine's reads) against a torch reference of DeepEP's semantics."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3.ops  # noqa: F401  (loads dsv3._C: the ep_internode_* ops)
from dsv3.ep.backends import nvshmem as nv
from dsv3.ep.config import Config

GEOMETRIES = [  # (num_ranks, num_channels, rdma_slots, nvl_slots, slot_bytes)
    (16, 10, 128, 288, 14352),  # EP16 with DeepEP's dispatch config
    (24, 12, 132, 512, 7680),
    (16, 1, 1, 1, 16),
    (160, 3, 7, 5, 4112),  # DeepEP's largest normal-mode EP
]
ORDER = ["barrier", "notify_arrival", "rdma_meta", "rdma_head", "rdma_flag", "nvl_meta", "nvl_head",
         "nvl_flag", "notify_send", "notify_recv", "rdma_send", "rdma_recv", "nvl_recv"]  # fmt: skip


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_python_layout_matches_the_kernels_layout(geometry):
    assert nv.internode_layout(*geometry) == json.loads(torch.ops.dsv3.ep_internode_layout(*geometry))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_layout_regions_are_aligned_disjoint_and_large_enough(geometry):
    R, C, rdma_slots, nvl_slots, slot = geometry
    layout = nv.internode_layout(*geometry)
    N = R // 8
    needs = {
        "barrier": 8 * R,
        "notify_arrival": 8 * R,
        "rdma_meta": 8 * C * N * 9,
        "rdma_head": 8 * C * N,
        "rdma_flag": 8 * C * N * rdma_slots,
        "nvl_meta": 8 * C * 8 * N,
        "nvl_head": 8 * C * 8,
        "nvl_flag": 8 * C * 8 * nvl_slots,
        "notify_send": R * 4 * (2 + nv.INTERNODE_MAX_LOCAL_EXPERTS),
        "notify_recv": R * 4 * (2 + nv.INTERNODE_MAX_LOCAL_EXPERTS),
        "rdma_send": C * N * rdma_slots * slot,
        "rdma_recv": C * N * rdma_slots * slot,
        "nvl_recv": C * 8 * nvl_slots * slot,
    }
    starts = [layout[name] for name in ORDER] + [layout["total_bytes"]]
    assert starts[0] == 0 and all(s % 128 == 0 for s in starts)
    for name, start, next_start in zip(ORDER, starts, starts[1:], strict=False):
        assert next_start - start >= needs[name], name
    # The sync zeroes exactly the words between the barrier and the notify records.
    assert layout["reset_begin"] == layout["notify_arrival"] and layout["reset_end"] == layout["notify_send"]


def test_records_hold_their_fields():
    for row, k, s in [(14336, 8, 0), (7168, 8, 56), (16, 0, 0), (4096, 32, 128)]:
        size = nv.internode_dispatch_record_bytes(row, k, s)
        assert size % 16 == 0 and row + 8 + 8 * k + 4 * s <= size < row + 8 + 8 * k + 4 * s + 16
    for H, k in [(7168, 8), (8, 0), (4096, 9)]:
        size = nv.internode_combine_record_bytes(H, k)
        assert size % 16 == 0 and 2 * H + 4 * k <= size < 2 * H + 4 * k + 16


@pytest.mark.parametrize(
    "config", [Config(20, 36, 288, 20, 128), Config(24, 8, 512, 16, 128), Config(2, 1, 2, 1, 2)]
)
@pytest.mark.parametrize("num_ranks", [16, 32, 64])
def test_size_hint_is_the_layout_total_at_the_bounds(config, num_ranks):
    hidden_bytes = 14336
    hint = config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
    slot = nv.internode_dispatch_record_bytes(hidden_bytes, 32, 128)
    layout = json.loads(
        torch.ops.dsv3.ep_internode_layout(
            num_ranks,
            config.num_channels,
            config.num_max_rdma_chunked_recv_tokens,
            config.num_max_nvl_chunked_recv_tokens,
            slot,
        )
    )
    assert hint == layout["total_bytes"] and hint % 128 == 0
    # Any call with rows of at most hidden_bytes, k <= 32, scales <= 128 fits (fp8 + scales, bf16 combine).
    for call_slot in (
        nv.internode_dispatch_record_bytes(hidden_bytes // 2, 8, 56),
        nv.internode_combine_record_bytes(hidden_bytes // 2, 32),
    ):
        need = nv.internode_layout(
            num_ranks,
            config.num_channels,
            config.num_max_rdma_chunked_recv_tokens,
            config.num_max_nvl_chunked_recv_tokens,
            call_slot,
        )["total_bytes"]
        assert need <= hint


def test_size_hint_is_zero_within_a_node_and_rejects_partial_nodes():
    for r in (1, 2, 4, 8):
        assert Config().get_rdma_buffer_size_hint(14336, r) == 0
    with pytest.raises(ValueError, match="num_ranks"):
        Config().get_rdma_buffer_size_hint(14336, 20)


@pytest.mark.parametrize(
    "args, match",
    [
        ((8, 4, 8, 8, 16), "num_ranks"),
        ((20, 4, 8, 8, 16), "num_ranks"),
        ((16, 0, 8, 8, 16), "num_channels"),
        ((16, 4, 0, 8, 16), "slot"),
        ((16, 4, 8, 8, 24), "slot_bytes"),
    ],
)
def test_bad_geometry_raises_value_error_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        nv.internode_layout(*args)
    with pytest.raises(ValueError, match=match):
        torch.ops.dsv3.ep_internode_layout(*args)


# ---- handle arithmetic vs a torch reference ----------------------------------------------------------------


def _routing(R: int, n: int, seed: int) -> torch.Tensor:
    """is_token_in_rank [R, n, R] of every rank: top-k experts over R ranks, some tokens routed nowhere, some
    to many ranks of one node."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((R, n, R), generator=g)
    k = torch.randint(1, 6, (R, n, 1), generator=g)
    ranked = scores.argsort(-1, descending=True).argsort(-1)
    in_rank = ranked < k
    in_rank[:, ::7] = False  # tokens that go nowhere
    in_rank[:, 3::11, :8] = True  # tokens for every rank of node 0
    return in_rank


def _channel_prefix(in_rank: torch.Tensor, C: int) -> torch.Tensor:
    """[..., C] inclusive prefix of the counts per channel (channel c = tokens [c*ceil(n/C), ...))."""
    n = in_rank.shape[0]
    per = -(-n // C)
    counts = torch.stack([in_rank[min(c * per, n) : min((c + 1) * per, n)].sum(0) for c in range(C)], -1)
    return counts.cumsum(-1).to(torch.int32)


@pytest.mark.parametrize("R, n, C", [(16, 37, 3), (24, 50, 1), (16, 5, 7), (32, 64, 4)])
def test_plan_matches_the_reference(R, n, C):
    in_rank = _routing(R, n, seed=R * 1000 + n)
    N = R // 8
    plan = torch.ops.dsv3.ep_internode_plan(in_rank, C)
    per_rank = [plan[9 * r : 9 * r + 9] for r in range(R)]
    in_node = in_rank.view(R, n, N, 8).any(-1)  # [src, token, node]
    for r in range(R):
        rdma_cpm, gbl_cpm, rrps, rgps, rrcpm, rgcpm, send_rdma_head, send_nvl_head, recv_src = per_rank[r]
        node, local = divmod(r, 8)
        # Sender side.
        assert torch.equal(rdma_cpm, _channel_prefix(in_node[r], C).view(N, C))
        assert torch.equal(gbl_cpm, _channel_prefix(in_rank[r], C).view(R, C))
        sent = in_node[r].to(torch.int64)
        for p in range(N):  # RDMA positions: per channel, tokens in order
            per = -(-n // C)
            expect = torch.full((n,), -1, dtype=torch.int32)
            for c in range(C):
                lo, hi = min(c * per, n), min((c + 1) * per, n)
                mask = sent[lo:hi, p].bool()
                expect[lo:hi][mask] = torch.arange(int(mask.sum()), dtype=torch.int32)
            assert torch.equal(send_rdma_head[:, p], expect)
        # Receiver side: rows ordered by source rank, then token (the contract's order).
        per_source = in_rank[:, :, r].sum(1)
        assert torch.equal(rgps, per_source.cumsum(0).to(torch.int32))
        src, tok = in_rank[:, :, r].nonzero(as_tuple=True)  # row-major: source, then token
        assert torch.equal(recv_src, torch.stack([src, tok], 1).to(torch.int32))
        # recv_gbl_channel_prefix_matrix: block (s, c) ends where the rows of s's channels <= c end.
        assert torch.equal(
            rgcpm, (rgps - per_source).view(R, 1).to(torch.int32) + _channel_prefix(in_rank[:, :, r].t(), C)
        )
        # Forwarder side: RDMA rows from (m, local) are that rank's tokens for this node, m ascending.
        sources = torch.arange(N) * 8 + local
        from_node = in_node[sources, :, node]  # [N, n]
        assert torch.equal(rrps, from_node.sum(1).cumsum(0).to(torch.int32))
        assert torch.equal(rrcpm, _channel_prefix(from_node.t(), C))
        m_idx, t_idx = from_node.nonzero(as_tuple=True)
        bits = in_rank[sources[m_idx], t_idx, node * 8 : node * 8 + 8]  # [num_rdma_recv, 8]
        assert torch.equal(send_nvl_head >= 0, bits)
        for j in range(8):  # NVLink positions: 0, 1, ... over the rows j gets, per channel
            got = send_nvl_head[:, j][bits[:, j]]
            per = -(-n // C)
            chan = t_idx[bits[:, j]] // per
            for c in range(C):
                assert torch.equal(got[chan == c], torch.arange(int((chan == c).sum()), dtype=torch.int32))


@pytest.mark.parametrize("R, n, C", [(16, 37, 3), (24, 20, 5)])
def test_combine_reads_pair_every_row_with_its_forwarded_token(R, n, C):
    in_rank = _routing(R, n, seed=7 + R + n)
    N = R // 8
    plan = torch.ops.dsv3.ep_internode_plan(in_rank, C)
    rrcpm_all = torch.stack([plan[9 * r + 4] for r in range(R)])
    rrps_all = torch.stack([plan[9 * r + 2] for r in range(R)])
    rows = max(plan[9 * r + 7].shape[0] for r in range(R))
    nvl_all = torch.full((R, rows, 8), -1, dtype=torch.int32)
    for r in range(R):
        nvl_all[r, : plan[9 * r + 7].shape[0]] = plan[9 * r + 7]
    in_node = in_rank.view(R, n, N, 8).any(-1)
    for r in range(R):
        node = r // 8
        recv_src = plan[9 * r + 8]
        pairs = torch.ops.dsv3.ep_internode_combine_pairs(plan[9 * r + 5], rrcpm_all, rrps_all, nvl_all, r)
        assert pairs.shape == (recv_src.shape[0], 2) and bool((pairs >= 0).all())
        for row in range(recv_src.shape[0]):
            s, t = recv_src[row].tolist()
            f = s % 8
            m_idx, t_idx = in_node[torch.arange(N) * 8 + f, :, node].nonzero(as_tuple=True)
            token = int(pairs[row, 0])  # the forwarder's RDMA row the combine adds this row into
            assert (int(m_idx[token]) * 8 + f, int(t_idx[token])) == (s, t)


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="num_ranks"):
        torch.ops.dsv3.ep_internode_plan(torch.zeros((8, 4, 8), dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="is_token_in_rank"):
        torch.ops.dsv3.ep_internode_plan(torch.zeros((16, 4, 8), dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="bool"):
        torch.ops.dsv3.ep_internode_plan(torch.zeros((16, 4, 16), dtype=torch.int32), 2)

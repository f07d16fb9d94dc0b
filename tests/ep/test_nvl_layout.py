"""The NVLink EP buffer layout and index arithmetic (csrc/include/dsv3/ep/nvl_layout.h) through the CPU
ops ep_nvl_layout / ep_nvl_prefix: regions disjoint and aligned, the Python size hint equal to the C++ total,
channel ranges partitioning the tokens, and the prefix matrices equal to a torch reference (the `torch`
backend's)."""

import json

import pytest
import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)
from dsv3.ep.backends.torch import channel_prefix_matrix
from dsv3.ep.config import Config, nvl_buffer_layout


def layout(*args):
    return json.loads(torch.ops.dsv3.ep_nvl_layout(*args))


CASES = [
    # R, E, hidden_bytes, scales, topk, num_sms, send, recv
    (2, 16, 14336, 0, 8, 20, 6, 256),
    (4, 256, 7168, 56, 8, 24, 8, 256),
    (8, 256, 7168 * 2, 0, 0, 2, 1, 2),
    (8, 8192, 16, 128, 32, 132, 6, 7),
    (2, 0, 0, 0, 0, 2, 1, 3),
]


@pytest.mark.parametrize("case", CASES)
def test_regions_disjoint_aligned_and_mirrored_in_python(case):
    R, E, hidden_bytes, scales, topk, num_sms, _, recv = case
    got = layout(*case)
    C = num_sms // 2
    assert (got["num_channels"], got["num_slots"], got["num_local_experts"]) == (C, recv, E // R)
    regions = sorted((off, size, name) for name, (off, size) in got["regions"].items())
    end = 0
    for off, size, name in regions:
        assert off % 16 == 0, name
        assert off >= end, f"{name} overlaps the region before it"
        end = off + size
    assert end <= got["total_bytes"] and got["total_bytes"] % 128 == 0
    queues, slots = C * R, C * R * recv
    sizes = got["regions"]
    assert sizes["x"][1] == slots * hidden_bytes and sizes["topk_idx"][1] == slots * topk * 8
    assert sizes["queue_ctrl"][1] == queues * 16 and sizes["expert_counts"][1] == R * (E // R) * 4
    # the last slot's fields end exactly where their regions end
    last = got["last_slot"]
    for name, per_slot in [
        ("x", hidden_bytes),
        ("src_idx", 4),
        ("topk_idx", topk * 8),
        ("scales", scales * 4),
    ]:
        off, size = sizes[name]
        assert last[name] + per_slot == off + size, name
    assert last["tail"] == sizes["queue_ctrl"][0] + (queues - 1) * 16 + 4
    py = nvl_buffer_layout(R, E // R, hidden_bytes, scales, topk, C, recv)
    assert py == {**{k: tuple(v) for k, v in sizes.items()}, "total": (0, got["total_bytes"])}


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("hidden_bytes", [4096, 7168, 14336])
def test_size_hint_is_the_total_at_the_bounds(num_ranks, hidden_bytes):
    for cfg in [Config(), Config(24, 8, 256), Config(2, 1, 2), Config(40, 6, 512)]:
        hint = cfg.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
        bounds = (num_ranks, 1024 * num_ranks, hidden_bytes, 128, 32, cfg.num_sms)
        args = (*bounds, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens)
        assert layout(*args)["total_bytes"] == hint
        # any smaller call (fewer experts / scales / top-k) fits in the hinted buffer
        small = (num_ranks, 8 * num_ranks, hidden_bytes, 0, 8, cfg.num_sms)
        args = (*small, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens)
        assert layout(*args)["total_bytes"] <= hint


def test_reset_words_do_not_depend_on_the_expert_count():
    a = layout(4, 16, 7168, 0, 8, 20, 6, 256)["regions"]
    b = layout(4, 4096, 1024, 56, 0, 20, 6, 256)["regions"]
    for name in ["barrier", "rank_counts", "queue_ctrl"]:
        assert a[name] == b[name]


@pytest.mark.parametrize(
    "args, name",
    [
        ((3, 12, 7168, 0, 8, 20, 6, 256), "num_ranks"),
        ((4, 10, 7168, 0, 8, 20, 6, 256), "num_experts"),
        ((4, 4 * 1025, 7168, 0, 8, 20, 6, 256), "num_experts"),
        ((4, 16, 7160, 0, 8, 20, 6, 256), "hidden_bytes"),
        ((4, 16, 7168, 129, 8, 20, 6, 256), "num_scales"),
        ((4, 16, 7168, 0, 33, 20, 6, 256), "num_topk"),
        ((4, 16, 7168, 0, 8, 21, 6, 256), "num_sms"),
        ((4, 16, 7168, 0, 8, 20, 256, 256), "num_max_send_tokens"),
    ],
)
def test_layout_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        torch.ops.dsv3.ep_nvl_layout(*args)


def _routing(n, R, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, R), generator=g) < 0.4


@pytest.mark.parametrize(
    "n, R, C", [(0, 2, 3), (1, 2, 10), (7, 4, 10), (100, 8, 12), (4096, 8, 10), (33, 4, 1)]
)
def test_prefix_matrices_match_the_torch_reference(n, R, C):
    g = torch.Generator().manual_seed(n * 31 + R)
    rank_counts = torch.randint(0, 50, (R, R), generator=g, dtype=torch.int32)
    in_rank = _routing(n, R, n + C)
    for rank in range(R):
        rpm, cpm, ranges, rcpm = torch.ops.dsv3.ep_nvl_prefix(rank_counts, in_rank, rank, C)
        assert torch.equal(rpm, rank_counts.cumsum(0).to(torch.int32))
        assert torch.equal(cpm, channel_prefix_matrix(in_rank, C))
        assert rcpm.shape == (0, C)
    # channel ranges partition [0, n) in order, ceil(n / C) tokens each (the last ones short or empty)
    per = -(-n // C)
    assert ranges[0, 0] == 0 and ranges[-1, 1] == n
    assert torch.equal(ranges[1:, 0], ranges[:-1, 1])
    assert bool(((ranges[:, 1] - ranges[:, 0]) <= per).all())
    assert bool((ranges[:, 1] >= ranges[:, 0]).all())


@pytest.mark.parametrize("R, C", [(2, 10), (4, 3), (8, 12)])
def test_recv_channel_prefix_orders_rows_by_source_then_channel(R, C):
    # Every rank's routing; the receiver's first row of (source s, channel c) = rows of sources < s, then rows
    # of s's channels < c: the torch backend's recv_channel_prefix_matrix.
    routing = [_routing(37 + 5 * s, R, 100 + s) for s in range(R)]
    sent = torch.stack([r.sum(0) for r in routing]).to(torch.int32)  # [src, dst]
    cpms = [channel_prefix_matrix(r, C) for r in routing]
    for rank in range(R):
        source_cpm = torch.stack([cpms[s][rank] for s in range(R)])  # [src, C]
        rpm, _, _, rcpm = torch.ops.dsv3.ep_nvl_prefix(sent, routing[rank], rank, C, source_cpm)
        recv_from = sent[:, rank].long()
        start = recv_from.cumsum(0) - recv_from
        want = start[:, None] + torch.cat([source_cpm.new_zeros(R, 1), source_cpm[:, :-1]], 1)
        assert torch.equal(rcpm, want.to(torch.int32))
        assert int(rpm[-1, rank]) == int(recv_from.sum())


def test_prefix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank_counts"):
        torch.ops.dsv3.ep_nvl_prefix(
            torch.zeros((2, 3), dtype=torch.int32), torch.zeros((1, 2), dtype=torch.bool), 0, 2
        )
    with pytest.raises(ValueError, match="is_token_in_rank"):
        torch.ops.dsv3.ep_nvl_prefix(
            torch.zeros((2, 2), dtype=torch.int32), torch.zeros((1, 3), dtype=torch.bool), 0, 2
        )
    with pytest.raises(ValueError, match="rank"):
        torch.ops.dsv3.ep_nvl_prefix(
            torch.zeros((2, 2), dtype=torch.int32), torch.zeros((1, 2), dtype=torch.bool), 2, 2
        )
    with pytest.raises(ValueError, match="num_channels"):
        torch.ops.dsv3.ep_nvl_prefix(
            torch.zeros((2, 2), dtype=torch.int32), torch.zeros((1, 2), dtype=torch.bool), 0, 0
        )
    with pytest.raises(ValueError, match="source_channel_prefix"):
        torch.ops.dsv3.ep_nvl_prefix(
            torch.zeros((2, 2), dtype=torch.int32),
            torch.zeros((1, 2), dtype=torch.bool),
            0,
            2,
            torch.zeros((2, 3), dtype=torch.int32),
        )


def test_backend_reports_why_it_is_unavailable():
    from dsv3.ep.backends.nvlink import NvlinkBackend

    ok, why = NvlinkBackend.available()
    if ok:
        pytest.skip("the nvlink backend is available here")
    assert why
    with pytest.raises(RuntimeError, match="nvlink backend is unavailable"):
        NvlinkBackend(None, 1 << 20, 0, 2, 10.0)

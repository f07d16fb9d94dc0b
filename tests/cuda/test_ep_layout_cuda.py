"""The sm_90a EP dispatch-layout kernel (csrc/cuda/ep_layout.cu) against dsv3.ep.layout's reference run on
the GPU and against the CPU kernel: exact integer results, int32 and strided top-k, and the bad-entry
report."""

from __future__ import annotations

import pytest
import torch

from dsv3.ep.layout import dispatch_layout, dispatch_layout_reference

OP = torch.ops.dsv3.ep_dispatch_layout


def random_topk(tokens: int, top_k: int, experts: int) -> torch.Tensor:
    topk = torch.rand(tokens, experts).topk(min(top_k, experts), dim=1).indices
    topk[torch.rand(topk.shape) < 0.1] = -1
    if topk.size(1) > 1:
        topk[::5, 1] = topk[::5, 0]
    return topk


def assert_layout_equal(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w.cpu())


CONFIGS = [
    (tokens, top_k, experts, ranks, per_node)
    for tokens in (0, 1, 7, 4096, 70000)
    for top_k in (1, 6, 8)
    for experts in (8, 64, 256, 288)
    for ranks in (1, 2, 4, 8, 16, 32, 72)
    for per_node in (8, 4)
    if experts % ranks == 0 and (ranks <= per_node or ranks % per_node == 0)
]


@pytest.mark.parametrize(("tokens", "top_k", "experts", "ranks", "per_node"), CONFIGS)
def test_matches_reference_on_gpu(tokens, top_k, experts, ranks, per_node):
    topk = random_topk(tokens, top_k, experts).cuda()
    got = OP(topk, experts, ranks, per_node)
    assert all(t.is_cuda for t in got)
    assert_layout_equal(got, dispatch_layout_reference(topk, experts, ranks, per_node))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int32_and_strided_match_cpu_kernel(dtype):
    base = random_topk(5000, 16, 256).to(dtype)
    for view in (base, base[:, 3:11], base[:, ::2], base[::3, :8], base[:, :8].t().contiguous().t()):
        assert_layout_equal(OP(view.cuda(), 256, 32, 8), OP(view, 256, 32, 8))


def test_rank_receiving_nothing_and_empty_rows():
    topk = random_topk(3000, 8, 224)  # experts 224..255 (ranks 28..31) never chosen
    topk[100:200] = -1
    got = OP(topk.cuda(), 256, 32, 8)
    assert got[0][28:].eq(0).all() and not got[3][:, 28:].any() and not got[3][100:200].any()
    assert_layout_equal(got, dispatch_layout_reference(topk, 256, 32, 8))


def test_python_entry_on_gpu():
    topk = random_topk(77, 8, 64).cuda()
    per_rank, per_node, per_expert, in_rank = dispatch_layout(topk, 64, 8)
    assert per_node is None
    ref = dispatch_layout_reference(topk, 64, 8)
    assert torch.equal(per_rank, ref[0]) and torch.equal(per_expert, ref[2]) and torch.equal(in_rank, ref[3])


@pytest.mark.parametrize("bad", [64, -2, 2**40])
def test_out_of_range_entry_raises(bad):
    topk = random_topk(3000, 8, 64)
    topk[1234, 5] = bad
    with pytest.raises(
        ValueError, match=rf"topk_idx entries must be in \[-1, num_experts = 64\), got {bad} at "
    ):
        OP(topk.cuda(), 64, 8)
    topk[1234, 5] = -1  # the next call starts from a cleared report
    assert_layout_equal(OP(topk.cuda(), 64, 8), OP(topk, 64, 8))


def test_side_stream():
    """Back-to-back calls on a side stream (the launcher uses the current stream) give the default
    stream's result."""
    topk = random_topk(4096, 8, 256).cuda()
    want = OP(topk, 256, 64, 8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = [OP(topk, 256, 64, 8) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(stream)
    for g in got:
        assert_layout_equal(g, want)

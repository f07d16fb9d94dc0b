"""torch.ops.dsv3.ep_dispatch_layout (CPU and Meta kernels) against dsv3.ep.layout's reference: random
routings with -1 entries, repeated experts and idle ranks, int32 and strided top-k, torch.compile, and every
bad argument."""

from __future__ import annotations

import pytest
import torch

from dsv3.ep.layout import dispatch_layout, dispatch_layout_reference

OP = torch.ops.dsv3.ep_dispatch_layout


def random_topk(tokens: int, top_k: int, experts: int) -> torch.Tensor:
    """Distinct experts per token (a top-k of random scores, as routers produce), then about 10% of the
    entries set to -1 and, in every fifth token, the second expert replaced by a copy of the first."""
    scores = torch.rand(tokens, experts)
    topk = scores.topk(min(top_k, experts), dim=1).indices
    if top_k > experts:
        topk = torch.cat([topk, topk[:, : top_k - experts]], dim=1)
    topk[torch.rand(tokens, top_k) < 0.1] = -1
    if top_k > 1:
        topk[::5, 1] = topk[::5, 0]
    return topk


def assert_layout_equal(got, want):
    names = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


CONFIGS = [
    (tokens, top_k, experts, ranks, per_node)
    for tokens in (0, 1, 7, 4096)
    for top_k in (1, 6, 8)
    for experts in (8, 64, 256)
    for ranks in (1, 2, 4, 8, 16, 32)
    for per_node in (8, 4)
    if ranks <= experts
]


@pytest.mark.parametrize(("tokens", "top_k", "experts", "ranks", "per_node"), CONFIGS)
def test_matches_reference(tokens, top_k, experts, ranks, per_node):
    topk = random_topk(tokens, top_k, experts)
    got = OP(topk, experts, ranks, per_node)
    assert_layout_equal(got, dispatch_layout_reference(topk, experts, ranks, per_node))
    assert got[1].numel() == (ranks // per_node if ranks > per_node else 0)


def test_worked_example():
    """8 experts on 4 ranks (2 each) on 2 nodes (2 ranks each). Token 1 names expert 3 twice: it counts twice
    for the expert, once for rank 1; token 3 reaches rank 3 through two experts; token 2 goes nowhere."""
    topk = torch.tensor([[0, 1, -1], [3, 3, 5], [-1, -1, -1], [7, 0, 6]])
    per_rank, per_node, per_expert, in_rank = OP(topk, 8, 4, 2)
    assert per_rank.tolist() == [2, 1, 1, 1]
    assert per_node.tolist() == [3, 2]
    assert per_expert.tolist() == [2, 1, 0, 2, 0, 1, 1, 1]
    assert in_rank.int().tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]]


def test_rank_receiving_nothing():
    experts, ranks = 64, 8
    topk = random_topk(500, 6, experts - experts // ranks)  # never an expert of the last rank
    per_rank, per_node, per_expert, in_rank = OP(topk, experts, ranks, 4)
    assert per_rank[-1] == 0 and not in_rank[:, -1].any()
    assert per_expert[-experts // ranks :].eq(0).all() and per_node[-1] > 0
    assert_layout_equal(
        (per_rank, per_node, per_expert, in_rank), dispatch_layout_reference(topk, experts, ranks, 4)
    )


@pytest.mark.parametrize(("tokens", "top_k"), [(9, 0), (9, 3), (0, 0)])
def test_no_experts_at_all(tokens, top_k):
    topk = torch.full((tokens, top_k), -1, dtype=torch.long)
    per_rank, per_node, per_expert, in_rank = OP(topk, 32, 16, 8)
    assert per_rank.eq(0).all() and per_node.tolist() == [0, 0] and per_expert.eq(0).all()
    assert in_rank.shape == (tokens, 16) and not in_rank.any()


@pytest.mark.parametrize("tokens", [7, 4096])
def test_int32_topk_idx(tokens):
    topk = random_topk(tokens, 8, 256)
    assert_layout_equal(OP(topk.int(), 256, 32, 8), dispatch_layout_reference(topk, 256, 32, 8))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_non_contiguous_topk_idx(dtype):
    base = random_topk(1000, 16, 64).to(dtype)
    views = {
        "columns": base[:, 3:11],
        "every_other_column": base[:, ::2],
        "transposed": base[:, :6].t().contiguous().t(),
        "every_third_row": base[::3, :8],
        "broadcast_row": base[0:1, :8].expand(50, 8),
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        assert_layout_equal(OP(view, 64, 16, 8), dispatch_layout_reference(view.contiguous(), 64, 16, 8))


def test_independent_of_thread_count():
    topk = random_topk(20000, 8, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = OP(topk, 256, 32, 8)
    finally:
        torch.set_num_threads(threads)
    assert_layout_equal(OP(topk, 256, 32, 8), single)


def test_python_entry_turns_single_node_rdma_counts_into_none():
    topk = random_topk(33, 6, 64)
    per_rank, per_node, per_expert, in_rank = dispatch_layout(topk, 64, 8)
    assert per_node is None
    ref = dispatch_layout_reference(topk, 64, 8)
    assert torch.equal(per_rank, ref[0]) and torch.equal(per_expert, ref[2]) and torch.equal(in_rank, ref[3])
    assert torch.equal(dispatch_layout(topk, 64, 16, 8)[1], dispatch_layout_reference(topk, 64, 16, 8)[1])


@pytest.mark.parametrize(("ranks", "per_node", "nodes"), [(8, 8, 0), (32, 8, 4), (16, 4, 4), (4, 8, 0)])
def test_meta_shapes(ranks, per_node, nodes):
    topk = torch.empty(123, 8, dtype=torch.long, device="meta")
    per_rank, per_node_counts, per_expert, in_rank = OP(topk, 256, ranks, per_node)
    assert [t.device.type for t in (per_rank, per_node_counts, per_expert, in_rank)] == ["meta"] * 4
    assert (per_rank.shape, per_node_counts.shape, per_expert.shape) == ((ranks,), (nodes,), (256,))
    assert in_rank.shape == (123, ranks) and in_rank.dtype == torch.bool
    assert per_rank.dtype == per_node_counts.dtype == per_expert.dtype == torch.int32


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    def layout_and_use(topk):
        per_rank, per_node, per_expert, in_rank = OP(topk, 64, 16, 4)
        return per_rank * 2, per_node, per_expert.sum(), in_rank.sum(1)

    compiled = torch.compile(layout_and_use, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for tokens in (300, 41):
        topk = random_topk(tokens, 6, 64)
        for got, want in zip(compiled(topk), layout_and_use(topk), strict=True):
            assert torch.equal(got, want)


# ---- bad arguments: ValueError / TypeError naming the argument, on the CPU and Meta kernels alike


def call(device="cpu", **overrides):
    args = dict(topk_idx=random_topk(10, 4, 64), num_experts=64, num_ranks=8, num_ranks_per_node=8)
    args.update(overrides)
    args["topk_idx"] = args["topk_idx"].to(device)
    return OP(args["topk_idx"], args["num_experts"], args["num_ranks"], args["num_ranks_per_node"])


BAD = [
    ({"topk_idx": torch.zeros(4, 2)}, TypeError, "topk_idx must be int64 or int32"),
    ({"topk_idx": torch.zeros(4, 2, dtype=torch.int16)}, TypeError, "topk_idx must be int64 or int32"),
    ({"topk_idx": torch.zeros(4, dtype=torch.long)}, ValueError, "topk_idx must be 2-D"),
    ({"topk_idx": torch.zeros(2, 4, 2, dtype=torch.long)}, ValueError, "topk_idx must be 2-D"),
    ({"num_experts": 0}, ValueError, "num_experts must be"),
    ({"num_experts": 2**31}, ValueError, "num_experts must be"),
    ({"num_ranks": 0}, ValueError, "num_ranks must be positive and divide"),
    ({"num_ranks": 6}, ValueError, "num_ranks must be positive and divide"),
    ({"num_ranks": 128}, ValueError, "num_ranks must be positive and divide"),
    ({"num_ranks_per_node": 0}, ValueError, "num_ranks_per_node must be positive"),
    ({"num_experts": 96, "num_ranks": 12}, ValueError, "num_ranks must be a multiple of num_ranks_per_node"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("overrides", "exc", "match"), BAD)
def test_bad_arguments(device, overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(device, **overrides)


@pytest.mark.parametrize(
    ("bad", "dtype"),
    [(bad, torch.int64) for bad in (64, 1000, -2, -(2**40))]
    + [(bad, torch.int32) for bad in (64, -2, -(2**31))],
)
def test_out_of_range_entry_names_value_and_position(bad, dtype):
    topk = random_topk(300, 4, 64)
    topk[211, 2] = bad
    topk[250, 0] = bad  # the first bad entry in row-major order is the one reported
    message = rf"topk_idx entries must be in \[-1, num_experts = 64\), got {bad} at topk_idx\[211, 2\]"
    with pytest.raises(ValueError, match=message):
        OP(topk.to(dtype), 64, 8)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("not a tensor", 64, 8), "topk_idx must be a torch.Tensor"),
        ((torch.zeros(1, 1, dtype=torch.long), 64.0, 8), "num_experts must be an int"),
        ((torch.zeros(1, 1, dtype=torch.long), 64, True), "num_ranks must be an int"),
        ((torch.zeros(1, 1, dtype=torch.long), 64, 8, "8"), "num_ranks_per_node must be an int"),
    ],
)
def test_python_entry_type_errors(args, match):
    with pytest.raises(TypeError, match=match):
        dispatch_layout(*args)

"""dsv3.ep.eplb: plans that are consistent (phy2log / log2phy / logcnt agree, every expert kept), balance
skewed loads better than one replica per expert in place, worked examples, the replica selection of the
model integration, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from dsv3.ep.eplb import gpu_loads, rebalance_experts, replica_map, select_replicas


def zipf_loads(layers: int, experts: int, exponent: float = 1.2) -> torch.Tensor:
    """Token counts per expert following a Zipf law over a random expert order per layer."""
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    loads = (1e5 / ranks**exponent).round()
    return torch.stack([loads[torch.randperm(experts)] for _ in range(layers)]).long()


def contiguous_max_load(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max GPU load per layer with no replicas: GPU g holds experts [g * E / G, (g + 1) * E / G)."""
    return weight.double().view(weight.size(0), num_gpus, -1).sum(-1).max(-1).values


def assert_consistent(weight, phy2log, log2phy, logcnt, num_replicas):
    layers, experts = weight.shape
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, experts)
    assert log2phy.shape == (layers, experts, int(logcnt.max()))
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert logcnt.min() >= 1 and logcnt.sum(1).eq(num_replicas).all()
    for layer in range(layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), logcnt[layer])
        for e in range(experts):
            replicas = log2phy[layer, e]
            count = int(logcnt[layer, e])
            assert replicas[count:].eq(-1).all()
            assert replicas[:count].diff().gt(0).all()  # ascending, no repeats
            assert phy2log[layer, replicas[:count]].eq(e).all()


CASES = {
    # (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
    "hierarchical_v3_prefill": (3, 256, 288, 8, 4, 32),
    "hierarchical_one_node": (2, 64, 80, 8, 1, 8),
    "global_groups_not_on_nodes": (3, 256, 320, 8, 16, 64),
    "global_one_group_per_gpu": (2, 60, 72, 5, 2, 12),
    "no_redundant_experts": (2, 64, 64, 4, 2, 8),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plans_are_consistent_and_beat_contiguous_placement(case):
    layers, experts, num_replicas, num_groups, num_nodes, num_gpus = case
    weight = zipf_loads(layers, experts)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert_consistent(weight, phy2log, log2phy, logcnt, num_replicas)
    balanced = gpu_loads(weight, phy2log, logcnt, num_gpus).max(-1).values
    assert (balanced < contiguous_max_load(weight, num_gpus)).all()
    # A sanity floor: the heaviest GPU never carries less than the mean.
    assert (balanced >= weight.double().sum(-1) / num_gpus).all()


def test_hierarchical_keeps_each_group_on_one_node():
    layers, experts, num_groups, num_nodes, num_gpus, num_replicas = 4, 64, 8, 4, 16, 96
    weight = zipf_loads(layers, experts)
    phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    node_of_physical = torch.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_physical = phy2log // (experts // num_groups)
    for layer in range(layers):
        for g in range(num_groups):
            assert node_of_physical[group_of_physical[layer] == g].unique().numel() == 1
    # ... and each node gets groups_per_node whole groups, so experts_per_node distinct logical experts.
    for layer in range(layers):
        for node in range(num_nodes):
            assert phy2log[layer, node_of_physical == node].unique().numel() == experts // num_nodes


def test_readme_example_balances_like_deepseek_eplb():
    """The 2-layer, 12-expert example of DeepSeek's EPLB README (4 groups, 2 nodes, 8 GPUs, 16 replicas):
    the heaviest GPU carries no more than in the plan printed there."""
    weight = torch.tensor(
        [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
    )
    published = torch.tensor(
        [
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
        ]
    )
    published_cnt = torch.stack([torch.bincount(row, minlength=12) for row in published])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert_consistent(weight, phy2log, log2phy, logcnt, 16)
    ours = gpu_loads(weight, phy2log, logcnt, 8).max(-1).values
    theirs = gpu_loads(weight, published, published_cnt, 8).max(-1).values
    assert (ours <= theirs).all()
    # Layer 0's group loads are 262, 330, 116, 325: heaviest first, group 1 goes to node 0, group 3 to node
    # 1, group 0 to the lighter node 1, group 2 to node 0, so node 0 (GPUs 0-3) holds experts 3..8.
    assert phy2log[0, :8].unique().tolist() == [3, 4, 5, 6, 7, 8]


def test_global_worked_example():
    """4 experts with loads 10, 1, 1, 1 on 2 GPUs with 3 slots each: expert 0 gets both extra replicas
    (10/1, then 10/2 beat 1); packing, heaviest first into the lighter GPU that has room (the lower one on
    ties), places replicas 0, 4 (of expert 0), 5 (of expert 0), then experts 1, 2, 3."""
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor([[10.0, 1.0, 1.0, 1.0]]), 6, 1, 1, 2)
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    # GPU 0: expert 0, expert 0, expert 3; GPU 1: expert 0, expert 1, expert 2
    assert phy2log.tolist() == [[0, 0, 3, 0, 1, 2]]
    assert log2phy.tolist() == [[[0, 1, 3], [4, -1, -1], [5, -1, -1], [2, -1, -1]]]
    loads = gpu_loads(torch.tensor([[10.0, 1, 1, 1]]), phy2log, logcnt, 2)
    torch.testing.assert_close(loads, torch.tensor([[10 * 2 / 3 + 1, 10 / 3 + 2]], dtype=torch.float64))


def test_hierarchical_worked_example():
    """8 experts in 4 groups of 2 with group loads 9, 2, 8, 2 on 2 nodes of 2 GPUs, no redundancy: groups 0
    and 3 share node 0, groups 2 and 1 node 1; within node 0 the loads 8, 1, 1, 1 (experts 0, 1, 6, 7) go
    to GPUs 0, 1, 1, 0, within node 1 the loads 6, 2, 1, 1 (experts 4, 5, 2, 3) the same way."""
    weight = torch.tensor([[8, 1, 1, 1, 6, 2, 1, 1]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 8, 4, 2, 4)
    assert phy2log.tolist() == [[0, 7, 1, 6, 4, 3, 5, 2]]
    assert logcnt.eq(1).all() and log2phy.shape == (1, 8, 1)
    assert replica_map(phy2log, 4).tolist() == [[[0, 7], [1, 6], [4, 3], [5, 2]]]
    assert gpu_loads(weight, phy2log, logcnt, 4).tolist() == [[9.0, 2.0, 7.0, 3.0]]


def test_uniform_loads_need_no_replicas_to_be_balanced():
    weight = torch.full((2, 32), 7.0)
    phy2log, _, logcnt = rebalance_experts(weight, 32, 4, 2, 8)
    assert logcnt.eq(1).all()
    assert gpu_loads(weight, phy2log, logcnt, 8).eq(28.0).all()


def test_zero_layers_and_device_and_dtypes():
    phy2log, log2phy, logcnt = rebalance_experts(torch.zeros(0, 16), 32, 4, 2, 4)
    assert phy2log.shape == (0, 32) and log2phy.shape == (0, 16, 0) and logcnt.shape == (0, 16)
    ints = zipf_loads(2, 16) // 50  # at most 2000: exact in float16 too
    for weight in (ints, ints.float(), ints.double(), ints.half()):
        plan = rebalance_experts(weight, 24, 4, 2, 4)
        assert all(t.device == weight.device for t in plan)
        assert torch.equal(plan[0], rebalance_experts(ints, 24, 4, 2, 4)[0])


# ---- select_replicas


def test_select_replicas_round_robin_over_replicas_of_the_same_expert():
    weight = zipf_loads(1, 32, exponent=2.0)
    _, log2phy, logcnt = rebalance_experts(weight, 64, 4, 1, 8)
    log2phy, logcnt = log2phy[0], logcnt[0]
    phy2log = torch.full((64,), -1, dtype=torch.long)
    for e in range(32):
        phy2log[log2phy[e, : logcnt[e]]] = e
    tokens = 6000
    topk = torch.stack([torch.randperm(32)[:6] for _ in range(tokens)])
    topk[torch.rand(tokens, 6) < 0.05] = -1
    physical = select_replicas(topk, log2phy, logcnt)
    assert physical.dtype == topk.dtype and physical.shape == topk.shape
    assert torch.equal(physical.eq(-1), topk.eq(-1))
    assert torch.equal(phy2log[physical[topk >= 0]], topk[topk >= 0])  # only replicas of the same expert
    # Every token naming the heaviest expert: its tokens split over the replicas, counts differing by <= 1.
    heavy = int(logcnt.argmax())
    assert logcnt[heavy] >= 3
    column = torch.full((tokens, 1), heavy)
    per_replica = torch.bincount(select_replicas(column, log2phy, logcnt).view(-1), minlength=64)
    used = per_replica[log2phy[heavy, : logcnt[heavy]]]
    assert used.sum() == tokens and used.max() - used.min() <= 1


def test_select_replicas_uses_token_ids_and_int32():
    log2phy = torch.tensor([[0, 3, 5], [1, -1, -1], [2, 4, -1]])
    logcnt = torch.tensor([3, 1, 2])
    topk = torch.tensor([[0, 2], [0, 1], [2, -1], [-1, 0]], dtype=torch.int32)
    assert select_replicas(topk, log2phy, logcnt).tolist() == [[0, 2], [3, 1], [2, -1], [-1, 0]]
    token_ids = torch.tensor([10, 11, 7, 5])  # replica = token_id % logcnt
    assert select_replicas(topk, log2phy, logcnt, token_ids).tolist() == [[3, 2], [5, 1], [4, -1], [-1, 5]]
    assert select_replicas(topk, log2phy, logcnt).dtype == torch.int32
    empty = select_replicas(torch.zeros(0, 8, dtype=torch.long), log2phy, logcnt)
    assert empty.shape == (0, 8)


# ---- bad arguments

W = torch.ones(2, 16)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (([[1.0] * 16], 16, 4, 2, 4), TypeError, "weight must be a torch.Tensor"),
        ((W.bool(), 16, 4, 2, 4), TypeError, "weight must hold real loads"),
        ((W[0], 16, 4, 2, 4), ValueError, "weight must be 2-D"),
        ((torch.ones(2, 0), 16, 4, 2, 4), ValueError, "weight must be 2-D"),
        ((-W, 16, 4, 2, 4), ValueError, "weight must hold finite, non-negative"),
        ((W * float("nan"), 16, 4, 2, 4), ValueError, "weight must hold finite, non-negative"),
        ((W, 16.0, 4, 2, 4), TypeError, "num_replicas must be an int"),
        ((W, 0, 4, 2, 4), ValueError, "num_replicas must be positive"),
        ((W, 16, 0, 2, 4), ValueError, "num_groups must be positive"),
        ((W, 16, 4, True, 4), TypeError, "num_nodes must be an int"),
        ((W, 16, 4, 2, -4), ValueError, "num_gpus must be positive"),
        ((W, 16, 3, 1, 4), ValueError, r"num_groups \(3\) must divide"),
        ((W, 16, 4, 3, 4), ValueError, r"num_gpus \(4\) must be a multiple of num_nodes"),
        ((W, 18, 4, 2, 4), ValueError, r"num_replicas \(18\) must be a multiple of num_gpus"),
        ((W, 8, 4, 2, 4), ValueError, r"num_replicas \(8\) must be at least"),
    ],
)
def test_rebalance_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        rebalance_experts(*args)


LOG2PHY = torch.tensor([[0, 2], [1, -1]])
LOGCNT = torch.tensor([2, 1])
TOPK = torch.tensor([[0, 1]])


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((TOPK.float(), LOG2PHY, LOGCNT), TypeError, "topk_idx must be int64 or int32"),
        ((TOPK[0], LOG2PHY, LOGCNT), ValueError, "topk_idx must be 2-D"),
        ((TOPK, LOG2PHY[0], LOGCNT), ValueError, "log2phy must be 2-D"),
        ((TOPK, LOG2PHY, LOGCNT[:1]), ValueError, "logcnt must have shape"),
        ((TOPK, LOG2PHY.float(), LOGCNT), TypeError, "log2phy must be int64 or int32"),
        ((TOPK, LOG2PHY.to("meta"), LOGCNT), ValueError, "log2phy must be on cpu"),
        ((TOPK + 1, LOG2PHY, LOGCNT), ValueError, r"topk_idx entries must be in \[-1, 2\), got 2"),
        ((TOPK - 2, LOG2PHY, LOGCNT), ValueError, r"topk_idx entries must be in \[-1, 2\), got -2"),
        ((TOPK, LOG2PHY, LOGCNT, torch.tensor([0.0])), TypeError, "token_ids must be"),
        ((TOPK, LOG2PHY, LOGCNT, torch.tensor([0, 1])), ValueError, "token_ids must have shape"),
        (([[0, 1]], LOG2PHY, LOGCNT), TypeError, "topk_idx must be a torch.Tensor"),
    ],
)
def test_select_replicas_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        select_replicas(*args)


def test_replica_map_bad_arguments():
    with pytest.raises(ValueError, match=r"num_gpus \(3\) must divide"):
        replica_map(torch.zeros(1, 16, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="phy2log must be a 2-D"):
        replica_map(torch.zeros(16, dtype=torch.long), 4)

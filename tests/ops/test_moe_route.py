"""The MoE router (SPEC §5) against dsv3.ops.reference.moe_route: identical indices and bit-identical weights
on V3 / 16B-style / tiny configurations, ties (quantized and all-equal logits), ±inf and NaN logits,
empty and odd token counts; against transformers' DeepseekV3TopkRouter; Meta kernels and torch.compile."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ops
from dsv3.ops import reference

# (experts, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
CONFIGS = {
    "v3": (256, 8, 8, 4, 2.5, True),
    "16b": (64, 6, 1, 1, 1.0, False),
    "tiny8": (8, 2, 2, 1, 1.0, True),
    "tiny12": (12, 3, 2, 2, 1.5, True),
    "tiny16": (16, 4, 2, 1, 1.0, False),
    "groups_of_one": (16, 3, 16, 5, 1.0, True),
    "top_k_fills_groups": (24, 12, 4, 2, 1.0, True),
    "wide": (1024, 16, 32, 8, 2.5, True),
}
TOKENS = [1, 7, 130]


def route(logits, bias, config, fn=ops.moe_route):
    experts, top_k, n_group, topk_group, scale, norm = config
    return fn(
        logits,
        bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=norm,
    )


def assert_same_route(logits, bias, config):
    idx, weights = route(logits, bias, config)
    ref_idx, ref_weights = route(logits, bias, config, reference.moe_route)
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert idx.shape == weights.shape == (logits.shape[0], config[1])
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0, equal_nan=True)
    return idx, weights


def random_bias(experts):
    return torch.randn(experts) * 0.1


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_reference(config, tokens):
    logits = torch.randn(tokens, config[0]) * 3
    idx, weights = assert_same_route(logits, random_bias(config[0]), config)
    assert_same_route(logits, None, config)
    # Distinct, in range, best first.
    assert (idx.sort(dim=-1).values.diff(dim=-1) > 0).all()
    assert ((idx >= 0) & (idx < config[0])).all()


def test_selection_semantics_v3():
    """Kept groups are the top_k_group by top-2 sum, every expert comes from them, the k outputs are in
    biased-score order, and normalized weights sum to the scaling factor."""
    experts, top_k, n_group, topk_group, scale, _ = config = CONFIGS["v3"]
    logits, bias = torch.randn(64, experts) * 2, random_bias(experts)
    idx, weights = assert_same_route(logits, bias, config)
    choice = logits.sigmoid() + bias
    group_scores = choice.view(64, n_group, -1).topk(2, dim=-1).values.sum(-1)
    kept = group_scores.topk(topk_group, dim=-1).indices
    assert (idx // (experts // n_group)).unsqueeze(-1).eq(kept.unsqueeze(1)).any(-1).all()
    chosen = choice.gather(1, idx)
    assert (chosen.diff(dim=-1) <= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), scale), rtol=1e-6, atol=0)


@pytest.mark.parametrize("config", ["v3", "tiny12", "groups_of_one"])
def test_ties_break_to_lower_index(config):
    """Logits on a coarse grid: many equal scores and equal group sums."""
    config = CONFIGS[config]
    logits = torch.randint(-2, 3, (200, config[0])).float()
    bias = torch.randint(-1, 2, (config[0],)).float() * 0.25
    idx, _ = assert_same_route(logits, bias, config)
    assert_same_route(logits, None, config)
    choice = logits.sigmoid() + bias
    chosen = choice.gather(1, idx)
    ties = chosen[:, 1:] == chosen[:, :-1]
    assert ties.any(), "the data must produce ties"
    assert (idx[:, 1:][ties] > idx[:, :-1][ties]).all()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_all_equal_logits_pick_the_first_experts(config):
    experts, top_k, *_ = config
    idx, weights = assert_same_route(torch.zeros(3, experts), None, config)
    assert idx.tolist() == [list(range(top_k))] * 3


def test_infinite_logits():
    """±inf logits are ordinary scores (1 and 0): their tokens route normally."""
    config = CONFIGS["v3"]
    logits = torch.randn(5, 256)
    logits[0, 16:18] = float("inf")
    logits[1, :] = float("-inf")
    logits[2, ::3] = float("inf")
    logits[3, :100] = float("-inf")
    idx, weights = assert_same_route(logits, random_bias(256), config)
    assert torch.isfinite(weights[[0, 2, 3, 4]]).all()
    idx, _ = assert_same_route(logits, None, config)
    assert {16, 17} <= set(idx[0].tolist())  # scores of 1: the best of every group


@pytest.mark.parametrize("config", ["v3", "16b", "tiny8"])
def test_nan_logits_stay_in_their_token(config):
    config = CONFIGS[config]
    logits = torch.randn(9, config[0])
    clean = route(logits, None, config)
    logits[[2, 5], 3] = float("nan")
    logits[7, :] = float("nan")
    idx, weights = assert_same_route(logits, random_bias(config[0]), config)
    bad = torch.tensor([i in (2, 5, 7) for i in range(9)])
    assert torch.isnan(weights[bad]).all()
    assert idx[bad].tolist() == [list(range(config[1]))] * 3
    idx_nb, weights_nb = route(logits, None, config)
    torch.testing.assert_close(idx_nb[~bad], clean[0][~bad], rtol=0, atol=0)
    torch.testing.assert_close(weights_nb[~bad], clean[1][~bad], rtol=0, atol=0)


def test_non_finite_bias_poisons_every_token():
    bias = torch.zeros(64)
    bias[5] = float("inf")
    idx, weights = assert_same_route(torch.randn(4, 64), bias, CONFIGS["16b"])
    assert torch.isnan(weights).all() and idx.tolist() == [list(range(6))] * 4


def test_empty_and_strided_logits():
    idx, weights = ops.moe_route(torch.empty(0, 256), None, 8, 8, 4)
    assert idx.shape == weights.shape == (0, 8)
    config = CONFIGS["v3"]
    logits = torch.randn(256, 5).t()  # column-major [5, 256]
    assert not logits.is_contiguous()
    assert_same_route(logits, random_bias(256), config)
    torch.testing.assert_close(route(logits, None, config)[1], route(logits.contiguous(), None, config)[1])


def test_negative_biased_scores_stay_in_kept_groups():
    """Where transformers' 0.0 fill would pick an excluded expert, dsv3 keeps to the kept groups."""
    config = (8, 4, 2, 1, 1.0, True)
    bias = torch.tensor([-2.0] * 4 + [-3.0] * 4)
    idx, _ = assert_same_route(torch.zeros(1, 8), bias, config)
    assert idx.tolist() == [[0, 1, 2, 3]]


# --------------------------------------------------------------------------------------------------
# transformers' router


def hf_router(experts, top_k, n_group, topk_group, scale, norm, hidden):
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=norm,
    )
    router = modeling.DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.3)
    return router


@pytest.mark.parametrize("config", ["v3", "16b", "tiny16"])
def test_matches_transformers(config):
    """Biased scores positive (so transformers' 0.0 fill cannot matter): the same expert sets, the same
    weights by expert (bit for bit unnormalized; normalized, transformers sums its unordered top-k in another
    order, so within 2 ulp)."""
    experts, top_k, n_group, topk_group, scale, norm = cfg = CONFIGS[config]
    router = hf_router(*cfg, hidden=96)
    router.e_score_correction_bias.copy_(torch.rand(experts) * 0.5)
    x = torch.randn(77, 96)
    with torch.no_grad():
        hf_idx, hf_weights = router(x)
        logits = torch.nn.functional.linear(x, router.weight)
    idx, weights = route(logits, router.e_score_correction_bias, cfg)
    assert torch.equal(idx.sort(-1).values, hf_idx.sort(-1).values)
    order_ours, order_hf = idx.argsort(-1), hf_idx.argsort(-1)
    ours, theirs = weights.gather(1, order_ours), hf_weights.gather(1, order_hf)
    if norm:
        torch.testing.assert_close(ours, theirs, rtol=2 * 2.0**-23, atol=0)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    hf_choice = router.get_topk_indices(logits.sigmoid())
    assert torch.equal(idx.sort(-1).values, hf_choice.sort(-1).values)


# --------------------------------------------------------------------------------------------------
# Meta kernels and torch.compile


def test_meta_shapes():
    logits = torch.empty(5, 256, device="meta")
    idx, weights = ops.moe_route(logits, torch.empty(256, device="meta"), 8, 8, 4, 2.5)
    assert idx.device.type == "meta" and idx.shape == (5, 8) and idx.dtype == torch.int64
    assert weights.shape == (5, 8) and weights.dtype == torch.float32


def test_torch_compile_fullgraph():
    config = CONFIGS["v3"]
    logits, bias = torch.randn(33, 256), random_bias(256)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def router(logits, bias):
        idx, weights = ops.moe_route(logits, bias, 8, 8, 4, 2.5, True)
        return idx, weights * 2

    idx, weights = router(logits, bias)
    ref_idx, ref_weights = route(logits, bias, config, reference.moe_route)
    assert torch.equal(idx, ref_idx) and torch.equal(weights, ref_weights * 2)

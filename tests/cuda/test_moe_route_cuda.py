"""The sm_90a MoE router kernel (csrc/cuda/moe_route.cu) against dsv3.ops.reference run on the GPU (bit for
bit: the kernel's sigmoid is torch's CUDA formula) and against the CPU kernel (whose scores come from ATen's
vectorized CPU exp: within an ulp or two, so that comparison uses well-separated scores)."""

from __future__ import annotations

import pytest
import torch

from dsv3 import ops
from dsv3.ops import reference

# (experts, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
CONFIGS = {
    "v3": (256, 8, 8, 4, 2.5, True),
    "16b": (64, 6, 1, 1, 1.0, False),
    "tiny12": (12, 3, 2, 2, 1.5, True),
    "groups_of_one": (16, 3, 16, 5, 1.0, True),
    "e96": (96, 7, 3, 2, 1.0, True),
    "e512": (512, 10, 16, 6, 1.0, True),
    "wide": (1024, 40, 32, 8, 2.5, True),
}


def route(logits, bias, config, fn=ops.moe_route):
    _, top_k, n_group, topk_group, scale, norm = config
    return fn(logits, bias, top_k, n_group, topk_group, scale, norm)


@pytest.mark.parametrize("tokens", [0, 1, 5, 1000])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_reference_on_gpu(config, tokens):
    logits = (torch.randn(tokens, config[0]) * 3).cuda()
    bias = (torch.randn(config[0]) * 0.1).cuda()
    logits[tokens // 2 :: 7, 1] = float("nan")
    for b in (bias, None):
        idx, weights = route(logits, b, config)
        ref_idx, ref_weights = route(logits, b, config, reference.moe_route)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_ties_match_reference_on_gpu(config):
    logits = torch.randint(-2, 3, (300, config[0])).float().cuda()
    bias = (torch.randint(-1, 2, (config[0],)).float() * 0.25).cuda()
    idx, weights = route(logits, bias, config)
    ref_idx, ref_weights = route(logits, bias, config, reference.moe_route)
    assert torch.equal(idx, ref_idx) and torch.equal(weights, ref_weights)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_cpu_kernel(config):
    """Logits a permutation of an even grid over [-3, 3]: scores at least ~2.7e-4 apart, far above the
    ulp-level difference of the two sigmoids, so both kernels must select the same experts."""
    experts = config[0]
    logits = torch.stack([torch.randperm(experts) for _ in range(513)]).float() * (6 / experts) - 3
    idx, weights = route(logits.cuda(), None, config)
    cpu_idx, cpu_weights = route(logits, None, config)
    assert torch.equal(idx.cpu(), cpu_idx)
    torch.testing.assert_close(weights.cpu(), cpu_weights, rtol=1e-6, atol=0)


def test_cuda_rejects_what_cpu_rejects():
    with pytest.raises(ValueError, match="moe_route: bias must be on"):
        ops.moe_route(torch.randn(2, 8).cuda(), torch.zeros(8), 2)
    with pytest.raises(ValueError, match="moe_route: top_k must be at most"):
        ops.moe_route(torch.randn(2, 8).cuda(), None, 5, 2, 1)

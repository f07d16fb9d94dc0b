"""The recipe's pieces against direct formulas: the auxiliary-loss-free bias update, the sequence-wise
balance loss (eqs. 17-20), AdamW with bf16 moments, the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.model import ModelConfig, build_model
from dsv3.train import balancing
from dsv3.train.optim import AdamW, lr_at, param_groups


def test_bias_update_rule():
    model = build_model(ModelConfig.preset("tiny"), dtype=torch.float32)
    layers = balancing.moe_layers(model)
    assert len(layers) == 3  # two MoE layers of the main model + the MTP layer
    loads = [torch.tensor([5.0, 1, 3, 3, 0, 8, 2, 2]) for _ in layers]  # mean 3
    balancing.update_router_bias(model, loads, gamma=0.01)
    expect = 0.01 * torch.tensor([-1.0, 1, 0, 0, 1, -1, 1, 1])
    for moe in layers:
        assert torch.equal(moe.gate.e_score_correction_bias, expect)
    with pytest.raises(ValueError, match="load vectors"):
        balancing.update_router_bias(model, loads[:1], 0.01)
    assert balancing.imbalance([torch.tensor([1.0, 3.0])]) == [1.5]


def test_sequence_balance_loss_matches_the_formula():
    b, t, n, k, alpha = 3, 7, 8, 2, 1e-3
    scores = torch.rand(b * t, n)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(b * t)])
    got = balancing.sequence_balance_loss(scores, idx, b, k, alpha)
    total = 0.0
    for s in range(b):
        for i in range(n):
            rows = range(s * t, (s + 1) * t)
            f = n / (k * t) * sum(int(i in idx[r].tolist()) for r in rows)
            p = sum(float(scores[r, i] / scores[r].sum()) for r in rows) / t
            total += f * p
    assert float(got) == pytest.approx(alpha * total / b, rel=1e-5)


def test_adamw_bf16_moments_against_a_direct_implementation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    v = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([dict(params=[w], weight_decay=0.1), dict(params=[v], weight_decay=0.0)], lr=0.01)
    ref_w, ref_v = w.detach().clone(), v.detach().clone()
    m = {0: torch.zeros(5, 4), 1: torch.zeros(4)}
    s = {0: torch.zeros(5, 4), 1: torch.zeros(4)}
    for step in range(1, 4):
        gw, gv = torch.randn(5, 4), torch.randn(4)
        w.grad, v.grad = gw.clone(), gv.clone()
        opt.step()
        for key, ref, g, wd in ((0, ref_w, gw, 0.1), (1, ref_v, gv, 0.0)):
            m[key] = (0.9 * m[key] + 0.1 * g).bfloat16().float()
            s[key] = (0.95 * s[key] + 0.05 * g * g).bfloat16().float()
            ref.mul_(1 - 0.01 * wd)
            ref.sub_(0.01 / (1 - 0.9**step) * m[key] / ((s[key] / (1 - 0.95**step)).sqrt() + 1e-8))
    assert torch.allclose(w, ref_w, atol=1e-3, rtol=1e-3) and torch.allclose(v, ref_v, atol=1e-3, rtol=1e-3)
    assert {opt.state[w]["exp_avg"].dtype, opt.state[w]["exp_avg_sq"].dtype} == {torch.bfloat16}
    with pytest.raises(TypeError, match="fp32"):
        p = torch.nn.Parameter(torch.randn(2, dtype=torch.bfloat16))
        p.grad = torch.ones_like(p)
        AdamW([p]).step()


def test_param_groups_do_not_decay_norms():
    model = build_model(ModelConfig.preset("tiny"), dtype=torch.float32)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


def test_lr_schedule_warmup_constant_cosine():
    lrs = [lr_at(s, 100, 1.0, 0.1, 10, 60) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:61])
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:], strict=False))
    assert lrs[99] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 39 / 40)))

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


def _per_parameter_adamw(params, state, lr, b1, b2, eps, wd):
    """The update one parameter at a time: the formula AdamW's multi-tensor step reproduces bit for bit."""
    for p in params:
        if p.grad is None:
            continue
        st = state.setdefault(p, {"step": 0, "m": torch.zeros_like(p, dtype=torch.bfloat16)})
        st.setdefault("v", torch.zeros_like(p, dtype=torch.bfloat16))
        st["step"] += 1
        k, g = st["step"], p.grad.float()
        m = st["m"].float().mul_(b1).add_(g, alpha=1 - b1)
        v = st["v"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
        st["m"].copy_(m)
        st["v"].copy_(v)
        denom = (v / (1 - b2**k)).sqrt_().add_(eps)
        if wd:
            p.mul_(1 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**k))


def test_adamw_multi_tensor_step_is_the_per_parameter_formula():
    """Bit for bit over several steps, with two groups, odd shapes, and parameters that miss gradients on
    some steps (so parameters of one group sit at different step counts)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(7, 3), (130,), (1,), (64, 129), (5, 1, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    groups = [dict(params=params[:3], weight_decay=0.1), dict(params=params[3:], weight_decay=0.0)]
    opt = AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    state: dict = {}
    for step in range(6):
        for i, (p, r) in enumerate(zip(params, ref, strict=True)):
            skip = (i + step) % 4 == 0
            grad = None if skip else torch.randn(p.shape, generator=g) * 10 ** (i - 2)
            p.grad = grad
            r.grad = None if grad is None else grad.clone()
        opt.step()
        for wd, members in ((0.1, ref[:3]), (0.0, ref[3:])):
            _per_parameter_adamw(members, state, 3e-3, 0.9, 0.95, 1e-8, wd)
        for p, r in zip(params, ref, strict=True):
            assert torch.equal(p.detach(), r), step
            if r in state:
                assert opt.state[p]["step"] == state[r]["step"]
                assert torch.equal(opt.state[p]["exp_avg"], state[r]["m"])
                assert torch.equal(opt.state[p]["exp_avg_sq"], state[r]["v"])


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

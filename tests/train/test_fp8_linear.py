"""FP8 training GEMMs (dsv3.train.fp8_linear): Fprop/Dgrad/Wgrad against exact autograd and against the ops
they are built from, the grouped experts, and switching the model to FP8 compute. Inputs shared by several
projections are quantized once; those paths are checked bit for bit against the per-layer recipe.

Accuracy bounds are calc_diff (1 - 2Σxy / Σ(x² + y²)) against float64 autograd. Measured values on these
seeds are stated next to each bound; the bounds leave about 3x margin."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from torch import nn

from dsv3 import ops
from dsv3.model import ModelConfig, build_model
from dsv3.model.layers import MLP
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts
from dsv3.train.fp8_linear import (
    FP8TrainExperts,
    FP8TrainLinear,
    FP8TrainMLA,
    FP8TrainMLP,
    _KGroupedLayout,
    block_aligned_experts,
    disable_fp8_training,
    enable_fp8_training,
    fp8_grouped_experts,
    fp8_grouped_linear,
    fp8_grouped_linears,
    fp8_linear,
    fp8_linears,
    transpose_block_quantized,
)

# One FP8 GEMM (both operands e4m3 with 1x128 / 128x128 scales) vs the exact product, Gaussian data:
# measured 6.3e-4 .. 6.9e-4 for y, dx and dW at every shape and dtype below.
LINEAR_BOUND = 2e-3
# Three chained grouped GEMMs with SwiGLU in between: measured 1.9e-3 .. 2.1e-3 (y, dx, each dW).
EXPERTS_BOUND = 6e-3


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(_bits(a), _bits(b))


def _exact_linear_grads(x, w, dy):
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y = F.linear(x64, w64)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad


@pytest.mark.parametrize(
    "x_shape, out_features",
    [((77, 200), 300), ((300, 200), 300), ((2, 150, 200), 300), ((3, 100, 512), 256)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_exact_autograd(x_shape, out_features, dtype):
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_features, x_shape[-1]) * 0.05).requires_grad_(True)  # fp32 master
    y = fp8_linear(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert y.shape == (*x_shape[:-1], out_features) and y.dtype == dtype
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    y_ref, dx_ref, dw_ref = _exact_linear_grads(x, w, dy)
    assert ops.calc_diff(y.detach(), y_ref) < LINEAR_BOUND
    assert ops.calc_diff(x.grad, dx_ref) < LINEAR_BOUND
    assert ops.calc_diff(w.grad, dw_ref) < LINEAR_BOUND


def test_fp8_linear_is_the_recipe_gemms():
    """Each output is the named op on the recipe's operands, bit for bit: x and dy in 1x128 tiles along
    their features for Fprop/Dgrad, W's 128x128 blocks (transposed for Dgrad), and dyᵀ, xᵀ in 1x128 tiles
    along the tokens for Wgrad (77 tokens: a partial token tile)."""
    x = torch.randn(77, 200, requires_grad=True)
    w = (torch.randn(300, 200) * 0.05).requires_grad_(True)
    y = fp8_linear(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)

    qw, sw = ops.quantize_per_block(w.detach())
    a, sa = ops.quantize_per_token_group(x.detach())
    _assert_bit_equal(y.detach(), ops.fp8_gemm_nt(a, sa, qw, sw, out_dtype=torch.float32))
    g, sg = ops.quantize_per_token_group(dy)
    qwt, swt = ops.quantize_per_block(w.detach().t().contiguous())
    _assert_bit_equal(x.grad, ops.fp8_gemm_nt(g, sg, qwt, swt, out_dtype=torch.float32))
    at, sat = ops.quantize_per_token_group(dy.t().contiguous())
    bt, sbt = ops.quantize_per_token_group(x.detach().t().contiguous())
    assert sat.shape == (300, 1) and sbt.shape == (200, 1)
    _assert_bit_equal(w.grad, ops.fp8_gemm_wgrad_nt(at, sat, bt, sbt))


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (3, 136, 250)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_blocks_equal_quantizing_the_transpose(shape, dtype):
    w = torch.randn(shape, dtype=dtype)
    w[..., :5, :7] *= 300  # one block with a much larger amax than its neighbours
    q, s = transpose_block_quantized(*ops.quantize_per_block(w))
    q_ref, s_ref = ops.quantize_per_block(w.transpose(-1, -2).contiguous())
    _assert_bit_equal(q, q_ref)
    _assert_bit_equal(s, s_ref)
    assert q.is_contiguous() and s.is_contiguous()


def test_fp8_linear_accumulates_grads_and_keeps_master_dtype():
    x = torch.randn(50, 200)
    w = (torch.randn(300, 200) * 0.05).requires_grad_(True)
    dy = torch.randn(50, 300)
    fp8_linear(x, w).backward(dy)
    once = w.grad.clone()
    fp8_linear(x, w).backward(dy)
    _assert_bit_equal(w.grad, 2 * once)  # fp32 master: g + g is exact

    wb = w.detach().bfloat16().requires_grad_(True)
    fp8_linear(x.bfloat16(), wb).backward(dy.bfloat16())
    assert wb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad).all()
    assert ops.calc_diff(wb.grad, once) < 1e-3  # same GEMMs; bf16 operands and bf16 grad storage

    xg = x.clone().requires_grad_(True)  # only the input needs a grad: no Wgrad
    fp8_linear(xg, w.detach()).backward(dy)
    assert xg.grad.shape == x.shape


def test_fp8_linear_follows_autocast():
    """Under autocast the FP8 layers return what nn.Linear would (the autocast dtype); x is quantized from
    fp32 as it is, and the gradients keep x's and the master's dtypes."""
    x = torch.randn(40, 200, requires_grad=True)
    w = (torch.randn(300, 200) * 0.05).requires_grad_(True)
    wg = (torch.randn(2, 300, 200) * 0.05).requires_grad_(True)
    m_indices = torch.tensor([0] * 15 + [1] * 25, dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
        yg = fp8_grouped_linear(x, m_indices, wg)
        assert y.dtype == F.linear(x, w).dtype == torch.bfloat16 and yg.dtype == torch.bfloat16
    (y.float().sum() + yg.float().sum()).backward()
    assert x.grad.dtype == w.grad.dtype == wg.grad.dtype == torch.float32
    _assert_bit_equal(y.detach(), fp8_linear(x.detach(), w.detach()).bfloat16())


def test_fp8_linear_rejects_mismatched_features():
    with pytest.raises(ValueError, match="input features"):
        fp8_linear(torch.randn(4, 100), torch.randn(300, 200))


def _grouped_problem(counts, hidden=200, inter=136, dtype=torch.float32):
    experts = len(counts)
    m_indices = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts)).int()
    x = torch.randn(len(m_indices), hidden, dtype=dtype, requires_grad=True)
    shapes = [(experts, inter, hidden), (experts, inter, hidden), (experts, hidden, inter)]
    ws = [(torch.randn(s) * 0.05).requires_grad_(True) for s in shapes]
    return x, m_indices, ws


def _experts_loop(x, counts, ws, linear):
    outs, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start : start + n]
        start += n
        h = F.silu(linear(rows, ws[0][e])) * linear(rows, ws[1][e])
        outs.append(linear(h, ws[2][e]))
    return torch.cat(outs)


# Empty experts first, in the middle and last; counts below, at and above one 128-token tile.
COUNTS = [0, 37, 0, 130, 1, 128, 0]


def test_grouped_experts_match_dense_fp8_loop():
    """Same quantization groups as the per-expert dense function (tokens of one expert share Wgrad tiles,
    never straddling experts): equal up to fp32 summation order."""
    x, m_indices, ws = _grouped_problem(COUNTS)
    y = fp8_grouped_experts(x, m_indices, *ws)
    dy = torch.randn_like(y)
    y.backward(dy)
    xl = x.detach().clone().requires_grad_(True)
    wl = [w.detach().clone().requires_grad_(True) for w in ws]
    yl = _experts_loop(xl, COUNTS, wl, fp8_linear)
    yl.backward(dy)
    assert_close_rel(y.detach(), yl.detach(), 1e-5)
    assert_close_rel(x.grad, xl.grad, 1e-5)
    for w, ref in zip(ws, wl, strict=True):
        assert_close_rel(w.grad, ref.grad, 1e-5)
        assert not w.grad[[0, 2, 6]].any()  # experts without tokens get a zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [COUNTS, [127, 129, 0, 256, 3], [1]])
def test_block_aligned_experts_equal_the_unpadded_call(dtype, counts):
    """The GPU path's layout (every expert in whole 128-row blocks of its id) gives the unpadded call's
    outputs and gradients, rows marked -1 included (zero outputs, no gradient). Not bit for bit: the CPU
    GEMM picks its kernel (so its fp32 summation order) by a group's row count, and an intermediate that
    lands on the other side of an e4m3 rounding boundary moves an element by ~1e-3 — calc_diff stays
    ~1e-8, against ~1 for a misplaced row."""
    x, m_indices, ws = _grouped_problem(counts, dtype=dtype)
    m_indices = m_indices.clone()
    m_indices[::5] = -1
    dy = torch.randn(x.shape, dtype=dtype)
    results = []
    for fn in (fp8_grouped_experts, block_aligned_experts):
        xi = x.detach().clone().requires_grad_(True)
        wi = [w.detach().clone().requires_grad_(True) for w in ws]
        y = fn(xi, m_indices, *wi)
        y.backward(dy)
        results.append([y.detach(), xi.grad, *(w.grad for w in wi)])
    for name, a, b in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), *results, strict=True):
        assert ops.calc_diff(b, a) < 1e-5, name
    assert not results[1][0][::5].any() and not results[1][1][::5].any()


def test_block_aligned_experts_layout(monkeypatch):
    """What the grouped GEMMs receive: every 128-row block holds one expert id (blocks_uniform of the CUDA
    host code), each expert's rows first and in order, zero rows after."""
    mod = importlib.import_module("dsv3.train.fp8_linear")

    seen = []
    real = mod.fp8_grouped_experts
    monkeypatch.setattr(
        mod, "fp8_grouped_experts", lambda x, idx, *w: seen.append((x, idx)) or real(x, idx, *w)
    )
    x, m_indices, ws = _grouped_problem([130, 0, 5])
    block_aligned_experts(x, m_indices, *ws)
    xp, idx = seen[0]
    assert idx.tolist() == [0] * 256 + [2] * 128
    assert torch.equal(xp[:130], x[:130]) and not xp[130:256].any()
    assert torch.equal(xp[256:261], x[130:]) and not xp[261:].any()
    with pytest.raises(ValueError, match="m_indices must be in"):
        block_aligned_experts(x, torch.full_like(m_indices, 3), *ws)
    with pytest.raises(ValueError, match="x must be"):
        block_aligned_experts(x, m_indices[:-1], *ws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_exact_autograd(dtype):
    x, m_indices, ws = _grouped_problem(COUNTS, dtype=dtype)
    y = fp8_grouped_experts(x, m_indices, *ws)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = [w.detach().double().requires_grad_(True) for w in ws]
    y64 = _experts_loop(x64, COUNTS, w64, F.linear)
    y64.backward(dy.double())
    assert ops.calc_diff(y.detach(), y64.detach()) < EXPERTS_BOUND
    assert ops.calc_diff(x.grad, x64.grad) < EXPERTS_BOUND
    for w, ref in zip(ws, w64, strict=True):
        assert w.grad.dtype == torch.float32
        assert ops.calc_diff(w.grad, ref.grad) < EXPERTS_BOUND


def test_grouped_experts_accumulate_across_backwards():
    counts = [5, 0, 140]
    x, m_indices, ws = _grouped_problem(counts)
    dys = [torch.randn(sum(counts), 200) for _ in range(2)]
    for dy in dys:
        fp8_grouped_experts(x, m_indices, *ws).backward(dy)
    totals = [torch.zeros_like(w) for w in ws]
    for dy in dys:  # each micro-batch's gradient on its own, summed here in the same order
        fresh = [w.detach().clone().requires_grad_(True) for w in ws]
        fp8_grouped_experts(x.detach(), m_indices, *fresh).backward(dy)
        totals = [t + f.grad for t, f in zip(totals, fresh, strict=True)]
    for w, total in zip(ws, totals, strict=True):
        _assert_bit_equal(w.grad, total)


def test_grouped_linear_skips_rows_marked_minus_one():
    """-1 rows (DeepGEMM's contiguous-layout padding) give zero outputs and grads and leave dW alone."""
    w = (torch.randn(3, 136, 200) * 0.05).requires_grad_(True)
    m_indices = torch.tensor([-1] * 4 + [0] * 10 + [2] * 150 + [-1] * 3, dtype=torch.int32)
    x = torch.randn(len(m_indices), 200, requires_grad=True)
    y = fp8_grouped_linear(x, m_indices, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = m_indices >= 0
    assert not y[~keep].any() and not x.grad[~keep].any()
    wk = w.detach().clone().requires_grad_(True)
    xk = x.detach()[keep].clone().requires_grad_(True)
    yk = fp8_grouped_linear(xk, m_indices[keep], wk)
    yk.backward(dy[keep])
    _assert_bit_equal(y.detach()[keep], yk.detach())
    _assert_bit_equal(x.grad[keep], xk.grad)
    _assert_bit_equal(w.grad, wk.grad)


def test_grouped_linear_rejects_bad_indices():
    with pytest.raises(ValueError, match="m_indices"):
        x = torch.randn(4, 200, requires_grad=True)
        w = torch.randn(2, 8, 200, requires_grad=True)
        fp8_grouped_linear(x, torch.tensor([0, 0, 1, 2], dtype=torch.int32), w).sum().backward()


def _tiny_loss(model, ids):
    """Main next-token loss plus the MTP loss, so that every parameter (the MTP layer's too) is used."""
    h = model.hidden(ids[:, :-1])
    main = F.cross_entropy(model.logits(h).flatten(0, 1), ids[:, 1:].flatten())
    _, mtp_logits = model.mtp_logits(h[:, :-1], ids[:, 1:-1])
    return main + 0.3 * F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())


def test_enable_fp8_training_on_tiny_model():
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg, dtype=torch.float32, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    params_before = dict(model.named_parameters())
    with torch.no_grad():
        logits_before = model(ids)
    ref = _tiny_loss(model, ids)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in params_before.items()}
    model.zero_grad(set_to_none=True)

    assert enable_fp8_training(model) is model
    assert dict(model.named_parameters()) == params_before  # same names, same Parameter objects
    kinds = {n: type(m) for n, m in model.named_modules()}
    attn = "model.layers.0.self_attn."
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert kinds[attn + name] is FP8TrainLinear
    for mlp in (
        "model.layers.0.mlp",
        "model.layers.1.mlp.shared_experts",
        "model.layers.3.mlp.shared_experts",
    ):
        assert all(kinds[f"{mlp}.{p}"] is FP8TrainLinear for p in ("gate_proj", "up_proj", "down_proj"))
    assert (
        kinds["model.layers.0.mlp"] is FP8TrainMLP
        and kinds["model.layers.1.mlp.shared_experts"] is FP8TrainMLP
    )
    assert (
        kinds["model.layers.0.self_attn"] is FP8TrainMLA and kinds["model.layers.3.self_attn"] is FP8TrainMLA
    )
    assert kinds["model.layers.1.mlp.experts"] is FP8TrainExperts
    assert kinds["model.layers.3.mlp.experts"] is FP8TrainExperts  # the MTP block's experts
    for name in ("lm_head", "model.layers.3.eh_proj", "model.layers.3.shared_head.head"):
        assert kinds[name] is nn.Linear  # SPEC §7: head and MTP projections stay in full precision
    assert kinds["model.embed_tokens"] is nn.Embedding

    loss = _tiny_loss(model, ids)
    loss.backward()
    # Measured 4.4e-6 relative (the init's std 0.006 keeps logits small) and 7.6e-4 calc_diff over all
    # gradients together; single parameters differ more where FP8 noise flips a token's top-k experts.
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-5
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ops.calc_diff(grads, torch.cat([g.flatten() for g in ref_grads.values()])) < 3e-3

    assert disable_fp8_training(model) is model
    fp8_kinds = {FP8TrainLinear, FP8TrainExperts, FP8TrainMLP, FP8TrainMLA}
    assert {type(m) for m in model.modules()}.isdisjoint(fp8_kinds)
    assert type(model.model.layers[1].mlp.experts) is Experts
    assert type(model.model.layers[0].mlp) is MLP and type(model.model.layers[0].self_attn) is MLA
    with torch.no_grad():
        _assert_bit_equal(model(ids), logits_before)


def test_enable_fp8_training_bf16_model():
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg, dtype=torch.bfloat16, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = _tiny_loss(model, ids).item()
    enable_fp8_training(model)
    loss = _tiny_loss(model, ids)
    loss.backward()
    # Measured equal: the bf16 loss near 10 has steps of 6e-3 relative; the bound allows one step.
    assert abs(loss.item() - ref) / ref < 1e-2
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n


def test_enable_fp8_training_rejects_fp8_inference_weights():
    fp8 = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128])
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), quantization_config=fp8)
    model = build_model(cfg, dtype=torch.float32)
    with pytest.raises(ValueError, match="master weights"):
        enable_fp8_training(model)
    assert not any(isinstance(m, (FP8TrainLinear, FP8TrainExperts)) for m in model.modules())


# ---- quantizing shared inputs once: bit-identical to the per-layer recipe ---------------------------------


def _segment_reference(t, m_indices, groups):
    """Wgrad's token-major operands composed from the op: each group's rows (in row order) quantized on
    their own along tokens, concatenated in group order."""
    parts = [ops.quantize_per_token_group(t[m_indices == g].t().contiguous()) for g in range(groups)]
    return torch.cat([q for q, _ in parts], 1), torch.cat([s for _, s in parts], 1)


def _layout_cases():
    g = torch.Generator().manual_seed(5)
    sizes = [1, 127, 0, 128, 129, 3]
    ordered = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shuffled = ordered[torch.randperm(len(ordered), generator=g)]
    with_skips = torch.cat([torch.full((4,), -1), ordered[:128], torch.full((3,), -1), ordered[128:]])
    contiguous_out_of_order = torch.cat([ordered[ordered == 4], ordered[ordered < 4], ordered[ordered == 5]])
    split_group = torch.cat([ordered[:60], torch.full((2,), -1), ordered[60:]])  # group 1 in two runs
    return {
        "sorted": (ordered, True),
        "unsorted": (shuffled, False),
        "minus_one_rows": (with_skips, True),
        "groups_out_of_order": (contiguous_out_of_order, True),
        "group_split_by_skips": (split_group, False),
        "one_group": (torch.full((130,), 2), True),
        "all_skipped": (torch.full((5,), -1), True),
    }


@pytest.mark.parametrize("case", list(_layout_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_grouped_layout_matches_per_segment_quantization(case, dtype):
    """Both layout paths (per-segment for contiguous groups, pad + gather otherwise) give the codes and
    scales of quantizing each group's rows on its own; groups of 0, 1, 127, 128, 129 rows."""
    m_indices, contiguous = _layout_cases()[case]
    groups = 6
    t = torch.randn(len(m_indices), 200, dtype=dtype)
    t[::7] *= 50  # tiles with very different amax
    layout = _KGroupedLayout(m_indices.int(), groups)
    assert (layout.segments is not None) == contiguous
    q_ref, s_ref = _segment_reference(t, m_indices, groups)
    q, s = layout.quantize(t)
    _assert_bit_equal(q, q_ref)
    _assert_bit_equal(s, s_ref)
    assert q.is_contiguous() and s.is_contiguous()
    layout.segments = None  # the general path on the same rows
    q, s = layout.quantize(t)
    _assert_bit_equal(q, q_ref)
    _assert_bit_equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linears_equal_separate_linears(dtype):
    """Two weights over one x: outputs and grads bit-equal to two fp8_linear calls; an unused output gives
    its weight no grad and x no contribution."""
    x = torch.randn(2, 90, 200, dtype=dtype, requires_grad=True)
    ws = [(torch.randn(n, 200) * 0.05).requires_grad_(True) for n in (300, 136)]
    ys = fp8_linears(x, ws)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    xr = x.detach().clone().requires_grad_(True)
    wr = [w.detach().clone().requires_grad_(True) for w in ws]
    yr = [fp8_linear(xr, w) for w in wr]
    torch.autograd.backward(yr, dys)
    for a, b in zip(ys + [x.grad] + [w.grad for w in ws], yr + [xr.grad] + [w.grad for w in wr], strict=True):
        _assert_bit_equal(a.detach(), b.detach())

    x.grad = None
    ws[0].grad = ws[1].grad = None
    fp8_linears(x, ws)[1].backward(dys[1])
    assert ws[0].grad is None
    _assert_bit_equal(ws[1].grad, wr[1].grad)
    xr.grad = None
    fp8_linear(xr, wr[1]).backward(dys[1])
    _assert_bit_equal(x.grad, xr.grad)

    with pytest.raises(ValueError, match="input features"):
        fp8_linears(x, [ws[0], torch.randn(10, 100)])
    with pytest.raises(ValueError, match="at least one"):
        fp8_linears(x, [])


def test_fp8_grouped_linears_equal_separate_linears():
    x, m_indices, ws = _grouped_problem(COUNTS)
    ys = fp8_grouped_linears(x, m_indices, ws[:2])
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    xr = x.detach().clone().requires_grad_(True)
    wr = [w.detach().clone().requires_grad_(True) for w in ws[:2]]
    yr = [fp8_grouped_linear(xr, m_indices, w) for w in wr]
    torch.autograd.backward(yr, dys)
    for a, b in zip(
        ys + [x.grad, *(w.grad for w in ws[:2])], yr + [xr.grad, *(w.grad for w in wr)], strict=True
    ):
        _assert_bit_equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="one E"):
        fp8_grouped_linears(x, m_indices, [ws[0], ws[0][:2]])
    with pytest.raises(ValueError, match="w_down"):
        fp8_grouped_experts(x, m_indices, ws[0], ws[1], ws[2][..., :100])


def _reference_dtype(x):
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _gemm_out(dtype):
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


class _RecipeLinear(torch.autograd.Function):
    """One linear of the recipe composed from the ops, x quantized by each layer for itself."""

    @staticmethod
    def forward(ctx, x, w, m_indices, out_dtype):
        qw, sw = ops.quantize_per_block(w.detach())
        a, sa = ops.quantize_per_token_group(x)
        if m_indices is None:
            y = ops.fp8_gemm_nt(a, sa, qw, sw, out_dtype=_gemm_out(out_dtype))
        else:
            y = ops.m_grouped_fp8_gemm_nt_contiguous(a, sa, qw, sw, m_indices, out_dtype=_gemm_out(out_dtype))
        ctx.save_for_backward(x, qw, sw, m_indices)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, qw, sw, m_indices = ctx.saved_tensors
        g, sg = ops.quantize_per_token_group(dy)
        qwt, swt = qw.transpose(-1, -2).contiguous(), sw.transpose(-1, -2).contiguous()
        dw = torch.zeros(qw.shape)
        if m_indices is None:
            dx = ops.fp8_gemm_nt(g, sg, qwt, swt, out_dtype=_gemm_out(x.dtype))
            at, sat = ops.quantize_per_token_group(dy.t().contiguous())
            bt, sbt = ops.quantize_per_token_group(x.t().contiguous())
            ops.fp8_gemm_wgrad_nt(at, sat, bt, sbt, out=dw)
        else:
            dx = ops.m_grouped_fp8_gemm_nt_contiguous(
                g, sg, qwt, swt, m_indices, out_dtype=_gemm_out(x.dtype)
            )
            at, sat = _segment_reference(dy, m_indices, qw.shape[0])
            bt, sbt = _segment_reference(x, m_indices, qw.shape[0])
            ks = torch.bincount(m_indices[m_indices >= 0].long(), minlength=qw.shape[0])
            ops.k_grouped_fp8_gemm_wgrad_nt(at, sat, bt, sbt, ks, out=dw)
        return dx.to(x.dtype), dw, None, None


class _RecipeLinearModule(nn.Linear):
    def forward(self, x):
        y = _RecipeLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, None, _reference_dtype(x))
        return y.view(*x.shape[:-1], -1)


class _RecipeExperts(Experts):
    def forward(self, x, local_idx):
        m = local_idx.int()
        dtype = _reference_dtype(x)
        h = F.silu(_RecipeLinear.apply(x, self.gate_proj, m, dtype)) * _RecipeLinear.apply(
            x, self.up_proj, m, dtype
        )
        return _RecipeLinear.apply(h, self.down_proj, m, dtype)


@pytest.mark.parametrize(
    "dtype, autocast, q_lora_rank",
    [(torch.float32, True, 96), (torch.float32, False, None), (torch.bfloat16, False, 96)],
)
def test_fp8_training_step_is_the_per_layer_recipe(dtype, autocast, q_lora_rank):
    """The whole FP8 model (shared quantization of MLP/MLA/expert inputs, per-segment Wgrad layout) against
    every projection run as its own recipe linear composed from the ops: loss and every gradient equal bit
    for bit (fp32 masters under bf16 autocast as the trainer runs them, plain fp32, bf16; both query
    paths)."""
    cfg = dataclasses.replace(ModelConfig.preset("tiny"), q_lora_rank=q_lora_rank)
    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(6))
    results = []
    for recipe in (False, True):
        model = enable_fp8_training(build_model(cfg, dtype=dtype, seed=4))
        if recipe:
            swap = {FP8TrainLinear: _RecipeLinearModule, FP8TrainExperts: _RecipeExperts}
            swap.update({FP8TrainMLP: MLP, FP8TrainMLA: MLA})
            for m in model.modules():
                m.__class__ = swap.get(type(m), type(m))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _tiny_loss(model, ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ref, grads_ref) = results
    _assert_bit_equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert g is not None, n
        _assert_bit_equal(g, grads_ref[n])

"""FP8 training GEMMs (DeepSeek-V3 report §3.3, SPEC §7): all three GEMMs of a linear layer y = x·Wᵀ run
on e4m3 operands with fp32 accumulation, while the master weight W [out, in] and its gradient stay in
BF16/FP32.

- Fprop  y  = x·Wᵀ:   `fp8_gemm_nt(q(x), q(W))`, x in 1 x 128 tiles along `in`, W in 128 x 128 blocks.
- Dgrad  dx = dy·W:   `fp8_gemm_nt(q(dy), q(Wᵀ))`, dy in 1 x 128 tiles along `out`; q(Wᵀ) is the forward's
  q(W) transposed (a 128 x 128 block holds the same values either way, so codes and scales are identical to
  quantizing Wᵀ, and W is quantized once per step).
- Wgrad  dW = dyᵀ·x:  `fp8_gemm_wgrad_nt(q(dyᵀ), q(xᵀ))`, both in 1 x 128 tiles along the token dimension
  (the reduction dim of this GEMM), accumulated into an fp32 buffer.

Scales are computed online from each step's tensors. The grouped variant serves the routed experts
([E, out, in] stacked weights, token rows grouped by expert): `m_grouped_fp8_gemm_nt_contiguous` for Fprop
and Dgrad, `k_grouped_fp8_gemm_wgrad_nt` for Wgrad with each expert's tokens as its own K segment.

Projections reading the same input (gate/up of an MLP or of the routed experts, the input projections of
MLA) quantize it once for all of them, forward and backward; every GEMM and its operands stay those of
separate layers, so the numbers are the same.

`enable_fp8_training(model)` switches a BF16/FP32 `DeepseekV3` to this compute in place (attention and
MLP/expert projections only; embedding, head, router, norms and the MTP projections keep full precision)
without touching its parameters; `disable_fp8_training(model)` switches it back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..model.layers import MLP, FP8Linear
from ..model.mla import MLA
from ..model.moe import Experts

__all__ = [
    "FP8LinearFunction",
    "FP8GroupedLinearFunction",
    "FP8TrainLinear",
    "FP8TrainMLP",
    "FP8TrainMLA",
    "FP8TrainExperts",
    "fp8_linear",
    "fp8_linears",
    "fp8_grouped_linear",
    "fp8_grouped_linears",
    "fp8_grouped_experts",
    "block_aligned_experts",
    "transpose_block_quantized",
    "enable_fp8_training",
    "disable_fp8_training",
]

_BLOCK = 128
ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMMs write bf16 or fp32; fp32 activations get fp32 outputs, anything else bf16 (then cast)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype inside an autocast region: what nn.Linear would return there, so the
    FP8 layers drop into mixed-precision code. x itself is quantized as it is (no rounding to bf16 first)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def transpose_block_quantized(q: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(Wᵀ) from q(W) for 128 x 128 block quantization (2-D or stacked 3-D): block (i, j) of W is block
    (j, i) of Wᵀ with the same elements, hence the same amax, scale and codes (bit-identical to quantizing
    Wᵀ). Made contiguous because the GEMMs take K-major operands."""
    return q.transpose(-1, -2).contiguous(), scale_inv.transpose(-1, -2).contiguous()


def _quantize_along_tokens(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, C] -> codes [C, T] and scales [C, ceil(T/128)]: 1 x 128 tiles of tᵀ, i.e. 128 tokens per tile,
    the layout Wgrad reduces over. The quantize op reads the transposed view in tiles of its source rows,
    without a transposed copy."""
    return ops.quantize_per_token_group(t.t(), _BLOCK)


class FP8LinearFunction(torch.autograd.Function):
    """y_i = x·W_iᵀ for one or more master weights W_i [out_i, in] reading the same x [T, in] (2-D;
    `fp8_linear` flattens): gate/up of an MLP, the input projections of MLA. x is quantized once for every
    Fprop (1 x 128 along `in`) and once for every Wgrad (1 x 128 along tokens); each GEMM is the one a
    separate linear would run. dx = Σ_i dy_i·W_i, each term in x's dtype, summed as autograd sums the grads
    of separate uses of x (bit-identical for one or two weights, where the order cannot matter). Saves x and
    each q(W_i) (reused transposed by Dgrad)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, out_dtype: torch.dtype, *weights: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused output contributes no Dgrad and no Wgrad
        a, sa = ops.quantize_per_token_group(x, _BLOCK)
        ys, quantized = [], []
        for weight in weights:
            qw, sw = ops.quantize_per_block(weight.detach(), _BLOCK)
            ys.append(ops.fp8_gemm_nt(a, sa, qw, sw, out_dtype=_gemm_dtype(out_dtype)).to(out_dtype))
            quantized += [qw, sw]
        ctx.save_for_backward(x, *quantized)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x, *quantized = ctx.saved_tensors
        dx, dws = _backward(
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[2:],
            x,
            dys,
            quantized,
            lambda g, sg, qwt, swt: ops.fp8_gemm_nt(g, sg, qwt, swt, out_dtype=_gemm_dtype(x.dtype)),
            _quantize_along_tokens,
            lambda a, sa, b, sb, out: ops.fp8_gemm_wgrad_nt(a, sa, b, sb, out=out),
        )
        return dx, None, *dws


def _backward(need_dx, need_dws, x, dys, quantized, dgrad, quantize_tokens, wgrad):
    """The backward of the multi-weight FP8 functions: for each weight i with an incoming dy_i, Dgrad
    `dgrad(q(dy_i), q(W_iᵀ))` summed into dx (in x's dtype, in weight order) and Wgrad `wgrad(q(dy_iᵀ),
    q(xᵀ), out)` into an fp32 buffer, x's token-major quantization made once (`quantize_tokens`)."""
    dx, dws, xt = None, [None] * len(dys), None
    for i, dy in enumerate(dys):
        if dy is None:
            continue
        qw, sw = quantized[2 * i], quantized[2 * i + 1]
        if need_dx:
            g, sg = ops.quantize_per_token_group(dy, _BLOCK)
            d = dgrad(g, sg, *transpose_block_quantized(qw, sw)).to(x.dtype)
            dx = d if dx is None else dx.add_(d)  # dx is this function's own GEMM output
        if need_dws[i]:
            if xt is None:
                xt = quantize_tokens(x)
            # fp32 out whatever the master dtype: autograd casts it to W's dtype and adds it to an existing
            # W.grad (gradient accumulation), so nothing is lost for fp32 masters.
            dws[i] = torch.zeros(qw.shape, dtype=torch.float32, device=dy.device)
            wgrad(*quantize_tokens(dy), *xt, dws[i])
    return dx, dws


def _check_linear_weights(x: torch.Tensor, weights: Sequence[torch.Tensor], name: str) -> None:
    if not weights:
        raise ValueError(f"{name}: weights must hold at least one weight")
    for w in weights:
        if w.dim() != 2 or x.shape[-1] != w.shape[-1]:
            raise ValueError(f"{name}: x has {x.shape[-1]} input features, weight is {tuple(w.shape)}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 GEMMs in forward and backward. x [..., in] (bf16 or fp32:
    the output's dtype, or the autocast dtype under autocast), weight [out, in] (fp32 or bf16 master)."""
    return fp8_linears(x, [weight])[0]


def fp8_linears(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`[fp8_linear(x, w) for w in weights]`, bit for bit (outputs and, for up to two weights, grads), with
    x quantized once for all of them in forward and once in backward."""
    _check_linear_weights(x, weights, "fp8_linears" if len(weights) != 1 else "fp8_linear")
    lead = x.shape[:-1]
    ys = FP8LinearFunction.apply(x.reshape(-1, x.shape[-1]), _output_dtype(x), *weights)
    return [y.view(*lead, w.shape[0]) for y, w in zip(ys, weights, strict=True)]


class _KGroupedLayout:
    """Where Wgrad's token-major operands put each row for `k_grouped_fp8_gemm_wgrad_nt`: the rows of group
    g (in row order) form K segment g, and the 1 x 128 token tiles restart at each segment. Rows with group
    -1 (skipped by the grouped GEMM) are left out.

    When every group's rows are one contiguous run (the dispatchers sort rows by expert), each segment is
    quantized from its own rows and the segments are concatenated. Otherwise quantization runs once over a
    buffer with every segment zero-padded to a multiple of 128 tokens (zeros never raise a tile's amax, so
    the scales are those of the unpadded segment) and the real columns are gathered back. Both give the
    codes and scales of quantizing each segment on its own."""

    def __init__(self, m_indices: torch.Tensor, groups: int):
        idx = m_indices.long()
        valid = idx >= 0
        counts = torch.bincount(idx[valid], minlength=groups)
        if counts.numel() != groups:
            raise ValueError(f"m_indices must be in [-1, {groups}), got a value {counts.numel() - 1}")
        self.groups = groups
        self.idx, self.valid, self.counts = idx, valid, counts
        # First row of each run of equal indices; groups are contiguous when no group has two runs.
        run_start = torch.ones_like(valid)
        run_start[1:] = idx[1:] != idx[:-1]
        starts = (run_start & valid).nonzero().squeeze(1)
        first = torch.zeros(groups, dtype=torch.long, device=idx.device)
        first[idx[starts]] = starts
        summary = torch.cat([counts, first, torch.tensor([starts.numel()], device=idx.device)]).tolist()
        self.ks = summary[:groups]
        contiguous = summary[-1] == sum(k > 0 for k in self.ks)
        self.segments = (
            [(r0, k) for r0, k in zip(summary[groups : 2 * groups], self.ks, strict=True) if k > 0]
            if contiguous
            else None
        )
        self._gather: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _gather_plan(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(rows, columns, padded_total) of the general path: the rows in segment order and each one's
        column in the padded buffer."""
        if self._gather is None:
            idx, counts = self.idx, self.counts
            padded = (counts + _BLOCK - 1) // _BLOCK * _BLOCK
            # Stable sort by group (-1 rows last): position j of the sorted order is column j of the operands.
            key = torch.where(self.valid, idx, self.groups)
            rows = torch.argsort(key, stable=True)[: sum(self.ks)]
            group = idx[rows]
            start = torch.cumsum(counts, 0) - counts
            pad_start = torch.cumsum(padded, 0) - padded
            rank = torch.arange(len(rows), device=idx.device) - start[group]
            self._gather = rows, pad_start[group] + rank, int(padded.sum())
        return self._gather

    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N, C] rows -> codes [C, ΣK] and scales [C, Σ ceil(ks/128)]."""
        if self.segments is not None:
            parts = [_quantize_along_tokens(t[r0 : r0 + k]) for r0, k in self.segments]
            if len(parts) == 1:
                return parts[0]
            if not parts:
                return _quantize_along_tokens(t[:0])
            return torch.cat([q for q, _ in parts], 1), torch.cat([s for _, s in parts], 1)
        rows, columns, padded_total = self._gather_plan()
        buf = t.new_zeros(padded_total, t.shape[1])
        buf[columns] = t[rows]
        q, s = _quantize_along_tokens(buf)
        return q[:, columns].contiguous(), s


class _SharedLayout:
    """The `_KGroupedLayout` of one m_indices over `groups` experts, built by the first backward that needs
    it and shared by every grouped GEMM over those rows (gate, up and down of an expert block)."""

    def __init__(self, m_indices: torch.Tensor, groups: int) -> None:
        self.m_indices, self.groups = m_indices, groups
        self._layout: _KGroupedLayout | None = None

    def get(self) -> _KGroupedLayout:
        if self._layout is None:
            self._layout = _KGroupedLayout(self.m_indices, self.groups)
        return self._layout


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Row r of x [N, in] times expert `m_indices[r]` of each W_i [E, out_i, in] (one or more stacked
    masters reading the same rows: gate and up), FP8 in all three GEMMs; rows with index -1 give zero
    outputs and no gradient. x is quantized once per direction for all weights, as in FP8LinearFunction."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        m_indices: torch.Tensor,
        layout: _SharedLayout,
        out_dtype: torch.dtype,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        a, sa = ops.quantize_per_token_group(x, _BLOCK)
        ys, quantized = [], []
        for weight in weights:
            qw, sw = ops.quantize_per_block(weight.detach(), _BLOCK)
            y = ops.m_grouped_fp8_gemm_nt_contiguous(
                a, sa, qw, sw, m_indices, out_dtype=_gemm_dtype(out_dtype)
            )
            ys.append(y.to(out_dtype))
            quantized += [qw, sw]
        ctx.save_for_backward(x, m_indices, *quantized)
        ctx.layout = layout
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x, m_indices, *quantized = ctx.saved_tensors
        dx, dws = _backward(
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[4:],
            x,
            dys,
            quantized,
            lambda g, sg, qwt, swt: ops.m_grouped_fp8_gemm_nt_contiguous(
                g, sg, qwt, swt, m_indices, out_dtype=_gemm_dtype(x.dtype)
            ),
            lambda t: ctx.layout.get().quantize(t),
            lambda a, sa, b, sb, out: ops.k_grouped_fp8_gemm_wgrad_nt(
                a, sa, b, sb, ctx.layout.get().ks, out=out
            ),
        )
        return dx, None, None, None, *dws


def _check_grouped(x: torch.Tensor, weights: Sequence[torch.Tensor], name: str) -> None:
    for w in weights:
        if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2] or w.shape[0] != weights[0].shape[0]:
            raise ValueError(
                f"{name}: x must be [N, in] and weights [E, out, in] with one E, got {tuple(x.shape)} and "
                f"{tuple(w.shape)}"
            )


def fp8_grouped_linear(x: torch.Tensor, m_indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grouped FP8 linear: x [N, in] rows grouped by expert (`m_indices` int [N], local expert ids, -1 =
    skip), weight [E, out, in] stacked masters -> [N, out] in x's dtype (the autocast dtype under
    autocast)."""
    return fp8_grouped_linears(x, m_indices, [weight])[0]


def fp8_grouped_linears(
    x: torch.Tensor, m_indices: torch.Tensor, weights: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`[fp8_grouped_linear(x, m_indices, w) for w in weights]`, bit for bit, with x quantized once per
    direction for all of them."""
    if not weights:
        raise ValueError("fp8_grouped_linears: weights must hold at least one weight")
    _check_grouped(x, weights, "fp8_grouped_linear" if len(weights) == 1 else "fp8_grouped_linears")
    m_indices = m_indices.to(torch.int32)
    return _grouped_linears(x, _SharedLayout(m_indices, weights[0].shape[0]), weights)


def _grouped_linears(
    x: torch.Tensor, layout: _SharedLayout, weights: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    args = (x, layout.m_indices, layout, _output_dtype(x))
    return list(FP8GroupedLinearFunction.apply(*args, *weights))


def fp8_grouped_experts(
    x: torch.Tensor,
    m_indices: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts down(silu(gate(x)) · up(x)) on rows x [N, H] grouped by expert (`m_indices`
    int [N], non-decreasing local expert ids), each projection a grouped FP8 linear over the stacked
    masters w_gate/w_up [E, inter, H] and w_down [E, H, inter]; the SwiGLU itself runs in x's dtype. gate and
    up share x's quantization, all three the Wgrad token layout."""
    _check_grouped(x, [w_gate, w_up], "fp8_grouped_experts")
    if w_up.shape != w_gate.shape or w_down.dim() != 3 or w_down.shape[::2] != w_gate.shape[:2]:
        raise ValueError(
            "fp8_grouped_experts: w_up must be shaped like w_gate [E, inter, H] and w_down [E, H, inter], "
            f"got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}"
        )
    layout = _SharedLayout(m_indices.to(torch.int32), w_gate.shape[0])
    gate, up = _grouped_linears(x, layout, [w_gate, w_up])
    return _grouped_linears(F.silu(gate) * up, layout, [w_down])[0]


def _linears_forward(x: torch.Tensor, modules: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """Each nn.Linear of `modules` applied to x through one `fp8_linears` call (biases added after, as in
    FP8TrainLinear)."""
    ys = fp8_linears(x, [m.weight for m in modules])
    return [y if m.bias is None else y + m.bias.to(y.dtype) for y, m in zip(ys, modules, strict=True)]


class FP8TrainLinear(nn.Linear):
    """An nn.Linear computed by `fp8_linear` (its weight remains the master parameter). Modules become one
    by a class switch (`enable_fp8_training`), so parameters, names, hooks and optimizer state are kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linears_forward(x, [self])[0]


class FP8TrainMLP(MLP):
    """An MLP of FP8TrainLinear projections whose gate_proj and up_proj share one quantization of x (their
    module forward hooks do not run; the projections' parameters are used as they are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _linears_forward(x, [self.gate_proj, self.up_proj])
        return self.down_proj(F.silu(gate) * up)


class FP8TrainMLA(MLA):
    """An MLA of FP8TrainLinear projections whose input projections (q_a_proj or q_proj, and
    kv_a_proj_with_mqa) share one quantization of x (their module forward hooks do not run)."""

    def _input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv = _linears_forward(x, [query, self.kv_a_proj_with_mqa])
        return q, kv


def block_aligned_experts(
    x: torch.Tensor,
    m_indices: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    block: int = _BLOCK,
) -> torch.Tensor:
    """`fp8_grouped_experts` on DeepGEMM's contiguous layout: each expert's rows are moved into whole
    `block`-row blocks of one expert id (the block's tail rows zero, with that expert's id) — the layout the
    sm_90 grouped kernel runs on; any other layout takes its dequantize + cuBLAS fallback. The outputs are
    gathered back in row order (rows with id -1 give zeros). Every real row's output and every gradient are
    those of the unpadded call: rows are independent in Fprop and Dgrad, and the zero rows complete Wgrad's
    last token tile of each expert without raising its amax."""
    if x.dim() != 2 or m_indices.shape != x.shape[:1]:
        raise ValueError(
            f"block_aligned_experts: x must be [N, H] and m_indices [N], got {tuple(x.shape)} and "
            f"{tuple(m_indices.shape)}"
        )
    groups = w_gate.shape[0]
    idx = m_indices.long()
    valid = idx >= 0
    counts = torch.bincount(idx[valid], minlength=groups)
    if counts.numel() != groups:
        raise ValueError(f"block_aligned_experts: m_indices must be in [-1, {groups})")
    padded = (counts + block - 1) // block * block
    # Stable sort by expert (-1 rows last, then dropped): rank of each row within its expert's rows.
    rows = torch.argsort(torch.where(valid, idx, groups), stable=True)[: int(valid.sum())]
    g = idx[rows]
    rank = torch.arange(len(rows), device=x.device) - (torch.cumsum(counts, 0) - counts)[g]
    pos = (torch.cumsum(padded, 0) - padded)[g] + rank
    aligned_idx = torch.repeat_interleave(torch.arange(groups, device=x.device, dtype=torch.int32), padded)
    xp = x.new_zeros(len(aligned_idx), x.shape[1]).index_copy(0, pos, x.index_select(0, rows))
    yp = fp8_grouped_experts(xp, aligned_idx, w_gate, w_up, w_down)
    return yp.new_zeros(x.shape[0], yp.shape[1]).index_copy(0, rows, yp.index_select(0, pos))


class FP8TrainExperts(Experts):
    """Stacked routed experts (full-precision masters) computed by `fp8_grouped_experts`; on a GPU through
    `block_aligned_experts`, so the grouped GEMMs run on the sm_90 kernel (the CPU kernel takes any
    layout, and the padding would only cost there)."""

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        experts = block_aligned_experts if x.is_cuda else fp8_grouped_experts
        return experts(x, local_idx, self.gate_proj, self.up_proj, self.down_proj)


def _fp8_targets(model: nn.Module) -> list[nn.Module]:
    """The modules of the report's FP8 scope: attention and MLP/shared-expert projections, routed experts.
    The router (moe.Router), embeddings, lm_head and the MTP eh_proj/shared_head are not among them."""
    targets: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, FP8Linear) or (isinstance(module, Experts) and module.fp8):
            raise ValueError(
                "enable_fp8_training: the model holds FP8 inference weights (e4m3 + weight_scale_inv); FP8 "
                "training needs BF16/FP32 master weights (build the model with a non-FP8 config)"
            )
        if isinstance(module, Experts):
            targets.append(module)
            continue
        names: tuple[str, ...] = ()
        if isinstance(module, MLA):
            names = ATTENTION_PROJECTIONS
        elif isinstance(module, MLP):
            names = MLP_PROJECTIONS
        targets += [getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Linear)]
    return targets


def _input_siblings(module: MLP | MLA) -> tuple[str, str]:
    """The two projections of an MLP or MLA block that read the block's input."""
    if isinstance(module, MLA):
        return ("q_proj" if module.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa")
    return ("gate_proj", "up_proj")


_FP8_BLOCKS = {MLP: FP8TrainMLP, MLA: FP8TrainMLA}
_FULL_BLOCKS = {fp8: full for full, fp8 in _FP8_BLOCKS.items()}


def enable_fp8_training(model: nn.Module) -> nn.Module:
    """Switch a BF16/FP32 model's attention projections, dense/shared-expert MLP projections and routed
    experts to FP8 training compute, in place; parameters (objects, names, values) are unchanged. MLP and
    MLA blocks whose input projections both switched compute those two from one quantization of the input.
    Returns the model. Raises ValueError for a model with FP8 inference weights."""
    for module in _fp8_targets(model):
        if type(module) is nn.Linear:
            module.__class__ = FP8TrainLinear
        elif type(module) is Experts:
            module.__class__ = FP8TrainExperts
    for module in model.modules():
        block = _FP8_BLOCKS.get(type(module))
        if block is not None and all(
            type(getattr(module, n, None)) is FP8TrainLinear for n in _input_siblings(module)
        ):
            module.__class__ = block
    return model


def disable_fp8_training(model: nn.Module) -> nn.Module:
    """Undo `enable_fp8_training`: the modules compute in their parameters' precision again."""
    for module in model.modules():
        if type(module) is FP8TrainLinear:
            module.__class__ = nn.Linear
        elif type(module) is FP8TrainExperts:
            module.__class__ = Experts
        elif type(module) in _FULL_BLOCKS:
            module.__class__ = _FULL_BLOCKS[type(module)]
    return model

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

`enable_fp8_training(model)` switches a BF16/FP32 `DeepseekV3` to this compute in place (attention and
MLP/expert projections only; embedding, head, router, norms and the MTP projections keep full precision)
without touching its parameters; `disable_fp8_training(model)` switches it back.
"""

from __future__ import annotations

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
    "FP8TrainExperts",
    "fp8_linear",
    "fp8_grouped_linear",
    "fp8_grouped_experts",
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
    """y = x·Wᵀ with FP8 Fprop/Dgrad/Wgrad. x [T, in] (2-D; `fp8_linear` flattens), W [out, in] master
    weight. Saves x (for Wgrad's token-major quantization) and q(W) (reused transposed by Dgrad)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        qw, sw = ops.quantize_per_block(weight.detach(), _BLOCK)
        a, sa = ops.quantize_per_token_group(x, _BLOCK)
        y = ops.fp8_gemm_nt(a, sa, qw, sw, out_dtype=_gemm_dtype(out_dtype))
        ctx.save_for_backward(x, qw, sw)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, qw, sw = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g, sg = ops.quantize_per_token_group(dy, _BLOCK)
            qwt, swt = transpose_block_quantized(qw, sw)
            dx = ops.fp8_gemm_nt(g, sg, qwt, swt, out_dtype=_gemm_dtype(x.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # fp32 out whatever the master dtype: autograd casts it to W's dtype and adds it to an existing
            # W.grad (gradient accumulation), so nothing is lost for fp32 masters.
            dw = torch.zeros(qw.shape, dtype=torch.float32, device=dy.device)
            a, sa = _quantize_along_tokens(dy)
            b, sb = _quantize_along_tokens(x)
            ops.fp8_gemm_wgrad_nt(a, sa, b, sb, out=dw)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with FP8 GEMMs in forward and backward. x [..., in] (bf16 or fp32:
    the output's dtype, or the autocast dtype under autocast), weight [out, in] (fp32 or bf16 master)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} input features, weight is {tuple(weight.shape)}")
    lead = x.shape[:-1]
    y = FP8LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, _output_dtype(x))
    return y.view(*lead, weight.shape[0])


class _KGroupedLayout:
    """Where Wgrad's token-major operands put each row for `k_grouped_fp8_gemm_wgrad_nt`: the rows of group
    g (in row order) form K segment g, and the 1 x 128 token tiles restart at each segment. Quantization
    runs once over a buffer with every segment zero-padded to a multiple of 128 tokens (zeros never raise a
    tile's amax, so the scales are those of the unpadded segment), then the real columns are gathered back.
    Rows with group -1 (skipped by the grouped GEMM) are left out."""

    def __init__(self, m_indices: torch.Tensor, groups: int):
        idx = m_indices.long()
        valid = idx >= 0
        counts = torch.bincount(idx[valid], minlength=groups)
        if counts.numel() != groups:
            raise ValueError(f"m_indices must be in [-1, {groups}), got a value {counts.numel() - 1}")
        self.ks = counts.tolist()
        padded = (counts + _BLOCK - 1) // _BLOCK * _BLOCK
        self.padded_total = int(padded.sum())
        # Stable sort by group (-1 rows last): position j of the sorted order is column j of the operands.
        key = torch.where(valid, idx, groups)
        self.rows = torch.argsort(key, stable=True)[: sum(self.ks)]
        group = idx[self.rows]
        start = torch.cumsum(counts, 0) - counts
        pad_start = torch.cumsum(padded, 0) - padded
        rank = torch.arange(len(self.rows), device=idx.device) - start[group]
        self.columns = pad_start[group] + rank  # each sorted row's column in the padded buffer

    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N, C] rows -> codes [C, ΣK] and scales [C, Σ ceil(ks/128)]."""
        buf = t.new_zeros(self.padded_total, t.shape[1])
        buf[self.columns] = t[self.rows]
        q, s = _quantize_along_tokens(buf)
        return q[:, self.columns].contiguous(), s


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Row r of x [N, in] times expert `m_indices[r]` of W [E, out, in], FP8 in all three GEMMs; rows with
    index -1 give zero outputs and no gradient."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, m_indices: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        qw, sw = ops.quantize_per_block(weight.detach(), _BLOCK)
        a, sa = ops.quantize_per_token_group(x, _BLOCK)
        y = ops.m_grouped_fp8_gemm_nt_contiguous(a, sa, qw, sw, m_indices, out_dtype=_gemm_dtype(out_dtype))
        ctx.save_for_backward(x, m_indices, qw, sw)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, m_indices, qw, sw = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g, sg = ops.quantize_per_token_group(dy, _BLOCK)
            qwt, swt = transpose_block_quantized(qw, sw)
            dx = ops.m_grouped_fp8_gemm_nt_contiguous(
                g, sg, qwt, swt, m_indices, out_dtype=_gemm_dtype(x.dtype)
            ).to(x.dtype)
        if ctx.needs_input_grad[2]:
            layout = _KGroupedLayout(m_indices, qw.shape[0])
            dw = torch.zeros(qw.shape, dtype=torch.float32, device=dy.device)
            a, sa = layout.quantize(dy)
            b, sb = layout.quantize(x)
            ops.k_grouped_fp8_gemm_wgrad_nt(a, sa, b, sb, layout.ks, out=dw)
        return dx, None, dw, None


def fp8_grouped_linear(x: torch.Tensor, m_indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grouped FP8 linear: x [N, in] rows grouped by expert (`m_indices` int [N], local expert ids, -1 =
    skip), weight [E, out, in] stacked masters -> [N, out] in x's dtype (the autocast dtype under
    autocast)."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"fp8_grouped_linear: x must be [N, in] and weight [E, out, in], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    return FP8GroupedLinearFunction.apply(x, m_indices.to(torch.int32), weight, _output_dtype(x))


def fp8_grouped_experts(
    x: torch.Tensor,
    m_indices: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts down(silu(gate(x)) · up(x)) on rows x [N, H] grouped by expert (`m_indices`
    int [N], non-decreasing local expert ids), each projection a grouped FP8 linear over the stacked
    masters w_gate/w_up [E, inter, H] and w_down [E, H, inter]; the SwiGLU itself runs in x's dtype."""
    m_indices = m_indices.to(torch.int32)
    h = F.silu(fp8_grouped_linear(x, m_indices, w_gate)) * fp8_grouped_linear(x, m_indices, w_up)
    return fp8_grouped_linear(h, m_indices, w_down)


class FP8TrainLinear(nn.Linear):
    """An nn.Linear computed by `fp8_linear` (its weight remains the master parameter). Modules become one
    by a class switch (`enable_fp8_training`), so parameters, names, hooks and optimizer state are kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FP8TrainExperts(Experts):
    """Stacked routed experts (full-precision masters) computed by `fp8_grouped_experts`."""

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_experts(x, local_idx, self.gate_proj, self.up_proj, self.down_proj)


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


def enable_fp8_training(model: nn.Module) -> nn.Module:
    """Switch a BF16/FP32 model's attention projections, dense/shared-expert MLP projections and routed
    experts to FP8 training compute, in place; parameters (objects, names, values) are unchanged. Returns
    the model. Raises ValueError for a model with FP8 inference weights."""
    for module in _fp8_targets(model):
        if type(module) is nn.Linear:
            module.__class__ = FP8TrainLinear
        elif type(module) is Experts:
            module.__class__ = FP8TrainExperts
    return model


def disable_fp8_training(model: nn.Module) -> nn.Module:
    """Undo `enable_fp8_training`: the modules compute in their parameters' precision again."""
    for module in model.modules():
        if type(module) is FP8TrainLinear:
            module.__class__ = nn.Linear
        elif type(module) is FP8TrainExperts:
            module.__class__ = Experts
    return model

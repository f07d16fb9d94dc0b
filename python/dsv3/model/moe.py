"""DeepSeekMoE (report §2.1.2, eqs. 12-16): shared experts plus top-k routed experts chosen by a sigmoid
router with auxiliary-loss-free bias (used for selection only) and node-limited group routing.

Routed experts are stored stacked ([E_local, out, in] per projection) and run as grouped GEMMs: FP8
`m_grouped_fp8_gemm_nt_contiguous` when the model is FP8, one matmul per non-empty expert otherwise. How token
rows reach the experts is a pluggable `dispatcher` (the expert-parallel hook): the default keeps every expert
local; `dsv3.ep` supplies one that sends rows to the ranks holding their experts, without touching the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """eqs. 15-16: s = sigmoid(u·e), top-k over s + b within the best `topk_group` groups, gates = s of the
    chosen experts normalised (norm_topk_prob) and scaled by routed_scaling_factor (dsv3.ops.moe_route)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.last_scores: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under mixed precision
            return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (topk_idx int64 [T, k], topk_weights fp32 [T, k]). When gradients flow, the
        weights are recomputed from the sigmoid scores in torch (the op's selection is not differentiable,
        the gates are: eq. 13) and the scores are kept in `last_scores` for the sequence-wise balance loss."""
        c = self.cfg
        logits = self.logits(x)
        topk_idx, topk_weights = ops.moe_route(
            logits.detach(),
            self.e_score_correction_bias.float(),
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.routed_scaling_factor,
            c.norm_topk_prob,
        )
        if torch.is_grad_enabled() and logits.requires_grad:
            scores = logits.sigmoid()
            w = scores.gather(1, topk_idx)
            if c.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            topk_weights = w * c.routed_scaling_factor
            self.last_scores = scores
        return topk_idx, topk_weights


class Experts(nn.Module):
    """The routed experts held here (global ids `expert_ids`), as stacked SwiGLU projections."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, expert_ids: torch.Tensor | None = None):
        super().__init__()
        ids = torch.arange(cfg.n_routed_experts) if expert_ids is None else expert_ids.long()
        self.register_buffer("expert_ids", ids, persistent=False)
        self.fp8 = cfg.fp8
        n, hidden, inter = len(ids), cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for name, (rows, cols) in shapes.items():
            if self.fp8:
                w = torch.zeros(n, rows, cols, dtype=torch.float8_e4m3fn)
                s = torch.ones(n, ops.ceil_div(rows, 128), ops.ceil_div(cols, 128))
                self.register_parameter(name, nn.Parameter(w, requires_grad=False))
                self.register_parameter(f"{name}_scale_inv", nn.Parameter(s, requires_grad=False))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(n, rows, cols)))

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        """Rows x [N, hidden] grouped by local expert (local_idx int [N], non-decreasing) -> [N, hidden]."""
        if self.fp8:
            return self._forward_fp8(x, local_idx)
        if x.shape[0] <= self.FEW_ROWS and not torch.is_grad_enabled():
            return self._forward_gathered(x, local_idx)
        out = torch.empty_like(x)
        counts = torch.bincount(local_idx, minlength=len(self.expert_ids)).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = x[start : start + n]
                h = F.silu(F.linear(rows, self.gate_proj[e])) * F.linear(rows, self.up_proj[e])
                out[start : start + n] = F.linear(h, self.down_proj[e])
                start += n
        return out

    # Decode-sized batches: gather each row's expert matrices and run three batched matmuls instead of up to
    # 3 x E small GEMMs (the per-call overhead dominates at a handful of rows).
    FEW_ROWS = 32

    def _forward_gathered(self, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        rows = x.unsqueeze(-1)  # [N, hidden, 1]
        gate = torch.bmm(self.gate_proj[local_idx], rows)
        up = torch.bmm(self.up_proj[local_idx], rows)
        return torch.bmm(self.down_proj[local_idx], F.silu(gate) * up).squeeze(-1)

    def _forward_fp8(self, x: torch.Tensor, local_idx: torch.Tensor) -> torch.Tensor:
        m_indices = local_idx.to(torch.int32)
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16

        def grouped(inp: torch.Tensor, name: str) -> torch.Tensor:
            a, sa = ops.quantize_per_token_group(inp)
            w, s = getattr(self, name), getattr(self, f"{name}_scale_inv")
            return ops.m_grouped_fp8_gemm_nt_contiguous(a, sa, w, s, m_indices, out_dtype=out_dtype)

        h = F.silu(grouped(x, "gate_proj")) * grouped(x, "up_proj")
        return grouped(h.to(x.dtype), "down_proj").to(x.dtype)


class LocalDispatcher:
    """Every expert is local: sort the (token, expert) pairs by expert, run the experts on the gathered rows,
    weight them and sum each token's k outputs in fp32 (index_add in pair order)."""

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: Experts):
        k = topk_idx.shape[1]
        flat = topk_idx.flatten()
        order = torch.argsort(flat, stable=True)
        token = order // k
        out = experts(x.index_select(0, token), flat[order])  # index_select: far faster than x[token]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token, out.float() * topk_weights.flatten()[order].unsqueeze(1))
        return y.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_ids: torch.Tensor | None = None):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg, expert_ids)
        self.shared_experts = MLP(cfg, cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.dispatcher = LocalDispatcher()
        self.last_topk_idx: torch.Tensor | None = None  # the latest routing, for load statistics
        # Opt-in running expert load: when set to a tensor [n_routed_experts], every forward adds its routing
        # counts to it (the DualPipe trainer sums the loads of all micro-batches of a step this way).
        self.load_accumulator: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        topk_idx, topk_weights = self.gate(flat)
        self.last_topk_idx = topk_idx
        if self.load_accumulator is not None:
            acc = self.load_accumulator
            acc += torch.bincount(topk_idx.flatten(), minlength=acc.numel()).to(acc.device, acc.dtype)
        routed = self.dispatcher(flat, topk_idx, topk_weights, self.experts)
        return (routed + self.shared_experts(flat)).view(x.shape)  # eq. 13

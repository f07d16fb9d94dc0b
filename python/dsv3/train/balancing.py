"""Load balancing of DeepSeek-V3's MoE (report §2.1.2): the auxiliary-loss-free bias update, the
complementary sequence-wise balance loss, expert-load statistics, and the MTP loss (§2.2)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.moe import MoE


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_loads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tokens routed to each expert in each MoE layer by the latest forward (fp32 [E] per layer)."""
    loads = []
    for moe in moe_layers(model):
        n = moe.gate.e_score_correction_bias.numel()
        idx = moe.last_topk_idx
        loads.append(
            torch.zeros(n) if idx is None else torch.bincount(idx.flatten(), minlength=n).float().cpu()
        )
    return loads


@torch.no_grad()
def update_router_bias(model: torch.nn.Module, loads: list[torch.Tensor], gamma: float) -> None:
    """Auxiliary-loss-free balancing (after each optimizer step): b_i += γ · sign(mean_load − load_i), with
    loads over the whole global batch (summed across data-parallel ranks here). The bias only steers
    selection (eq. 16); gating weights use the unbiased scores."""
    layers = moe_layers(model)
    if len(layers) != len(loads):
        raise ValueError(f"update_router_bias: {len(loads)} load vectors for {len(layers)} MoE layers")
    stacked = torch.stack(loads) if loads else torch.zeros(0)
    if dist.is_available() and dist.is_initialized() and stacked.numel():
        # on the biases' device: NCCL reduces CUDA tensors only
        stacked = stacked.to(layers[0].gate.e_score_correction_bias.device)
        dist.all_reduce(stacked)
    for moe, load in zip(layers, stacked, strict=True):
        bias = moe.gate.e_score_correction_bias
        bias += gamma * torch.sign(load.mean() - load).to(bias.device, bias.dtype)


def imbalance(loads: list[torch.Tensor]) -> list[float]:
    """max / mean expert load per layer (1.0 = perfectly balanced)."""
    return [float(x.max() / x.mean()) if x.sum() > 0 else 1.0 for x in loads]


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, top_k: int, alpha: float
) -> torch.Tensor:
    """Complementary sequence-wise balance loss (eqs. 17-20), averaged over the sequences of the batch:
    L = α Σ_i f_i P_i with f_i = N_r / (K_r T) · #{t : i in TopK_t} and P_i = 1/T Σ_t s'_{i,t}, where s' are
    the sigmoid scores normalised over all experts per token. scores [B·T, N_r] (differentiable),
    topk_idx [B·T, K_r]."""
    n_tokens, n_experts = scores.shape
    t = n_tokens // batch
    s_norm = scores / scores.sum(-1, keepdim=True)
    p = s_norm.view(batch, t, n_experts).mean(1)  # [B, N_r]
    chosen = F.one_hot(topk_idx, n_experts).sum(1).view(batch, t, n_experts).float()  # [B, T, N_r]
    f = chosen.sum(1) * n_experts / (top_k * t)
    return alpha * (f * p).sum(-1).mean()

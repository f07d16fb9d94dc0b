"""The MoE layers of a dsv3 model, expert-parallel through `dsv3.ep.Buffer` (DeepEP's flow):

    layout -> dispatch (each token once per rank holding one of its experts) -> grouped GEMM of the local
    experts on the received rows, weighted by the received gates and summed per row in fp32 -> combine
    (the ranks' partial sums added in fp32, ranks ascending)

    buffer = Buffer(group)
    enable_buffer_expert_parallel(model, buffer)                  # contiguous blocks: E/R experts per rank
    enable_buffer_expert_parallel(model, buffer, placement=plan)  # EPLB: redundant experts

The model may hold every routed expert (its experts are then cut down to this rank's physical slots in place)
or exactly this rank's contiguous block (built with `expert_ids=local_expert_ids(E, rank, R)`, e.g. by
`from_pretrained`). The path is differentiable: dispatch's backward is a combine of the row gradients (and of
the gate gradients), combine's backward a cached dispatch, run in the same order on every rank; a rank with no
rows still takes part. With redundant experts, `sync_replica_grads` sums the gradients of a logical expert's
replicas before the optimizer step so they stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.ep import _EP_ATTR, local_expert_ids
from ..model.moe import Experts, MoE
from . import eplb as _eplb
from .buffer import Buffer

__all__ = [
    "BufferDispatcher",
    "ExpertPlacement",
    "enable_buffer_expert_parallel",
    "sync_replica_grads",
]


@dataclass
class ExpertPlacement:
    """Where each MoE layer's physical expert slots live (`dsv3.ep.eplb.rebalance_experts` output): rank r
    holds physical slots [r·P/R, (r+1)·P/R) of every layer; slot p runs logical expert phy2log[layer, p]."""

    phy2log: torch.Tensor  # [layers, P] int64
    log2phy: torch.Tensor  # [layers, E, max_replicas] int64, -1 padded
    logcnt: torch.Tensor  # [layers, E] int64

    @classmethod
    def from_load(cls, load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
        """EPLB on per-layer expert loads [layers, E]."""
        return cls(*_eplb.rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    def local_slots(self, layer: int, rank: int, num_ranks: int) -> torch.Tensor:
        """The logical expert ids of rank `rank`'s physical slots in `layer`."""
        per = self.num_physical // num_ranks
        return self.phy2log[layer, rank * per : (rank + 1) * per].clone()


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, anchor, buffer, topk_idx, layout, state):
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, **layout
        )
        state["handle"] = handle
        ctx.buffer, ctx.state, ctx.n, ctx.k = buffer, state, x.shape[0], topk_idx.shape[1]
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, g_x, _g_idx, g_w):
        handle = ctx.state["handle"]
        if g_w is None:
            g_w = torch.zeros((g_x.shape[0], ctx.k), dtype=torch.float32, device=g_x.device)
        gx, gw, _ = ctx.buffer.combine(g_x.contiguous(), handle, topk_weights=g_w.float().contiguous())
        anchor_grad = gx.new_zeros(0) if ctx.needs_input_grad[2] else None
        return gx, gw, anchor_grad, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, anchor, buffer, state):
        ctx.buffer, ctx.state = buffer, state
        return buffer.combine(y, state["handle"])[0]

    @staticmethod
    def backward(ctx, g):
        g_rows = ctx.buffer.dispatch(g.contiguous(), handle=ctx.state["handle"])[0]
        anchor_grad = g.new_zeros(0) if ctx.needs_input_grad[1] else None
        return g_rows, anchor_grad, None, None


class BufferDispatcher:
    """`MoE.dispatcher` through a `Buffer`: `(x [T, H], topk_idx [T, k] (logical ids, -1 = none),
    topk_weights [T, k], experts) -> [T, H]` in x's dtype. `experts` holds this rank's physical slots;
    with a `placement` (one layer's EPLB maps) tokens go to their experts' replicas round-robin."""

    def __init__(
        self,
        buffer: Buffer,
        num_experts: int,
        log2phy: torch.Tensor | None = None,
        logcnt: torch.Tensor | None = None,
        num_physical: int | None = None,
    ):
        if not isinstance(buffer, Buffer):
            raise TypeError(f"BufferDispatcher: buffer must be a dsv3.ep.Buffer, got {type(buffer).__name__}")
        self.buffer = buffer
        self.num_experts = num_experts
        self.log2phy, self.logcnt = log2phy, logcnt
        self.num_physical = num_physical if num_physical is not None else num_experts
        if self.num_physical % buffer.group_size:
            raise ValueError(
                f"BufferDispatcher: {self.num_physical} physical experts do not divide over "
                f"{buffer.group_size} ranks"
            )

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, experts: Experts):
        buf = self.buffer
        if not isinstance(experts, Experts):
            raise TypeError(
                f"BufferDispatcher: experts must be an Experts module, got {type(experts).__name__}"
            )
        per = self.num_physical // buf.group_size
        if len(experts.expert_ids) != per:
            raise ValueError(
                f"BufferDispatcher: this rank must hold {per} expert slots, holds {len(experts.expert_ids)}"
            )
        idx = topk_idx.long()
        if self.log2phy is not None:
            lp, lc = self.log2phy.to(idx.device), self.logcnt.to(idx.device)
            tokens = torch.arange(idx.shape[0], device=idx.device) + buf.rank
            idx = _eplb.select_replicas(idx, lp, lc, token_ids=tokens)
        ntr, _, nte, in_rank, _ = buf.get_dispatch_layout(idx, self.num_physical)
        layout = dict(num_tokens_per_rank=ntr, is_token_in_rank=in_rank, num_tokens_per_expert=nte)
        grad = torch.is_grad_enabled()
        anchor = torch.empty(0, device=x.device, requires_grad=True) if grad else None
        state: dict = {}
        recv_x, recv_idx, recv_w = _Dispatch.apply(
            x.contiguous(), topk_weights.float().contiguous(), anchor, buf, idx, layout, state
        )
        k = recv_idx.shape[1]
        flat = recv_idx.flatten()
        pair = (flat >= 0).nonzero().flatten()
        pair = pair[torch.argsort(flat[pair], stable=True)]  # grouped by local expert, rows ascending
        row = pair // k
        y = torch.zeros(recv_x.shape, dtype=torch.float32, device=x.device)
        if pair.numel():
            out = experts(recv_x.index_select(0, row), flat[pair])
            y = y.index_add(0, row, out.float() * recv_w.flatten()[pair].unsqueeze(1))
        if grad:  # keep dispatch's backward (a collective) wired even when no row reached an expert here
            y = y + recv_x[:0].float().sum() + recv_w[:0].sum()
        return _Combine.apply(y.to(x.dtype), anchor, buf, state)


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def _reslice(experts: Experts, logical_ids: torch.Tensor) -> Experts:
    """A new Experts holding the rows `logical_ids` of `experts`, which holds every expert."""
    new = Experts.__new__(Experts)
    nn.Module.__init__(new)
    new.register_buffer("expert_ids", logical_ids.long().to(experts.expert_ids.device), persistent=False)
    new.fp8 = experts.fp8
    for name, p in experts.named_parameters(recurse=False):
        rows = p.detach()[logical_ids.to(p.device)].clone()
        new.register_parameter(name, nn.Parameter(rows, requires_grad=p.requires_grad))
    return new


def enable_buffer_expert_parallel(
    model: nn.Module, buffer: Buffer, placement: ExpertPlacement | None = None
) -> nn.Module:
    """Install `BufferDispatcher` in every MoE layer of `model` (MTP's too, in module order) and mark the
    routed-expert parameters as rank-owned (`dsv3.model.ep.is_expert_parallel`), so data-parallel averaging
    skips them. See the module docstring for what the model must hold. Returns the model."""
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("enable_buffer_expert_parallel: the model has no MoE layer")
    rank, world = buffer.rank, buffer.group_size
    if placement is not None and placement.num_layers != len(layers):
        raise ValueError(
            f"enable_buffer_expert_parallel: placement has {placement.num_layers} layers, the model "
            f"{len(layers)} MoE layers"
        )
    for i, moe in enumerate(layers):
        E = moe.gate.cfg.n_routed_experts
        ex = moe.experts
        if placement is None:
            want = local_expert_ids(E, rank, world)
            held = ex.expert_ids.long().cpu()
            if len(held) == E and world > 1:
                moe.experts = _reslice(ex, want)
            elif not torch.equal(held, want):
                raise ValueError(
                    f"enable_buffer_expert_parallel: rank {rank} of {world} must hold experts "
                    f"[{int(want[0])}, {int(want[-1]) + 1}) or all {E}, holds {held.tolist()}"
                )
            moe.dispatcher = BufferDispatcher(buffer, E)
        else:
            if placement.phy2log.shape[1] % world:
                raise ValueError(
                    "enable_buffer_expert_parallel: the physical experts do not divide over the ranks"
                )
            if len(ex.expert_ids) != E:
                raise ValueError(
                    "enable_buffer_expert_parallel: a placement needs a model holding every expert"
                )
            moe.experts = _reslice(ex, placement.local_slots(i, rank, world))
            moe.dispatcher = BufferDispatcher(
                buffer, E, placement.log2phy[i], placement.logcnt[i], placement.num_physical
            )
        moe.ep_layer_index = i
        for p in moe.experts.parameters():
            setattr(p, _EP_ATTR, True)
    model.expert_placement = placement
    return model


@torch.no_grad()
def sync_replica_grads(model: nn.Module, placement: ExpertPlacement, group=None) -> None:
    """Sum the gradients of every logical expert's replicas (across ranks and within one) and give each
    replica the sum, so replicas of an expert take identical optimizer steps. Collective."""
    world = dist.get_world_size(group)
    for i, moe in enumerate(_moe_layers(model)):
        slots = placement.phy2log[i]  # [P] logical id of each physical slot, slots in rank order
        E = moe.gate.cfg.n_routed_experts
        for p in moe.experts.parameters():
            if p.grad is None:
                continue
            g = p.grad.contiguous()
            wire = g if g.dtype in (torch.float32, torch.float64) else g.view(torch.uint8)  # gloo lacks bf16
            parts = [torch.empty_like(wire) for _ in range(world)]
            dist.all_gather(parts, wire, group=group)
            full = torch.cat(parts).view(g.dtype)  # [P, ...]
            summed = torch.zeros((E, *g.shape[1:]), dtype=g.dtype, device=g.device)
            summed.index_add_(0, slots.to(g.device), full)
            p.grad.copy_(summed[placement.local_slots(i, dist.get_rank(group), world).to(g.device)])

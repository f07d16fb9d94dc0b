"""The dispatch layout of expert parallelism (SPEC §5, DeepEP's `get_dispatch_layout`): from each token's
top-k expert ids, how many tokens every rank, node and expert receives and which ranks each token goes to.

`dispatch_layout_reference` is the readable definition in plain PyTorch; `dispatch_layout` runs the
`torch.ops.dsv3.ep_dispatch_layout` kernels (CPU, CUDA, Meta) behind the same signature.
"""

from __future__ import annotations

import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)

__all__ = ["dispatch_layout", "dispatch_layout_reference"]

LayoutResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def dispatch_layout_reference(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout of `topk_idx [n, k]` (expert ids in [-1, num_experts), -1 = no expert) over `num_ranks`
    ranks holding contiguous blocks of num_experts / num_ranks experts (rank = e // (E / R)), with
    `num_ranks_per_node` ranks per node (node = rank // num_ranks_per_node). Returns int32
    `num_tokens_per_rank [R]` (tokens with at least one expert on the rank), `num_tokens_per_rdma_rank
    [R / num_ranks_per_node]` (the same per node; empty [0] when R <= num_ranks_per_node), int32
    `num_tokens_per_expert [E]` ((token, k) entries per expert: a repeated expert counts twice) and bool
    `is_token_in_rank [n, R]`."""
    if num_experts % num_ranks:
        raise ValueError(f"num_ranks ({num_ranks}) must divide num_experts ({num_experts})")
    idx = topk_idx.long()
    tokens, device = idx.size(0), idx.device
    valid = idx >= 0
    num_tokens_per_expert = torch.bincount(idx[valid], minlength=num_experts).int()
    # -1 entries go to an extra column that is dropped: scatter de-duplicates the ranks of a token.
    rank = torch.where(valid, idx // (num_experts // num_ranks), num_ranks)
    is_token_in_rank = torch.zeros(tokens, num_ranks + 1, dtype=torch.bool, device=device)
    is_token_in_rank = is_token_in_rank.scatter_(1, rank, True)[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    if num_ranks > num_ranks_per_node:
        in_node = is_token_in_rank.view(tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(-1)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    else:
        num_tokens_per_rdma_rank = torch.zeros(0, dtype=torch.int32, device=device)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"dispatch_layout: {name} must be an int, got {type(value).__name__}")


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int = 8
) -> LayoutResult:
    """`dispatch_layout_reference`'s result from the dsv3 kernels, with `num_tokens_per_rdma_rank` None
    when every rank sits on one node (DeepEP's convention). `topk_idx` is int64 or int32, any strides;
    an entry outside [-1, num_experts) raises ValueError (on CUDA this waits for the kernel)."""
    if not isinstance(topk_idx, torch.Tensor):
        raise TypeError(f"dispatch_layout: topk_idx must be a torch.Tensor, got {type(topk_idx).__name__}")
    _check_int(num_experts, "num_experts")
    _check_int(num_ranks, "num_ranks")
    _check_int(num_ranks_per_node, "num_ranks_per_node")
    per_rank, per_rdma_rank, per_expert, in_rank = torch.ops.dsv3.ep_dispatch_layout(
        topk_idx, num_experts, num_ranks, num_ranks_per_node
    )
    return per_rank, (per_rdma_rank if num_ranks > num_ranks_per_node else None), per_expert, in_rank

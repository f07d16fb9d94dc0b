"""Expert-parallel load balancing (EPLB, SPEC §5; the DeepSeek-V3 report's redundant experts): replicate
the heavily loaded experts and place the replicas on GPUs so that every GPU gets about the same load, given
per-expert load statistics (e.g. a moving average of tokens per expert).

Two policies, as in DeepSeek's public EPLB:
- hierarchical (num_groups % num_nodes == 0): pack whole expert groups onto nodes (group-limited routing
  then keeps a token's traffic on few nodes), replicate experts within each node, pack each node's physical
  experts onto its GPUs;
- global (otherwise): replicate over all experts and pack the physical experts onto all GPUs.

Physical expert p lives on GPU p // (num_replicas / num_gpus), so a physical top-k from `select_replicas`
feeds `dsv3.ep.layout.dispatch_layout(..., num_experts=num_replicas, num_ranks=num_gpus)` directly.
Everything here is plain PyTorch on small host tensors; ties always go to the lower index, so results are
deterministic.
"""

from __future__ import annotations

import torch

__all__ = ["gpu_loads", "rebalance_experts", "replica_map", "select_replicas"]


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the n items of every row of `weight [rows, n]` into `num_packs` packs of exactly n / num_packs
    items with loads as even as possible: greedily, heaviest item first, into the least-loaded pack that
    still has room (lower pack on ties). Returns (pack [rows, n], slot [rows, n]): the item's pack and its
    position there (the order it was placed in)."""
    rows, items = weight.shape
    capacity = items // num_packs
    order = torch.sort(weight, dim=1, descending=True, stable=True).indices
    pack_load = torch.zeros(rows, num_packs, dtype=weight.dtype)
    pack_size = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack = torch.empty(rows, items, dtype=torch.int64)
    slot = torch.empty(rows, items, dtype=torch.int64)
    row = torch.arange(rows)
    for step in range(items):  # all rows at once, one item each
        item = order[:, step]
        target = pack_load.masked_fill(pack_size >= capacity, float("inf")).argmin(dim=1)
        pack[row, item] = target
        slot[row, item] = pack_size[row, target]
        pack_load[row, target] += weight[row, item]
        pack_size[row, target] += 1
    return pack, slot


def _replicate(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread the n logical experts of every row of `weight [rows, n]` over `num_physical` >= n replicas:
    one each, then each extra replica to the expert with the highest load per replica (lower index on ties),
    which minimizes the largest load per replica. Returns (phy2log [rows, num_physical]: the originals
    first, then the extra replicas in the order they were handed out; logcnt [rows, n])."""
    rows, experts = weight.shape
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    logcnt = torch.ones(rows, experts, dtype=torch.int64)
    row = torch.arange(rows)
    for physical in range(experts, num_physical):
        heaviest = (weight / logcnt).argmax(dim=1)
        phy2log[:, physical] = heaviest
        logcnt[row, heaviest] += 1
    return phy2log, logcnt


def _place(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hierarchical policy on float64 `weight [layers, E]` (the global one is its num_groups = num_nodes
    = 1 case). Returns (phy2log [layers, num_replicas], logcnt [layers, E])."""
    layers, experts = weight.shape
    group_size = experts // num_groups
    experts_per_node = experts // num_nodes
    replicas_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    replicas_per_gpu = num_replicas // num_gpus

    # 1. groups to nodes. Node n lists its experts group by group (in packing order), each group's experts
    # ascending: node_experts[l, n * experts_per_node + i] = the logical id at node-local position i.
    group_load = weight.view(layers, num_groups, group_size).sum(-1)
    group_node, group_slot = _balanced_packing(group_load, num_nodes)
    group_start = (group_node * experts_per_node + group_slot * group_size).repeat_interleave(group_size, 1)
    position = group_start + torch.arange(experts).remainder(group_size)
    node_experts = torch.empty(layers, experts, dtype=torch.int64)
    node_experts.scatter_(1, position, torch.arange(experts).expand(layers, -1))
    node_experts = node_experts.view(layers * num_nodes, experts_per_node)

    # 2. replicas within each node (one row per (layer, node) from here on).
    node_weight = weight.gather(1, node_experts.view(layers, experts)).view_as(node_experts)
    local_phy2log, local_cnt = _replicate(node_weight, replicas_per_node)

    # 3. each node's physical experts to its GPUs; GPU g's slots are the physical ids
    # [g * replicas_per_gpu, (g + 1) * replicas_per_gpu), ordered as the packing placed them.
    replica_load = (node_weight / local_cnt).gather(1, local_phy2log)
    gpu, gpu_slot = _balanced_packing(replica_load, gpus_per_node)
    physical = gpu * replicas_per_gpu + gpu_slot  # within the node
    phy2log = torch.empty(layers * num_nodes, replicas_per_node, dtype=torch.int64)
    phy2log.scatter_(1, physical, node_experts.gather(1, local_phy2log))
    logcnt = torch.empty(layers, experts, dtype=torch.int64)
    logcnt.scatter_(1, node_experts.view(layers, experts), local_cnt.view(layers, experts))
    return phy2log.view(layers, num_replicas), logcnt


def _logical_to_physical(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """log2phy [layers, E, max replicas]: each logical expert's physical ids ascending, padded with -1."""
    layers, num_replicas = phy2log.shape
    experts = logcnt.size(1)
    width = int(logcnt.max()) if logcnt.numel() else 0
    # Physical ids grouped by logical expert, ascending inside a group (the sort is stable).
    physical = torch.sort(phy2log, dim=1, stable=True).indices
    logical = phy2log.gather(1, physical)
    group_start = (logcnt.cumsum(1) - logcnt).gather(1, logical)
    replica = torch.arange(num_replicas) - group_start
    log2phy = torch.full((layers, experts * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, logical * width + replica, physical)
    return log2phy.view(layers, experts, width)


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A replication and placement plan for `weight [layers, E]` (non-negative load per logical expert,
    float or int) on `num_gpus` GPUs in `num_nodes` nodes holding `num_replicas` physical experts in all
    (num_replicas / num_gpus per GPU); the E experts form `num_groups` groups of consecutive ids (the
    router's groups). Hierarchical policy when num_groups % num_nodes == 0, else global (module docstring).

    Returns int64 tensors on weight's device:
    - phy2log [layers, num_replicas]: the logical expert of each physical expert (GPU g holds physical ids
      [g * num_replicas / num_gpus, (g + 1) * num_replicas / num_gpus));
    - log2phy [layers, E, X]: each logical expert's physical ids ascending, padded with -1 (X = the largest
      replica count);
    - logcnt [layers, E]: replicas per logical expert, each >= 1.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"weight must hold real loads (float or int), got {weight.dtype}")
    if weight.dim() != 2 or weight.size(1) == 0:
        raise ValueError(
            f"weight must be 2-D [layers, num_experts] with num_experts >= 1, got {tuple(weight.shape)}"
        )
    _check_positive_int(num_replicas, "num_replicas")
    _check_positive_int(num_groups, "num_groups")
    _check_positive_int(num_nodes, "num_nodes")
    _check_positive_int(num_gpus, "num_gpus")
    experts = weight.size(1)
    if experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({experts})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be at least the number of experts ({experts})")
    load = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError("weight must hold finite, non-negative loads")

    if num_groups % num_nodes == 0:
        phy2log, logcnt = _place(load, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, logcnt = _place(load, num_replicas, 1, 1, num_gpus)
    log2phy = _logical_to_physical(phy2log, logcnt)
    return phy2log.to(weight.device), log2phy.to(weight.device), logcnt.to(weight.device)


def replica_map(phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus, num_replicas / num_gpus]: the logical expert in each local slot of each GPU, i.e.
    the expert weights GPU g loads (a view of phy2log)."""
    _check_positive_int(num_gpus, "num_gpus")
    if not isinstance(phy2log, torch.Tensor) or phy2log.dim() != 2:
        raise ValueError("phy2log must be a 2-D tensor [layers, num_replicas]")
    if phy2log.size(1) % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide num_replicas ({phy2log.size(1)})")
    return phy2log.view(phy2log.size(0), num_gpus, phy2log.size(1) // num_gpus)


def gpu_loads(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    """Expected load of every GPU, [layers, num_gpus] float64: the sum over its physical experts of
    weight / logcnt of their logical expert (the tokens of an expert split evenly over its replicas)."""
    per_replica = weight.double() / logcnt.double()
    return replica_map(per_replica.gather(1, phy2log), num_gpus).sum(-1)


def select_replicas(
    topk_idx: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Physical expert ids for one layer's logical `topk_idx [n, k]` (int64/int32, -1 = none, kept): token t
    goes to replica token_ids[t] % logcnt[e] of expert e, i.e. log2phy[e, token_ids[t] % logcnt[e]]
    (round-robin, so an expert's tokens spread evenly and deterministically over its replicas).
    `log2phy [E, X]` and `logcnt [E]` are one layer of `rebalance_experts`' outputs; `token_ids [n]`
    defaults to 0..n-1 (pass global token positions to spread across micro-batches). Returns topk_idx's
    dtype and device."""
    for name, tensor in (("topk_idx", topk_idx), ("log2phy", log2phy), ("logcnt", logcnt)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 or int32, got {tensor.dtype}")
        if tensor.device != topk_idx.device:
            raise ValueError(f"{name} must be on {topk_idx.device} like topk_idx, got {tensor.device}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [num_tokens, num_topk], got {tuple(topk_idx.shape)}")
    if log2phy.dim() != 2 or log2phy.size(1) == 0:
        raise ValueError(f"log2phy must be 2-D [num_experts, max_replicas >= 1], got {tuple(log2phy.shape)}")
    experts = log2phy.size(0)
    if logcnt.shape != (experts,):
        raise ValueError(f"logcnt must have shape [num_experts] = [{experts}], got {tuple(logcnt.shape)}")
    tokens = topk_idx.size(0)
    if token_ids is None:
        token_ids = torch.arange(tokens, device=topk_idx.device)
    elif not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("token_ids must be an int64 or int32 tensor")
    elif token_ids.shape != (tokens,) or token_ids.device != topk_idx.device:
        raise ValueError(
            f"token_ids must have shape [{tokens}] on {topk_idx.device}, got {tuple(token_ids.shape)}"
        )
    if topk_idx.numel():
        low, high = (int(v) for v in torch.aminmax(topk_idx))
        if low < -1 or high >= experts:
            bad = low if low < -1 else high
            raise ValueError(f"topk_idx entries must be in [-1, {experts}), got {bad}")

    idx = topk_idx.long()
    expert = idx.clamp(min=0)
    replica = token_ids.long()[:, None].remainder(logcnt.long()[expert])
    physical = log2phy.long()[expert, replica]
    return torch.where(idx >= 0, physical, -1).to(topk_idx.dtype)
